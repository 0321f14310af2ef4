"""One run's nightly bookkeeping, called by the runner under the output lock.

Before the run: resolve `--reference` (an unknown run id fails before any image is read) and
check the rows under the inputs for changed and vanished files (engine/nightly/changes.py);
with `--rescreen-changed` the changed keys are screened again. After the run: how many changed
files were rescreened, and the drift of this run's new images against the reference run
(engine/drift.py), both recorded in run.json.

"New images" of a run are its current rows with status ok (a rescreened file counts as new);
the reference's images are the current ok rows of the reference run (the first run that wrote
any, unless `--reference` names one). A reference image rescreened later belongs to the run
that rescreened it. Embeddings come from the index (it holds each key's current vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine import drift
from engine.errors import ConfigError, EngineError
from engine.io import parquet, vectors
from engine.nightly import changes as change_check


@dataclass
class Before:
    reference: str | None  # the run id --reference resolved to; None: the first run
    report: change_check.ChangeReport
    rescreen: bool

    def rescreen_keys(self) -> set[int]:
        return self.report.changed_keys() if self.rescreen else set()


def known_runs(previous: dict[str, Any] | None) -> list[str]:
    """Run ids recorded in run.json, oldest first."""
    if not previous:
        return []
    ids = [h.get("run_id") for h in previous.get("history", [])] + [previous.get("run_id")]
    return [i for i in ids if isinstance(i, str) and i]


def resolve_run(ids: list[str], wanted: str, *, what: str = "--reference") -> str:
    """`wanted` as a recorded run id, or a prefix of exactly one."""
    if wanted in ids:
        return wanted
    hits = sorted({i for i in ids if i.startswith(wanted)}) if wanted else []
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConfigError(
            f"{what} {wanted!r}: no such run recorded in run.json; `cxr runs OUT` lists them"
        )
    raise ConfigError(f"{what} {wanted!r} matches several runs: {', '.join(hits)}")


def before_run(
    out: Path,
    inputs: tuple[Path, ...],
    previous: dict[str, Any] | None,
    run_id: str,
    *,
    reference: str | None,
    rescreen_changed: bool,
) -> Before:
    resolved = resolve_run(known_runs(previous), reference) if reference else None
    report = change_check.check(
        out,
        inputs,
        run_id=run_id,
        previous_run_id=(previous or {}).get("run_id"),
        hash_unknown=rescreen_changed,
    )
    return Before(reference=resolved, report=report, rescreen=rescreen_changed)


def after_run(
    out: Path,
    before: Before,
    previous: dict[str, Any] | None,
    run_id: str,
    *,
    threshold: float,
    thresholds: drift.DriftThresholds,
    interrupted: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run.json "changes" record, its "drift" record)."""
    rows = parquet.read_predictions(out, ["key", "run_id", "status", "prob"])
    mine = rows.filter(pl.col("run_id") == run_id)
    record = before.report.to_json()
    record["rescreen_changed"] = before.rescreen
    rescreened = before.rescreen_keys() & set(mine["key"].to_list())
    record["rescreened"] = len(rescreened)
    change_check.remember_rescreened(out, before.report, rescreened)
    if interrupted:
        found = {"status": "skipped", "reason": "the run was interrupted"}
    else:
        try:
            found = measure_drift(
                out, rows, known_runs(previous), run_id, before.reference, threshold, thresholds
            )
        except EngineError as exc:  # the rows are written: record why, do not fail the run
            found = {"status": "failed", "reason": str(exc)}
    return record, found


def measure_drift(
    out: Path,
    rows: pl.DataFrame,
    order: list[str],
    run_id: str,
    reference: str | None,
    threshold: float,
    thresholds: drift.DriftThresholds,
) -> dict[str, Any]:
    ok = rows.filter((pl.col("status") == "ok") & pl.col("prob").is_not_null())
    present = set(ok["run_id"].drop_nulls().to_list())
    if reference is None:
        reference = next((r for r in [*order, run_id] if r in present), None)
    base: dict[str, Any] = {"reference": reference, "thresholds": thresholds.to_json()}
    if reference == run_id:
        return {**base, "status": "reference", "flagged": []}
    new = ok.filter(pl.col("run_id") == run_id)
    ref = ok.filter(pl.col("run_id") == reference) if reference else ok.clear()
    if new.height == 0:
        return {**base, "status": "no_new_images", "flagged": []}
    if ref.height < 2:
        reason = "the reference run has fewer than 2 current rows with status ok"
        return {**base, "status": "no_reference", "reason": reason, "flagged": []}
    ref_emb, new_emb = _sampled_vectors(out, ref["key"]), _sampled_vectors(out, new["key"])
    metrics = drift.compare(
        ref["prob"].to_numpy(), new["prob"].to_numpy(), threshold, ref_emb, new_emb
    )
    flags = drift.flagged(metrics, thresholds)
    status = "drift" if flags else "ok"
    if not flags and metrics.n_new < thresholds.min_images:
        status = "too_few_images"
    return {**base, "status": status, "flagged": flags, "metrics": metrics.to_json()}


def _sampled_vectors(out: Path, keys: pl.Series) -> np.ndarray | None:
    """Index vectors of at most drift.MAX_SAMPLE of `keys` (seeded), or None without any."""
    index = vectors.load_index(out, view=True)
    if index is None or len(index) == 0:
        return None
    ordered = np.sort(keys.to_numpy().astype(np.uint64))
    chosen = ordered[drift.sample_rows(len(ordered))]
    got = index.get(chosen, dtype=np.float32)
    if isinstance(got, np.ndarray):  # usearch answers one array when every key is present
        return got.reshape(len(chosen), -1)
    found = [np.asarray(v, np.float32) for v in got if v is not None]
    return np.stack(found) if found else None
