"""The `cxr` command. The only place where exceptions become exit codes and messages.

Exit codes (also in the README):
  0  every image in the output directory was screened (status "ok")
  1  fatal error: nothing or only part was done (bad models, output directory in use, ...)
  2  the command line cannot be parsed (unknown option, missing argument, wrong type);
     an option value that parses but is invalid (--batch-size 0) is a fatal error: 1
  3  the run finished, but some images could not be screened (they are rows with status "error")
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
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import EngineError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_IMAGE_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Screen chest X-ray archives: lung segmentation + ResNet50, Parquet + usearch output.",
)
models_app = typer.Typer(no_args_is_help=True, help="Export and inspect models.")
app.add_typer(models_app, name="models")
train_app = typer.Typer(
    no_args_is_help=True, help="Train the segmenter and the classifier (needs the `train` extra)."
)
app.add_typer(train_app, name="train")

out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def fatal_errors() -> Iterator[None]:
    """EngineError -> message on stderr and exit code 1; Ctrl-C -> 130."""
    try:
        yield
    except EngineError as exc:
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(EXIT_FATAL) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def screen(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Image files, directories, .tar/.tar.gz/.tgz/.zip archives."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable).")],
    models: Annotated[
        Path | None, typer.Option(help="Models directory (default: the models shipped with cxr).")
    ] = None,
    backend: Annotated[str, typer.Option(help="auto | onnxruntime | tensorrt | null")] = "auto",
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
    progress: Annotated[bool, typer.Option(help="Progress bar on a terminal.")] = True,
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
    from engine.config import ScreenConfig, default_threads
    from engine.runner import screen as run_screen

    with fatal_errors():
        config = ScreenConfig(
            inputs=tuple(inputs),
            out=out,
            models=models,
            backend=backend,  # type: ignore[arg-type]  # validated by ScreenConfig
            precision=precision,
            decoder=decoder,
            batch_size=batch_size,
            threshold=threshold,
            embeddings_in_parquet=embeddings_in_parquet,
            shard_size=shard_size,
            max_pixels=max_pixels,
            min_side=min_side,
            threads=default_threads() if threads is None else threads,
            progress=progress,
            ray=ray,
            ray_actor_cpus=ray_actor_cpus,
        )
        with _progress(config.progress and err_console.is_terminal) as advance:
            summary = run_screen(config, on_progress=advance)
    _print_summary(summary)
    if summary.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_IMAGE_ERRORS if summary.total_errors else EXIT_OK)


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


def _print_summary(s) -> None:  # s: engine.runner.RunSummary
    table = Table(
        title=f"cxr screen -> {escape(str(s.out))}", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row("backend", s.backend)
    table.add_row("decoder", s.decoder)
    table.add_row("models", s.model_id + ("" if s.trained else "  [bold red]UNTRAINED[/]"))
    table.add_row("screened now", str(s.processed))
    table.add_row("ok", str(s.ok))
    table.add_row("errors", f"[red]{s.errors}[/]" if s.errors else "0")
    table.add_row("positives", str(s.positives))
    table.add_row("already in output (skipped)", str(s.skipped_existing))
    table.add_row("non-image files ignored", str(s.ignored_files))
    table.add_row("images/s", f"{s.images_per_s:.1f}  ({s.wall_s:.1f} s)")
    table.add_row("rows in output / errors", f"{s.total_rows} / {s.total_errors}")
    table.add_row("index size", str(s.index_size))
    out_console.print(table)
    for message in s.error_samples[:10]:
        out_console.print(f"  [red]error[/] {escape(message)}", highlight=False, soft_wrap=True)
    if s.errors > 10:
        out_console.print(
            f"  ... {s.errors - 10} more: rows with status 'error' in {s.out}/predictions"
        )
    if not s.trained:
        out_console.print(
            "[bold red]WARNING: the models are UNTRAINED (random weights from `cxr models init`). "
            "Probabilities and decisions are meaningless; do not use them for screening.[/]"
        )
    if s.interrupted:
        out_console.print(
            "[yellow]interrupted: rerun the same command to finish (nothing is lost).[/]"
        )


@app.command()
def similar(
    query: Annotated[str, typer.Argument(help="An image file, or the key of a screened image.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory of cxr screen.")],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    models: Annotated[
        Path | None, typer.Option(help="Models directory (default: the one the run used).")
    ] = None,
) -> None:
    """The k screened cases most similar to QUERY (cosine similarity of embeddings)."""
    from engine.similar import similar as find_similar

    with fatal_errors():
        result = find_similar(out, query, k=k, models_dir=models)
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


@models_app.command("init")
def models_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the models into.")],
    tiny: Annotated[
        bool, typer.Option(help="Tiny architectures (for tests and quick demos).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Export the segmenter (U-Net) and classifier (ResNet50) UNTRAINED, with manifests."""
    from engine.models import init_models

    with fatal_errors():
        ms = init_models(out, size="tiny" if tiny else "full", seed=seed)
    for m in (ms.segmenter, ms.classifier):
        out_console.print(
            f"{m.role:10s} {m.architecture:16s} {m.onnx_path}  sha256 {m.sha256[:16]}"
        )
    out_console.print(
        "[bold yellow]These models are UNTRAINED (random weights): use them to test the "
        "pipeline, not to screen.[/]"
    )


@models_app.command("pack")
def models_pack(
    models: Annotated[Path, typer.Option("--models", help="Trained models directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the lean copy.")],
    classifier: Annotated[
        str,
        typer.Option(
            help="int8 (QDQ export, with a w8 export for TensorRT's float plans) | fp16 "
            "(float16-stored weights)."
        ),
    ] = "int8",
) -> None:
    """A lean copy of a models directory for shipping (the chosen classifier export)."""
    from engine.models import pack_models

    with fatal_errors():
        ms = pack_models(models, out, classifier_precision=classifier)
    for m in (ms.segmenter, ms.classifier):
        size = m.onnx_path.stat().st_size / 1e6
        out_console.print(f"{m.role:10s} {m.precision:5s} {m.onnx_path}  {size:.1f} MB")
        for precision, v in m.variants.items():
            path = m.directory / v.onnx
            size = path.stat().st_size / 1e6
            out_console.print(f"{'':10s} {precision:5s} {path}  {size:.1f} MB")


def _register_subcommands() -> None:
    # Each command's module is imported only when its command runs (lazy imports inside).
    from engine.bench import bench
    from engine.build import build
    from engine.eval.cli import evaluate
    from engine.serve.cli import serve
    from engine.train.cli import train_classifier, train_int8, train_segmenter

    app.command("evaluate", help="Score a screening run against labels (metrics with CIs).")(
        evaluate
    )
    app.command("bench", help="Measure throughput against a naive baseline (benchmarks/).")(bench)
    train_app.command("segmenter", help="Train the lung U-Net on image/mask pairs.")(
        train_segmenter
    )
    train_app.command("classifier", help="Train the ResNet50 on lung crops.")(train_classifier)
    train_app.command(
        "int8", help="Redo a trained classifier's INT8 export (calibrate, tune, parity)."
    )(train_int8)
    app.command("serve", help="Review a screening run in the browser (local web app).")(serve)
    app.command(
        "build", help="Compile the models into TensorRT plans (needs a GPU + `gpu` extra)."
    )(build)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
