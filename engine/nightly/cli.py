"""`cxr runs OUT [--json] [--show RUN_ID]`: the runs recorded in an output directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from engine.console import fatal_errors, out_console


def runs(
    out: Annotated[Path, typer.Argument(help="Output directory of cxr screen.")],
    show: Annotated[
        str | None,
        typer.Option(help="One run (id or unique prefix): its positives, errors and changes."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """The runs recorded in OUT/run.json: counts, speed, models, changes and drift per run."""
    from engine.nightly import runs as recorded

    with fatal_errors():
        doc = recorded.show_run(out, show) if show else recorded.runs_json(out)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    elif show:
        _print_run(doc)
    else:
        _print_runs(out, doc["runs"])


def _time(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")


def _num(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def drift_text(d: dict[str, Any] | None) -> str:
    """One line on a run's drift record, with rich markup."""
    if not d:
        return ""
    status = d.get("status")
    ref = d.get("reference") or "?"
    m = d.get("metrics") or {}
    figures = ""
    if m:
        parts = [f"psi {m['psi']:.3f}", f"positive rate {m['positive_rate_change']:+.3f}"]
        if m.get("embedding_shift") is not None:
            parts.append(f"shift {m['embedding_shift']:.4f}")
        if m.get("ood_share") is not None:
            parts.append(f"OOD {m['ood_share']:.1%}")
        figures = f" ({', '.join(parts)}; {m.get('n_new')} new)"
    if status == "drift":
        return f"[bold red]DRIFT[/] {', '.join(d.get('flagged', []))} vs {ref}{figures}"
    if status == "ok":
        return f"ok vs {ref}{figures}"
    if status == "too_few_images":
        t = (d.get("thresholds") or {}).get("min_images")
        return f"not judged (fewer than {t} new images) vs {ref}{figures}"
    if status == "reference":
        return "reference run"
    if status == "no_new_images":
        return "no new images"
    return escape(f"{status}: {d.get('reason', '')}")


def drift_word(d: dict[str, Any] | None) -> str:
    """The drift status in a word or two, for the runs table."""
    if not d:
        return ""
    status = d.get("status")
    if status == "drift":
        return f"[bold red]DRIFT[/] {', '.join(d.get('flagged', []))}"
    words = {"too_few_images": "not judged", "no_new_images": "no new images"}
    return escape(words.get(status or "", status or ""))


def _print_runs(out: Path, views: list[dict[str, Any]]) -> None:
    console = out_console
    if not views:
        console.print(f"no runs recorded in {escape(str(out))}")
        return
    # one output directory holds one set of models (cxr screen refuses to mix them)
    for model_id, precision in dict.fromkeys((v["model_id"], _precision(v)) for v in views):
        console.print(f"models {escape(model_id or '?')} ({precision})", highlight=False)
    counts = _table(f"runs in {escape(str(out))}")
    for col in ("run", "started", "status"):
        counts.add_column(col, no_wrap=True)
    for col in ("new", "resc", "skip", "err", "pos", "gone", "img/s"):
        counts.add_column(col, justify="right", no_wrap=True)
    about = _table(None)
    for col in ("run", "ended", "host", "drift"):
        about.add_column(col, overflow="fold", no_wrap=col != "drift")
    for v in views:
        images, changes = v["images"], v["changes"] or {}
        counts.add_row(
            v["run_id"],
            _time(v["started_at"])[5:16],
            v["status"] or "",
            _num(images["new"]),
            _num(images["rescreened"]),
            _num(images["skipped"]),
            _num(images["errors"]),
            _num(images["positives"]),
            _num(changes.get("vanished")),
            _num(v["images_per_s"], "{:.1f}"),
        )
        about.add_row(
            v["run_id"],
            _time(v["ended_at"])[5:16],
            escape(v["host"] or ""),
            drift_word(v["drift"]),
        )
    console.print(counts)
    console.print(
        "started, ended: UTC. new: images screened for the first time; resc: changed files "
        "screened again; skip: already in the output; err: error rows written; pos: positives; "
        "gone: files vanished since screened. Drift figures: cxr runs OUT --show RUN_ID.",
        highlight=False,
    )
    console.print(about)


def _precision(v: dict[str, Any]) -> str:
    p = v["precision"] or {}
    return f"segmenter {p.get('segmenter') or '?'}, classifier {p.get('classifier') or '?'}"


def _table(title: str | None) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.padding = (0, 1, 0, 0)
    return table


def _print_run(doc: dict[str, Any]) -> None:
    console = out_console
    v = doc["run"]
    images = v["images"]
    console.print(
        f"run [bold]{v['run_id']}[/] ({v['status']}), {_time(v['started_at'])} - "
        f"{_time(v['ended_at'])} UTC on {escape(v['host'] or '?')}: {images['new']} new, "
        f"{images['rescreened'] or 0} rescreened, {images['skipped']} skipped, "
        f"{images['errors']} errors, {images['positives']} positives",
        highlight=False,
    )
    if v["drift"]:
        console.print(f"drift: {drift_text(v['drift'])}", highlight=False)
    console.print(
        f"review them: cxr serve {escape(doc['out'])}, then #/images?run={v['run_id']}",
        highlight=False,
    )
    _rows_table(f"positives ({len(doc['positives'])})", doc["positives"], ["prob"])
    _rows_table(f"errors ({len(doc['errors'])})", doc["errors"], ["error"])
    _rows_table(f"changed since screened ({len(doc['changed'])})", doc["changed"], [])
    _rows_table(f"vanished since screened ({len(doc['vanished'])})", doc["vanished"], [])


def _rows_table(title: str, rows: list[dict[str, Any]], extra: list[str]) -> None:
    if not rows:
        out_console.print(f"{title}: none", highlight=False)
        return
    table = _table(title)
    for col in ("key", "source", "member", *extra):
        table.add_column(col, overflow="fold")
    superseded = False
    for r in rows:
        cells = [str(r["key"]), escape(r["source"] or ""), escape(r["member"] or "")]
        for col in extra:
            value = r.get(col)
            cells.append(f"{value:.3f}" if isinstance(value, float) else escape(str(value or "")))
        if r.get("superseded"):
            superseded = True
            cells[0] += " *"
        table.add_row(*cells)
    out_console.print(table)
    if superseded:
        out_console.print("  * superseded: the file was rescreened by a later run")
