"""Screen one shard into its part: the unit of work a Ray actor runs (no Ray imported here).

`screen_shard` reads a shard's entries (engine/io/shards.py) and screens them with the same
`Screener` and `screen_items` as the single-process runner (engine/screening.py: batching,
threads, rows), and commits them with a `ShardWriter` (engine/io/writer.py) under the shard's
own number:
sidecar, thumbnails, then the Parquet part (the commit point). A shard whose part exists was
committed by an earlier attempt (a retry after a worker or node died, or a rerun): its rows are
counted from the part and nothing is screened again, so a retried shard never duplicates rows.

`check_view` is what a worker checks before it screens anything: that it sees the driver's
output directory (the run's own run.json) and inputs, i.e. that they are on a filesystem every
node mounts at the same path.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from engine.config import ScreenConfig
from engine.errors import EngineError
from engine.io import parquet
from engine.io.outdir import RUN_JSON, read_run_json
from engine.io.shards import Shard, ShardReader
from engine.io.writer import ShardWriter
from engine.run_record import ERROR_SAMPLES, RunSummary
from engine.screener import Screener, embedding_dim
from engine.screening import screen_items


class StaleRun(EngineError):
    """The output directory now belongs to another run: this worker's driver is gone."""


@dataclass
class ShardResult:
    number: int
    rows: int = 0
    ok: int = 0
    errors: int = 0
    positives: int = 0
    error_samples: list[str] = field(default_factory=list)
    already_committed: bool = False
    started: float = 0.0  # time.time() on the worker
    seconds: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)


def screen_shard(
    screener: Screener,
    reader: ShardReader,
    shard: Shard,
    *,
    config: ScreenConfig,
    out: Path,
    common: dict[str, Any],
    before_commit: Callable[[], None] | None = None,
) -> ShardResult:
    """Screen `shard` and commit its part; idempotent (see the module docstring)."""
    started, t0 = time.time(), time.perf_counter()
    if parquet.part_path(out, shard.number).exists():
        result = committed_result(out, shard.number)
        result.started, result.seconds = started, time.perf_counter() - t0
        return result
    clock_before = dict(screener.clock.seconds)
    writer = ShardWriter(
        out,
        shard_size=len(shard.entries) + 1,  # flushed below, once, as this shard's number
        common=common,
        with_embeddings=config.embeddings_in_parquet,
        dim=embedding_dim(screener.models),
        number=shard.number,
    )
    counts = RunSummary(run_id="", out=out, backend="", model_id="", trained=False)
    latencies: list[float] = []
    items = reader.items(shard.entries)
    screen_items(screener, items, writer, counts, config=config, latencies=latencies)
    if counts.processed != len(shard.entries):  # every entry is one row, or nothing is written
        raise EngineError(
            f"shard {shard.number}: {counts.processed} rows for {len(shard.entries)} images"
        )
    if before_commit is not None:
        before_commit()
    t = time.perf_counter()
    # FileExistsError: another attempt at this shard committed the same rows first
    with contextlib.suppress(FileExistsError):
        writer.flush()
    screener.clock.add("write", time.perf_counter() - t)
    stage_s = {
        stage: s - clock_before.get(stage, 0.0) for stage, s in screener.clock.seconds.items()
    }
    result = ShardResult(
        number=shard.number,
        rows=counts.processed,
        ok=counts.ok,
        errors=counts.errors,
        positives=counts.positives,
        error_samples=counts.error_samples[:ERROR_SAMPLES],
        stage_s=stage_s,
        latencies_s=latencies,
    )
    result.started, result.seconds = started, time.perf_counter() - t0
    return result


def committed_result(out: Path, number: int) -> ShardResult:
    """The counts of a part already committed."""
    df = pl.read_parquet(parquet.part_path(out, number), columns=["status", "decision", "error"])
    ok = df["status"] == "ok"
    errors = df.filter(~ok)["error"].drop_nulls().to_list()
    return ShardResult(
        number=number,
        rows=df.height,
        ok=int(ok.sum()),
        errors=df.height - int(ok.sum()),
        positives=int(df.filter(ok)["decision"].fill_null(False).sum()),
        error_samples=errors[:ERROR_SAMPLES],
        already_committed=True,
    )


def check_view(out: Path, run_id: str, inputs: Sequence[str]) -> list[str]:
    """What this machine cannot see of the run (empty: all is well).

    `out` must hold the run's own run.json (same run_id: the same directory, not a local one
    of the same name) and be writable; every input the driver could see must exist here too.
    """
    problems: list[str] = []
    try:
        record = read_run_json(out)
    except EngineError as exc:
        record, problems = None, [str(exc)]
    if not problems and record is None:
        problems.append(
            f"--out {out}: this run's {RUN_JSON} is not there (another directory of that name?)"
        )
    elif not problems and record is not None and record.get("run_id") != run_id:
        problems.append(
            f"--out {out}: its {RUN_JSON} is run {record.get('run_id')}'s, not this run's "
            f"({run_id}): another run took the directory over, or this is another "
            "directory of that name"
        )
    probe = Path(out) / f".{RUN_JSON}.tmp-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        problems.append(f"--out {out}: cannot write ({exc.strerror or exc})")
    for path in inputs:
        try:
            os.stat(path)
        except OSError as exc:
            problems.append(f"input {path}: {(exc.strerror or str(exc)).lower()}")
    return problems


def fence(out: Path, run_id: str) -> Callable[[], None]:
    """A check run before each commit: the directory's run.json must still be this run's.

    A driver killed with SIGKILL leaves its workers to Ray, which ends them; should one still
    be finishing a shard when the rerun starts, this keeps it from committing into the new
    run's directory (the rerun writes its run.json first).
    """

    def check() -> None:
        record = read_run_json(out) or {}
        if record.get("run_id") != run_id:
            raise StaleRun(
                f"{out} is now written by run {record.get('run_id')}; run {run_id} stops"
            )

    return check
