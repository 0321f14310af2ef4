"""Orchestration of `cxr screen`: check the output, screen the inputs, record the run.

The steps have their own modules: the reader side (engine/io/reader.py), the Screener
(engine/screener.py), images in and rows out (engine/screening.py), the shard writer
(engine/io/writer.py) and the run record (engine/run_record.py). `screen` runs them on one
machine under the output lock, with the nightly change and drift checks around the run, or
hands the run to the Ray executor (engine/distributed/executor.py) with --ray.

Every image ends as exactly one row. Rows collect into shards; a shard's embeddings sidecar is
written first and its Parquet part last (the commit point), so a run killed at any moment and
rerun ends with every image once in Parquet and once in the index.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from engine.config import ScreenConfig
from engine.errors import OutputError
from engine.io.archive import ArchiveStats, iter_items
from engine.io.outdir import OutputLock, read_run_json, write_run_json
from engine.io.resume import check_resumable, resume
from engine.io.writer import ShardWriter
from engine.models import load_models
from engine.nightly import monitor
from engine.run_record import RunSummary, run_record
from engine.screener import Screener, embedding_dim
from engine.screening import common_columns, screen_items

ProgressFn = Callable[[int], None]


def screen(config: ScreenConfig, *, on_progress: ProgressFn | None = None) -> RunSummary:
    """Screen config.inputs into config.out; resumable, exactly once per image."""
    if config.ray is not None:  # the same shards on a Ray cluster; ray is imported only here
        from engine.distributed.executor import screen as screen_on_ray

        return screen_on_ray(config, on_progress=on_progress)
    models = load_models(config.models, precision=config.precision).with_threshold(config.threshold)
    out = Path(config.out)
    with OutputLock(out):
        previous = read_run_json(out)
        dim = embedding_dim(models)
        check_resumable(
            out,
            previous=previous,
            model_id=models.model_id,
            dim=dim,
            threshold=models.classifier.threshold,
            with_embeddings=config.embeddings_in_parquet,
        )
        done = resume(out, dim)  # finish what a killed run committed
        run_id = uuid.uuid4().hex[:12]
        nightly = monitor.before_run(
            out,
            config.inputs,
            previous,
            run_id,
            reference=config.reference,
            rescreen_changed=config.rescreen_changed,
        )
        done -= nightly.rescreen_keys()
        screener = Screener(
            models,
            backend=config.backend,
            batch_size=config.batch_size,
            threads=config.threads,
            decoder=config.decoder,
        )
        summary = RunSummary(
            run_id=run_id,
            out=out,
            backend=screener.backend_name,
            decoder=screener.decoder,
            decode_workers=config.workers,
            model_id=models.model_id,
            trained=models.trained,
            precision_why=models.precision_why,
        )
        started = datetime.now(UTC)
        write_run_json(out, run_record(config, models, summary, previous, started, "running"))
        t0 = time.perf_counter()
        try:
            _run_stages(config, screener, summary, done, on_progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            screener.close()
            summary.wall_s = time.perf_counter() - t0
            summary.stage_s = dict(screener.clock.seconds)
        summary.count_output(out, dim)
        summary.changes, summary.drift = monitor.after_run(
            out,
            nightly,
            previous,
            summary.run_id,
            threshold=models.classifier.threshold,
            thresholds=config.drift_thresholds,
            interrupted=summary.interrupted,
        )
        status = "interrupted" if summary.interrupted else "complete"
        write_run_json(out, run_record(config, models, summary, previous, started, status))
    return summary


def _run_stages(
    config: ScreenConfig,
    screener: Screener,
    summary: RunSummary,
    done: set[int],
    on_progress: ProgressFn | None,
) -> None:
    stats = ArchiveStats()
    writer = ShardWriter(
        Path(config.out),
        shard_size=config.shard_size,
        common=common_columns(screener, summary.run_id),
        with_embeddings=config.embeddings_in_parquet,
        dim=embedding_dim(screener.models),
    )
    latencies: list[float] = []
    write_failed = False
    try:
        screen_items(
            screener,
            iter_items(config.inputs, skip=done.__contains__, stats=stats),
            writer,
            summary,
            config=config,
            latencies=latencies,
            on_rows=on_progress,
        )
    except OutputError:
        write_failed = True  # flushing again would fail the same way, with a second message
        raise
    finally:
        t = time.perf_counter()
        if not write_failed:
            writer.flush()  # also on Ctrl-C: keep every finished row
        screener.clock.add("write", time.perf_counter() - t)
        summary.ignored_files = stats.ignored
        summary.skipped_existing = stats.skipped
        summary.empty_inputs = list(stats.empty_inputs)
        summary.set_latencies(latencies)
