"""The `cxr` command: the app, `screen` and `similar`. The other commands and groups (models,
train, index, eval, evaluate, bench, serve, runs, build) are defined beside their code and only
mounted here; all of them turn exceptions into exit codes and messages the one way,
engine/console.py's `fatal_errors`.

Exit codes (also in the README):
  0  every image in the output directory was screened (status "ok")
  1  fatal error: nothing or only part was done (bad models, output directory in use, ...)
  2  the command line cannot be parsed (unknown option, missing argument, wrong type);
     an option value that parses but is invalid (--batch-size 0) is a fatal error: 1
  3  the run finished, but some images could not be screened (they are rows with status "error")
  4  no image found: no INPUT held anything to screen (empty directories, only non-image files)
  5  the run finished and --fail-on-drift was given, and its new images drifted past a threshold
     (run.json "drift"); takes precedence over 3
  130 interrupted (Ctrl-C); what was finished is kept, rerun the same command to resume
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from engine import index_cli, models_cli, runtime
from engine.console import (
    EXIT_DRIFT,
    EXIT_FATAL,
    EXIT_IMAGE_ERRORS,
    EXIT_INTERRUPTED,
    EXIT_NO_IMAGES,
    EXIT_OK,
    EXIT_USAGE,
    err_console,
    fatal_errors,
    out_console,
)
from engine.errors import EngineError
from engine.eval import cli as eval_cli
from engine.train import cli as train_cli

# The exit codes of the table above are defined in engine/console.py, beside `fatal_errors`;
# exported here too.
__all__ = [
    "EXIT_DRIFT",
    "EXIT_FATAL",
    "EXIT_IMAGE_ERRORS",
    "EXIT_INTERRUPTED",
    "EXIT_NO_IMAGES",
    "EXIT_OK",
    "EXIT_USAGE",
    "app",
    "main",
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Screen chest X-ray archives: lung segmentation + ResNet50, Parquet + usearch output.",
)
app.add_typer(models_cli.app, name="models")
app.add_typer(train_cli.app, name="train")
app.add_typer(index_cli.app, name="index")
app.add_typer(eval_cli.app, name="eval")


@app.command()
def screen(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Image files, directories, .tar/.tar.gz/.tgz/.zip archives."),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="DIR", help="Output directory (resumable).")
    ],
    models: Annotated[
        Path | None, typer.Option(help="Models directory (default: the models shipped with cxr).")
    ] = None,
    backend: Annotated[str, typer.Option(help=runtime.choices_text())] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="auto | fp32 | fp16 | w8 | int8: which export runs (auto: INT8 where its parity "
            "with FP32 is recorded good, else the model's own)."
        ),
    ] = "auto",
    decoder: Annotated[
        str,
        typer.Option(
            help="CPU preprocessing: auto | dali | pillow | pillow-draft (auto: the fastest CPU "
            "decoder that agrees with DALI, see README; DALI on the GPU)."
        ),
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    threshold: Annotated[
        float | None, typer.Option(help="Decision threshold on prob (default: the model's).")
    ] = None,
    embeddings_in_parquet: Annotated[
        bool, typer.Option(help="Also store each embedding in the Parquet rows.")
    ] = False,
    shard_size: Annotated[int, typer.Option(help="Rows per Parquet part.")] = 256,
    max_pixels: Annotated[
        int, typer.Option(help="Refuse images above this many pixels (decompression bombs).")
    ] = 100_000_000,
    min_side: Annotated[int, typer.Option(help="Refuse images with a side below this.")] = 32,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    decode_workers: Annotated[
        int,
        typer.Option(
            help="Threads that read images side by side (sha256, header, DICOM) and, with the "
            "Pillow decoders, decode them (0: as many as --threads).",
        ),
    ] = 0,
    progress: Annotated[bool, typer.Option(help="Progress bar on a terminal.")] = True,
    rescreen_changed: Annotated[
        bool,
        typer.Option(
            help="Screen again files whose content changed since their row was written (the "
            "old row is kept as history; the index gets the new vector)."
        ),
    ] = False,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Run id (or a unique prefix) to measure drift against (default: the first run)."
        ),
    ] = None,
    drift_threshold: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE, repeatable: psi, positive_rate, embedding_shift, ood_share, "
            "min_images (defaults in docs/nightly.md)."
        ),
    ] = None,
    fail_on_drift: Annotated[
        bool, typer.Option(help=f"Exit with code {EXIT_DRIFT} when this run's images drifted.")
    ] = False,
    summary_json: Annotated[
        Path | None,
        typer.Option(help="Also write this run's summary as JSON here (for a scheduler)."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Screen on a Ray cluster (needs the ray extra): auto (RAY_ADDRESS, else a "
            "running `ray start`), local, or an address. --out and the inputs must be on a "
            "filesystem every node mounts at the same path.",
        ),
    ] = None,
    ray_actor_cpus: Annotated[
        int, typer.Option(help="With --ray: CPUs per ONNX Runtime actor (0: a CPU node's cores).")
    ] = 0,
) -> None:
    """Screen every image of INPUT... into --out: one Parquet row per image + usearch index."""
    from engine.config import ScreenConfig, default_threads, output_path
    from engine.drift import DriftThresholds
    from engine.runner import screen as run_screen

    with fatal_errors(), _summary_on_failure(summary_json, out):
        config = ScreenConfig(
            inputs=tuple(inputs),
            out=output_path(out),
            models=models,
            backend=backend,
            precision=precision,
            decoder=decoder,
            batch_size=batch_size,
            threshold=threshold,
            embeddings_in_parquet=embeddings_in_parquet,
            shard_size=shard_size,
            max_pixels=max_pixels,
            min_side=min_side,
            threads=default_threads() if threads is None else threads,
            decode_workers=decode_workers,
            progress=progress,
            rescreen_changed=rescreen_changed,
            reference=reference,
            drift_thresholds=DriftThresholds.parse(drift_threshold or []),
            fail_on_drift=fail_on_drift,
            ray=ray,
            ray_actor_cpus=ray_actor_cpus,
        )
        with _progress(config.progress and err_console.is_terminal) as advance:
            summary = run_screen(config, on_progress=advance)
    _print_summary(summary)
    if summary.interrupted:
        code = EXIT_INTERRUPTED
    elif summary.found_nothing:
        code = EXIT_NO_IMAGES
    elif config.fail_on_drift and summary.drift_flagged:
        code = EXIT_DRIFT
    else:
        code = EXIT_IMAGE_ERRORS if summary.total_errors else EXIT_OK
    if summary_json is not None:
        from engine.nightly import runs

        with fatal_errors():
            runs.write_json(summary_json, runs.summary_json(config.out, summary.run_id, code))
    raise typer.Exit(code)


@contextmanager
def _summary_on_failure(path: Path | None, out: str) -> Iterator[None]:
    """A command that fails still leaves tonight's summary for the scheduler (exit code 1)."""
    try:
        yield
    except (EngineError, KeyboardInterrupt) as exc:
        if path is not None:
            from engine.nightly import runs

            code = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_FATAL
            try:
                runs.write_json(path, runs.failure_json(Path(out), code, str(exc) or "interrupted"))
            except EngineError as also:
                err_console.print(f"[bold red]error:[/] {escape(str(also))}", highlight=False)
        raise


@contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("screening {task.completed:>7.0f} images"),
        TextColumn("[red]{task.fields[errors]}"),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("screen", total=None, rate="", errors="")
        error_count = 0

        def advance(n: int, errors: int = 0) -> None:
            nonlocal error_count
            if errors:  # reported by the cluster executor (`--ray`), per shard
                error_count += errors
                bar.update(task, errors=f"{error_count} errors")
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:6.1f} img/s" if speed else "")

        yield advance


def _print_summary(s) -> None:  # s: engine.run_record.RunSummary
    table = Table(
        title=f"cxr screen -> {escape(str(s.out))}", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row("backend", s.backend)
    table.add_row("decoder", s.decoder)
    table.add_row("models", s.model_id + ("" if s.trained else "  [bold red]UNTRAINED[/]"))
    for role, why in s.precision_why.items():
        table.add_row(f"{role} precision", escape(why))
    table.add_row("screened now", str(s.processed))
    table.add_row("ok", str(s.ok))
    table.add_row("errors", f"[red]{s.errors}[/]" if s.errors else "0")
    table.add_row("positives", str(s.positives))
    table.add_row("already in output (skipped)", str(s.skipped_existing))
    table.add_row("non-image files ignored", str(s.ignored_files))
    table.add_row("images/s", f"{s.images_per_s:.1f}  ({s.wall_s:.1f} s)")
    table.add_row("rows in output / errors", f"{s.total_rows} / {s.total_errors}")
    table.add_row("index size", str(s.index_size))
    _nightly_rows(table, s)
    out_console.print(table)
    for message in s.error_samples[:10]:
        out_console.print(f"  [red]error[/] {escape(message)}", highlight=False, soft_wrap=True)
    if s.errors > 10:
        out_console.print(
            f"  ... {s.errors - 10} more: rows with status 'error' in {s.out}/predictions"
        )
    for path in s.empty_inputs:
        out_console.print(
            f"[yellow]WARNING: {escape(path)} holds no image (image files are "
            ".png .jpg .jpeg .dcm .dicom .dic, or DICOM by content)[/]",
            highlight=False,
            soft_wrap=True,
        )
    if s.found_nothing:
        out_console.print(
            "[bold red]WARNING: no images found in INPUT: nothing was screened (exit code 4).[/]",
            highlight=False,
        )
    indexable = s.total_rows - s.total_errors
    if s.index_size < indexable and not s.interrupted:
        out_console.print(
            f"[bold red]WARNING: the index holds {s.index_size} of the {indexable} screened "
            f"images: `cxr index rebuild {escape(str(s.out))}` rebuilds it.[/]",
            soft_wrap=True,
        )
    if not s.trained:
        out_console.print(
            "[bold red]WARNING: the models are UNTRAINED (random weights from `cxr models init`). "
            "Probabilities and decisions are meaningless; do not use them for screening.[/]"
        )
    for kind in ("changed", "vanished"):
        for where in (s.changes.get(f"{kind}_samples") or [])[:5]:
            out_console.print(
                f"  [yellow]{kind}[/] {escape(where)}", highlight=False, soft_wrap=True
            )
    if s.interrupted:
        out_console.print(
            "[yellow]interrupted: rerun the same command to finish (nothing is lost).[/]"
        )


def _nightly_rows(table: Table, s) -> None:  # s: engine.run_record.RunSummary
    c = s.changes
    if c:
        rescreened = f" ({c.get('rescreened', 0)} rescreened)" if c.get("rescreen_changed") else ""
        table.add_row("changed since screened", f"{c.get('changed', 0)}{rescreened}")
        vanished = c.get("vanished", 0)
        new = f" ({c.get('new_vanished', 0)} new)" if vanished else ""
        table.add_row("vanished since screened", f"[yellow]{vanished}[/]{new}" if vanished else "0")
    d = s.drift
    if d:
        from engine.nightly.cli import drift_text

        table.add_row("drift", drift_text(d))


@app.command()
def similar(
    query: Annotated[str, typer.Argument(help="An image file, or the key of a screened image.")],
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="DIR", help="Output directory of cxr screen.")
    ],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    models: Annotated[
        Path | None, typer.Option(help="Models directory (default: the one the run used).")
    ] = None,
) -> None:
    """The k screened cases most similar to QUERY (cosine similarity of embeddings)."""
    from engine.config import output_path
    from engine.similar import similar as find_similar

    with fatal_errors():
        result = find_similar(output_path(out), query, k=k, models_dir=models)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    table = Table(title=f"most similar to {query}", title_justify="left")
    for col in ("rank", "similarity", "prob", "decision", "key", "source", "member"):
        table.add_column(col)
    for n in result.neighbours:
        table.add_row(
            str(n.rank),
            f"{n.similarity:.4f}",
            "" if n.prob is None else f"{n.prob:.3f}",
            "" if n.decision is None else ("positive" if n.decision else "negative"),
            str(n.key),
            escape(n.source),
            escape(n.member or ""),
        )
    out_console.print(table)


def _register_subcommands() -> None:
    # Commands defined beside their code; their modules import heavy libraries (polars, torch,
    # TensorRT, ...) only when the command runs.
    from engine.bench import bench
    from engine.build import build
    from engine.nightly.cli import runs
    from engine.serve.cli import serve

    app.command("evaluate", help="Score a screening run against labels (metrics with CIs).")(
        eval_cli.evaluate
    )
    app.command("bench", help="Measure throughput against a naive baseline (benchmarks/).")(bench)
    app.command("serve", help="Review a screening run in the browser (local web app).")(serve)
    app.command("runs", help="The runs recorded in an output directory (nightly jobs).")(runs)
    app.command(
        "build", help="Compile the models into TensorRT plans (needs a GPU + `gpu` extra)."
    )(build)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
