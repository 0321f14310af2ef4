"""The `cxr evaluate` command and the `cxr eval` group (engine/cli.py registers and mounts them).

`cxr evaluate`: EngineError -> message and exit code 1 through engine.console's `fatal_errors`,
a rich table on stdout, or `--json` for a JSON document. `cxr eval release | card |
segmentation`: the commands of engine/eval/release.py, card.py and segmentation.py, which also
run as `python -m engine.eval.NAME`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from engine.console import config_from_options, fatal_errors, out_console
from engine.eval.card import card_command
from engine.eval.release import release_command
from engine.eval.segmentation import segmentation_command

if TYPE_CHECKING:
    from engine.eval.results import Evaluation

app = typer.Typer(
    no_args_is_help=True,
    help="Release a trained model with its evidence and card (release and segmentation need "
    "the `train` extra).",
)
app.command(
    "release", help="Pack, parity, test evaluation, shortcut check, card, install in one go."
)(release_command)
app.command("card", help="Render a model card from the manifests and evaluation JSONs.")(
    card_command
)
app.command("segmentation", help="Recompute the segmenter's Dice per split against its card.")(
    segmentation_command
)


def evaluate(
    ctx: typer.Context,
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT_DIR", help="Output directory of a `cxr screen` run.")
    ],
    labels: Annotated[
        Path,
        typer.Option(
            help="CSV with columns path, label (1 = COVID-19, 0 = negative), "
            "optional patient_id and any columns for --by."
        ),
    ],
    images: Annotated[
        Path | None,
        typer.Option(help="Folder the CSV's paths are relative to (default: the CSV's folder)."),
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="Also score each group of this CSV column, e.g. source.")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write report.html (self-contained), PNG plots and metrics.json here."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples (of patients) for the 95% CIs; 0: none.")
    ] = 2000,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query for retrieval quality.")] = 5,
) -> None:
    """Score a `cxr screen` run against labels: metrics with patient-bootstrap CIs, per group,
    calibration, retrieval quality of the index; optionally an HTML report."""
    from engine.eval.evaluate import evaluate as run_evaluation
    from engine.eval.results import EvalConfig

    with fatal_errors():
        result = run_evaluation(config_from_options(EvalConfig, ctx, out=out_dir))
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
        return
    for table in tables(result):
        out_console.print(table)
    for note in result.caveats:
        out_console.print(f"[yellow]caveat:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if result.report_html is not None:
        out_console.print(f"report: {escape(str(result.report_html))}", highlight=False)


def tables(e: Evaluation) -> list[Table]:
    from engine.eval.metrics import METRIC_LABELS as LABELS
    from engine.eval.metrics import METRICS

    n = e.counts
    counts = Table(
        title=escape(f"cxr evaluate {e.config.out}"), show_header=False, title_justify="left"
    )
    counts.add_column(style="bold")
    counts.add_column()
    for name, value in (
        *n.rows(),
        ("patients", e.overall.patients),
        ("thresholds", ", ".join(f"{t:g}" for t in e.run.get("thresholds", []))),
    ):
        counts.add_row(name, str(value))
    scores = [e.overall, *e.groups.values()]
    metrics = Table(title="metrics (95% CI, patient bootstrap)", title_justify="left")
    metrics.add_column("metric")
    for g in scores:
        name = g.name if g is e.overall else f"{e.config.by}={g.name}"
        metrics.add_column(escape(name), justify="right")
    for name in METRICS:
        metrics.add_row(LABELS[name], *(_cell(g, name) for g in scores))
    for label, attr in (("TP", "tp"), ("FP", "fp"), ("TN", "tn"), ("FN", "fn")):
        metrics.add_row(label, *(str(getattr(g.confusion, attr)) for g in scores))
    return [counts, metrics, *_retrieval_table(e)]


def _cell(g, name: str) -> str:
    text, ci = g.shown(name)
    return text if ci is None else f"{text} [{ci.low:.3f}, {ci.high:.3f}]"


def _retrieval_table(e: Evaluation) -> list[Table]:
    r = e.retrieval
    if r is None:
        return []
    t = Table(title=f"retrieval (k = {r.neighbours}, exact search)", title_justify="left")
    for col in ("group", "queries", "precision@k", "chance", "same-patient hit rate (queries)"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for name, s in [("all", r.overall), *r.groups.items()]:
        hit = s.same_patient_hit_rate
        t.add_row(
            escape(name),
            str(s.queries),
            f"{s.precision_at_k:.3f}",
            f"{s.chance_precision_at_k:.3f}",
            ("undefined" if hit != hit else f"{hit:.3f}") + f" ({s.same_patient_queries})",
        )
    return [t]
