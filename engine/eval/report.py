"""`cxr evaluate --report DIR`: report.html (self-contained), roc.png, pr.png, reliability.png,
metrics.json.

The HTML embeds its images as base64 data URIs and carries its own CSS, so it can be mailed or
archived as one file; it links to nothing. Caveats come first: a reader who stops there still
knows what the numbers cannot say.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from engine.errors import EngineError
from engine.eval import metrics as m
from engine.eval import plots
from engine.eval.bootstrap import METHOD

if TYPE_CHECKING:
    from engine.eval.results import Evaluation, GroupScore

LABELS = m.METRIC_LABELS

CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.caveats { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5em 1em; }
.ci { color: #666; font-size: 0.9em; }
img { max-width: 32%; min-width: 20em; margin: 0.3em; border: 1px solid #ddd; }
"""


def write_report(evaluation: Evaluation, directory: Path) -> Path:
    """Write the report files into `directory`; returns the path of report.html."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        images = _plots(evaluation)
        for name, png in images.items():
            _atomic_write(directory / name, png)
        document = json.dumps(evaluation.to_json(), indent=2, allow_nan=False)
        _atomic_write(directory / "metrics.json", document.encode() + b"\n")
        html = render_html(evaluation, images)
        _atomic_write(directory / "report.html", html.encode())
    except OSError as exc:
        raise EngineError(
            f"--report {directory}: cannot write ({exc.strerror or exc}); choose a writable folder"
        ) from None
    return directory / "report.html"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _series(rows: pl.DataFrame, name: str) -> plots.Series:
    return plots.Series(
        name=name,
        y=rows["label"].to_numpy().astype(int),
        prob=rows["prob"].to_numpy().astype(float),
        decision=rows["decision"].to_numpy().astype(bool),
    )


def _plots(e: Evaluation) -> dict[str, bytes]:
    series = [_series(e.rows, "all")]
    for name in e.groups:
        series.append(_series(e.rows.filter(pl.col("group") == name), name))
    return {
        "roc.png": plots.roc_png(series),
        "pr.png": plots.pr_png(series),
        "reliability.png": plots.reliability_png(e.overall.calibration),
    }


def render_html(e: Evaluation, images: dict[str, bytes]) -> str:
    c = e.config
    scores = [e.overall, *e.groups.values()]
    figures = "".join(
        f'<img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in images.items()
    )
    caveats = "".join(f"<li>{escape(text)}</li>" for text in e.caveats)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cxr evaluate: {escape(str(c.out))}</title><style>{CSS}</style></head><body>",
        f"<h1>Evaluation of {escape(str(c.out))}</h1>",
        _facts(e),
        f'<h2>Caveats</h2><div class="caveats"><ul>{caveats or "<li>none found</li>"}</ul></div>',
        "<h2>Classification</h2>",
        _metrics_table(scores, c.by),
        _confusion_table(scores),
        f"<h2>Curves and calibration</h2><div>{figures}</div>",
        _retrieval_table(e),
        _methods(e),
        f"<p class='ci'>written {datetime.now(UTC).isoformat(timespec='seconds')}</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _facts(e: Evaluation) -> str:
    n, run = e.counts, e.run
    rows = [
        ("labels", str(e.config.labels)),
        ("model", f"{run.get('model_id')} (trained: {run.get('trained')})"),
        ("decision threshold(s)", ", ".join(f"{t:g}" for t in run.get("thresholds", []))),
        *n.rows(),
        ("patients evaluated", e.overall.patients),
        ("prediction rows without a label", n.unlabelled),
    ]
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _cell(g: GroupScore, name: str) -> str:
    text, ci = g.shown(name)
    if ci is None:
        return text
    return (
        f"{text} <span class='ci'>[{ci.low:.3f}, {ci.high:.3f}]"
        f"{'' if ci.valid == ci.resamples else f' n={ci.valid}'}</span>"
    )


def _metrics_table(scores: list[GroupScore], by: str | None) -> str:
    head = "".join(
        f"<th>{escape(g.name if g is scores[0] else f'{by} = {g.name}')}</th>" for g in scores
    )
    rows = "".join(
        f"<tr><td>{escape(LABELS[name])}</td>{''.join(f'<td>{_cell(g, name)}</td>' for g in scores)}</tr>"
        for name in m.METRICS
    )
    return (
        f"<table><tr><th>metric (95% CI; n = valid resamples if fewer)</th>{head}</tr>"
        f"{rows}</table>"
    )


def _confusion_table(scores: list[GroupScore]) -> str:
    head = "<tr><th>group</th><th>images</th><th>patients</th><th>positive</th>"
    head += "<th>negative</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th></tr>"
    body = "".join(
        f"<tr><td>{escape(g.name)}</td><td>{g.images}</td><td>{g.patients}</td>"
        f"<td>{g.positives}</td><td>{g.negatives}</td><td>{g.confusion.tp}</td>"
        f"<td>{g.confusion.fp}</td><td>{g.confusion.tn}</td><td>{g.confusion.fn}</td></tr>"
        for g in scores
    )
    return f"<table>{head}{body}</table>"


def _fmt(v: Any) -> str:
    return "undefined" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _retrieval_table(e: Evaluation) -> str:
    r = e.retrieval
    if r is None:
        return "<h2>Retrieval</h2><p>not measured (see the caveats)</p>"
    head = (
        "<tr><th>group</th><th>queries</th><th>precision@k</th><th>chance</th>"
        "<th>same-patient queries</th><th>same-patient hit rate</th></tr>"
    )
    body = ""
    for name, s in [("all", r.overall), *r.groups.items()]:
        j = s.to_json()
        cells = "".join(
            f"<td>{_fmt(j[f])}</td>"
            for f in (
                "queries",
                "precision_at_k",
                "chance_precision_at_k",
                "same_patient_queries",
                "same_patient_hit_rate",
            )
        )
        body += f"<tr><td>{escape(name)}</td>{cells}</tr>"
    return f"<h2>Retrieval (k = {r.neighbours})</h2><table>{head}{body}</table>"


def _methods(e: Evaluation) -> str:
    c = e.config
    items = [
        f"Confidence intervals: {METHOD}; {c.bootstrap} resamples, seed {c.seed}.",
        f"Calibration: {m.ECE_BINNING}.",
        "Decisions: each row's own `decision` from the run (prob >= its threshold).",
        "PR AUC is average precision (step-wise, as scikit-learn's average_precision_score); "
        "ROC AUC counts tied scores between classes as half.",
        "Matching: a label path resolved against the images root equals a screened file, or "
        "ends an archive member at a folder boundary.",
        "Retrieval: exact cosine search among the evaluated images, the query itself excluded; "
        "precision@k is the share of neighbours with the query's label, chance what random "
        "neighbours would give; the same-patient hit rate counts queries whose patient has at "
        "least two evaluated images.",
    ]
    return "<h2>Methods</h2><ul>" + "".join(f"<li>{escape(t)}</li>" for t in items) + "</ul>"
