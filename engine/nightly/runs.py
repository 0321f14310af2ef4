"""The runs recorded in run.json, the rows of one run, and the summary a scheduler reads.

run.json holds the latest run's full record and, under "history", one compact entry per earlier
run (`history_entry`). Both give the same `run_view`, the object `cxr runs --json` lists and
`cxr screen --summary-json` writes. Entries written before the nightly fields existed lack
some of them; their views say null there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from engine.errors import EngineError
from engine.io import parquet
from engine.io.outdir import read_run_json
from engine.nightly import changes as change_check
from engine.nightly.monitor import known_runs, resolve_run

RUNS_SCHEMA = "cxr-runs/1"
SHOW_SCHEMA = "cxr-run-rows/1"
SUMMARY_SCHEMA = "cxr-run-summary/1"


def history_entry(record: dict[str, Any]) -> dict[str, Any]:
    """What run.json keeps of a run once a later one starts (samples and libraries dropped)."""
    models = record.get("models") or {}
    timings = record.get("timings") or {}
    changes = dict(record.get("changes") or {})
    for name in ("changed_samples", "vanished_samples"):
        changes.pop(name, None)
    return {
        "run_id": record.get("run_id"),
        "status": record.get("status"),
        "started_at": record.get("started_at"),
        "updated_at": record.get("updated_at"),
        "host": record.get("host"),
        "backend": record.get("backend"),
        "models": {
            "model_id": models.get("model_id"),
            "threshold": models.get("threshold"),
            "segmenter": {"precision": (models.get("segmenter") or {}).get("precision")},
            "classifier": {"precision": (models.get("classifier") or {}).get("precision")},
        },
        "counts": record.get("counts"),
        "timings": {k: timings.get(k) for k in ("wall_s", "images_per_s")},
        "changes": changes or None,
        "drift": record.get("drift"),
    }


def run_view(entry: dict[str, Any]) -> dict[str, Any]:
    """A run.json record or history entry as `cxr runs --json` shows it."""
    counts = entry.get("counts") or {}
    changes = entry.get("changes") or None
    timings = entry.get("timings") or {}
    models = entry.get("models") or {}
    rescreened = int((changes or {}).get("rescreened") or 0)
    processed = counts.get("processed")
    drift = entry.get("drift") or None
    return {
        "run_id": entry.get("run_id"),
        "status": entry.get("status"),
        "started_at": entry.get("started_at"),
        "ended_at": entry.get("updated_at") if entry.get("status") != "running" else None,
        "host": entry.get("host"),
        "images": {
            "new": None if processed is None else processed - rescreened,
            "rescreened": rescreened if changes else None,
            "skipped": counts.get("skipped_existing"),
            "errors": counts.get("error"),
            "positives": counts.get("positive"),
            "ignored_files": counts.get("ignored_files"),
        },
        "totals": {
            "rows": counts.get("total_rows"),
            "errors": counts.get("total_errors"),
            "index_size": counts.get("index_size"),
        },
        "images_per_s": timings.get("images_per_s"),
        "wall_s": timings.get("wall_s"),
        "backend": entry.get("backend"),
        "model_id": models.get("model_id"),
        "precision": {
            role: (models.get(role) or {}).get("precision") for role in ("segmenter", "classifier")
        }
        if models
        else None,
        "changes": None
        if changes is None
        else {
            k: changes.get(k)
            for k in (
                "checked",
                "changed",
                "rescreened",
                "vanished",
                "new_vanished",
                "touched",
                "unverified",
                "unreadable",
            )
        },
        "drift": None
        if drift is None
        else {
            "status": drift.get("status"),
            "reference": drift.get("reference"),
            "flagged": drift.get("flagged", []),
            "metrics": drift.get("metrics"),
            "thresholds": drift.get("thresholds"),
        },
    }


def _record(out: Path) -> dict[str, Any]:
    record = read_run_json(out)
    if record is None:
        raise EngineError(f"{out}: no run.json; is this the --out of a `cxr screen` run?")
    return record


def list_runs(out: Path) -> list[dict[str, Any]]:
    """Every recorded run, oldest first, as `run_view`s."""
    record = _record(out)
    entries = [*record.get("history", []), record]
    return [run_view(e) for e in entries if e.get("run_id")]


def runs_json(out: Path) -> dict[str, Any]:
    return {"schema": RUNS_SCHEMA, "out": str(out), "runs": list_runs(out)}


def find_run(out: Path, run_id: str) -> dict[str, Any]:
    """The view of one run, by id or unique prefix."""
    record = _record(out)
    wanted = resolve_run(known_runs(record), run_id, what="run")
    return next(v for v in list_runs(out) if v["run_id"] == wanted)


def run_rows(out: Path, run_id: str) -> pl.DataFrame:
    """Every row the run wrote (also those superseded since), each with `superseded`."""
    cols = ["key", "source", "member", "status", "error", "prob", "decision", "run_id"]
    lf = parquet.scan_predictions(out, history=True)
    if lf is None:  # the columns of a directory with parts, run_id dropped
        return pl.DataFrame(
            schema={**{c: parquet.SCHEMA[c] for c in cols[:-1]}, "superseded": pl.Boolean()}
        )
    numbered = lf.select(cols).with_row_index("_row")
    latest = numbered.group_by("key").agg(pl.col("_row").max().alias("_latest"))
    return (
        numbered.filter(pl.col("run_id") == run_id)
        .join(latest, on="key", how="left")
        .with_columns((pl.col("_row") != pl.col("_latest")).alias("superseded"))
        .sort("_row")
        .drop("_row", "_latest", "run_id")
        .collect()
    )


def show_run(out: Path, run_id: str) -> dict[str, Any]:
    """One run: its view, its positives and errors, and the changed and vanished files it found."""
    view = find_run(out, run_id)
    rows = run_rows(out, view["run_id"])

    def listed(df: pl.DataFrame, extra: list[str]) -> list[dict[str, Any]]:
        cols = ["key", "source", "member", "prob", *extra, "superseded"]
        return [dict(r) for r in df.select(cols).iter_rows(named=True)]

    positives = rows.filter((pl.col("status") == "ok") & pl.col("decision").fill_null(False))
    errors = rows.filter(pl.col("status") == "error")
    found = change_check.read_changes(out, view["run_id"])
    return {
        "schema": SHOW_SCHEMA,
        "out": str(out),
        "run": view,
        "positives": listed(positives.sort("prob", descending=True), []),
        "errors": listed(errors, ["error"]),
        "changed": [
            dict(r) for r in found.filter(pl.col("change") == "changed").iter_rows(named=True)
        ],
        "vanished": [
            dict(r) for r in found.filter(pl.col("change") == "vanished").iter_rows(named=True)
        ],
    }


def summary_json(out: Path, run_id: str, exit_code: int) -> dict[str, Any]:
    """What `cxr screen --summary-json` writes: the run's view and the command's exit code."""
    return {
        "schema": SUMMARY_SCHEMA,
        "out": str(out),
        "exit_code": exit_code,
        "run": find_run(out, run_id),
    }


def failure_json(out: Path, exit_code: int, message: str) -> dict[str, Any]:
    """The summary of a command that stopped before a run was recorded (exit code 1)."""
    return {
        "schema": SUMMARY_SCHEMA,
        "out": str(out),
        "exit_code": exit_code,
        "error": message,
        "run": None,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` to `path` atomically (a scheduler never reads half a file)."""
    import json
    import os

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise EngineError(f"{path}: cannot write the summary ({exc.strerror})") from None
