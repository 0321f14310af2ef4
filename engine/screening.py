"""Images in, rows out: the one path every screened image takes, locally and on Ray.

`screen_items` runs a stream of items (a whole local run's, engine/runner.py, or one Ray
shard's, engine/distributed/shard.py) through the Screener into a ShardWriter, counting every
row into a RunSummary. Three stages overlap through bounded queues, so memory does not grow
with the archive:

    reader thread      item bytes, sha256, header probe, DICOM decode (engine/io/reader.py)
    pipeline thread    decode + resize + normalise (batch n+1 ...)
    calling thread     segmenter, lung crop, classifier, rows into the writer (... batch n)

With the GPU stages, the preprocessor's device output never goes through the host: the
pipeline thread copies it device to device into the stages' own memory right after DALI's run
(DALI reuses its buffers on the next run), so decoding batch n+1 overlaps inference on batch n
as on the CPU (engine/stages/gpu.py).

Every item ends as exactly one row (engine/io/parquet.py `Row`), in input order: `finish_batch`
fills a row's model outputs (or its error) and `common_columns` the columns every row of a run
shares.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from engine.config import ScreenConfig
from engine.io import thumbs
from engine.io.archive import Item
from engine.io.parquet import Row
from engine.io.reader import Prepared, failed, location, prepare
from engine.io.writer import ShardWriter
from engine.pipeline import DeviceBatch, Preprocessed
from engine.run_record import RunSummary
from engine.screener import Screener
from kernels.reference import box_to_pixels

QUEUE_DEPTH = 2  # batches in flight between two stages


@dataclass(slots=True)
class Batch:
    items: list[Prepared]
    pre: Preprocessed | DeviceBatch | None = None


def screen_items(
    screener: Screener,
    items: Iterable[Item],
    writer: ShardWriter,
    summary: RunSummary,
    *,
    config: ScreenConfig,
    latencies: list[float],
    on_rows: Callable[[int], None] | None = None,
) -> None:
    """Screen `items` into `writer`, every row counted into `summary` (it does not flush).

    Each batch's inference time is appended to `latencies`, and `on_rows` gets the number of
    rows each batch added. Busy time per stage goes to the screener's clock.
    """
    stop = threading.Event()
    clock = screener.clock

    def read() -> Iterator[Batch]:
        it = batches(items, config)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            clock.add("read", time.perf_counter() - t)
            if batch is None:
                return
            yield batch

    def preprocess(batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            samples = [p.sample for p in batch.items if p.sample is not None]
            if samples:
                batch.pre = screener.preprocess_batch(samples)
            yield batch

    try:
        for batch in _threaded(preprocess(_threaded(read(), stop)), stop):
            t = time.perf_counter()
            rows, vecs, previews = finish_batch(batch, screener)
            latencies.append(time.perf_counter() - t)
            t = time.perf_counter()
            for row, vec, preview in zip(rows, vecs, previews, strict=True):
                summary.count(row)
                writer.add(row, vec, preview)
            clock.add("write", time.perf_counter() - t)
            if on_rows:
                on_rows(len(rows))
    finally:
        stop.set()


def batches(items: Iterable[Item], config: ScreenConfig) -> Iterator[Batch]:
    """Prepared items in batches of `config.batch_size` samples (at most 4x as many items)."""
    prepared: list[Prepared] = []
    n_samples = 0
    for item in items:
        p = prepare(item, max_pixels=config.max_pixels, min_side=config.min_side)
        prepared.append(p)
        n_samples += p.sample is not None
        if n_samples >= config.batch_size or len(prepared) >= 4 * config.batch_size:
            yield Batch(prepared)
            prepared, n_samples = [], 0
    if prepared:
        yield Batch(prepared)


def common_columns(screener: Screener, run_id: str) -> dict[str, Any]:
    """The columns every row of a run shares (the ShardWriter adds them to each row)."""
    return {
        "model_id": screener.models.model_id,
        "backend": screener.backend_name,
        "run_id": run_id,
        "threshold": screener.models.classifier.threshold,
    }


def finish_batch(
    batch: Batch, screener: Screener
) -> tuple[list[Row], list[Any], list[tuple[bytes, bytes] | None]]:
    """Rows (in input order), embeddings and previews (None for failed images) of one batch."""
    pre = batch.pre
    preds = screener.infer(pre) if pre is not None and pre.ok else None
    threshold = screener.models.classifier.threshold
    rows: list[Row] = []
    vecs: list[np.ndarray | None] = []
    previews: list[tuple[bytes, bytes] | None] = []
    sample_i = 0
    for p in batch.items:
        row, vec, preview = p.row, None, None
        if p.sample is not None:
            assert pre is not None  # a batch with samples was preprocessed
            where = location(row.source, row.member)
            if sample_i in pre.errors:
                failed(row, where, pre.errors[sample_i])
            else:
                j = pre.ok.index(sample_i)
                assert preds is not None
                assert row.width is not None and row.height is not None  # probed
                row.status = "ok"
                row.prob = prob = float(preds.prob[j])
                row.decision = prob >= threshold
                box = box_to_pixels(
                    preds.boxes[j : j + 1], np.array([row.width]), np.array([row.height])
                )[0]
                row.lung_bbox = box.tolist()
                row.lung_fraction = float(preds.fraction[j])
                vec = preds.embedding[j]
                work = pre.work if isinstance(pre, Preprocessed) else preds.work
                assert work is not None  # a DeviceBatch's predictions carry its work images
                preview = (
                    thumbs.encode_thumb(work[j], row.width, row.height),
                    thumbs.encode_mask(preds.lung_mask[j]),
                )
            sample_i += 1
        row.screened_at = datetime.now(UTC)
        rows.append(row)
        vecs.append(vec)
        previews.append(preview)
    return rows, vecs, previews


_DONE = object()


def _threaded(source: Iterator[Any], stop: threading.Event) -> Iterator[Any]:
    """Run an iterator in a daemon thread behind a bounded queue; re-raise its errors here."""
    q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in source:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            put(_Failure(exc))

    threading.Thread(target=work, daemon=True, name="cxr-stage").start()
    while True:
        x = q.get()
        if x is _DONE:
            return
        if isinstance(x, _Failure):
            raise x.exc
        yield x


@dataclass(frozen=True, slots=True)
class _Failure:
    exc: BaseException
