"""`cxr bench`: the throughput benchmark of benchmarks/bench_screen.py as a command.

Registered in engine/cli.py with ``app.command("bench")(bench)``. The measuring code lives in
benchmarks/ (plain scripts beside the package, not installed with it), so the command needs a
source checkout; from an installed wheel it says so and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from engine.console import fatal_errors
from engine.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[1]


def _bench_screen():
    """Import benchmarks.bench_screen from the checkout this package runs from."""
    if not (CHECKOUT / "benchmarks" / "bench_screen.py").is_file():
        raise ConfigError(
            f"cxr bench needs the benchmarks/ folder of a source checkout (looked in {CHECKOUT}); "
            "install cxr-engine from a clone (`pip install -e .`) or run "
            "`python -m benchmarks.bench_screen` there"
        )
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    from benchmarks import bench_screen

    return bench_screen


def bench(
    archive: Annotated[
        Path | None,
        typer.Option(help="Images to screen: a tree (benchmarks/make_archive.py) or a .tar."),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(help="Models directory (default: the full architectures, untrained)."),
    ] = None,
    precision: Annotated[str, typer.Option(help="Comma list of fp32, int8.")] = "fp32,int8",
    batch_size: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "16",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    thread_split: Annotated[
        str, typer.Option(help="DECODE:ORT thread pairs, e.g. 1:2,2:2 (default: THREADS:THREADS).")
    ] = "",
    decoder: Annotated[
        str,
        typer.Option(
            help="Comma list of auto (the engine's default, unpatched), dali, pillow, "
            "pillow-draft, pillow-draftK."
        ),
    ] = "dali",
    decode_workers: Annotated[
        str,
        typer.Option(
            help="Comma list of `cxr screen --decode-workers` values (0: as many as the decode "
            "threads, the engine's default)."
        ),
    ] = "0",
    limit: Annotated[int | None, typer.Option(help="Screen only the first N images.")] = None,
    naive_limit: Annotated[int, typer.Option(help="Images for the naive baseline.")] = 100,
    warmup: Annotated[
        int | None, typer.Option(help="Warm-up images per configuration (default: 2 batches).")
    ] = None,
    configs: Annotated[
        str, typer.Option(help="Comma list of model-only, naive, null, engine.")
    ] = "model-only,naive,null,engine",
    quality: Annotated[
        bool, typer.Option(help="Agreement of each configuration with the FP32 reference.")
    ] = True,
    quality_limit: Annotated[
        int | None, typer.Option(help="Dev images screened per configuration (default: all).")
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(help="JSON lines file (default: benchmarks/results/screen.jsonl)."),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep run outputs here (default: a temporary folder).")
    ] = None,
) -> None:
    """Measure `cxr screen` images/s against a naive baseline and the model-only ceiling."""
    with fatal_errors():
        bs = _bench_screen()
        defaults = bs.BenchOptions()
        opts = bs.BenchOptions(
            archive=archive,
            models=models,
            precisions=bs.split_words(precision),
            batch_sizes=bs.split_ints(batch_size),
            threads=threads if threads is not None else defaults.threads,
            thread_splits=bs.parse_splits(thread_split),
            decoders=bs.split_words(decoder),
            decode_workers=bs.split_ints(decode_workers, "--decode-workers"),
            limit=limit,
            naive_limit=naive_limit,
            warmup=warmup,
            configs=bs.split_words(configs),
            quality=quality,
            quality_limit=quality_limit,
            results=results if results is not None else defaults.results,
            workdir=workdir,
        )
        bs.run_bench(opts)
