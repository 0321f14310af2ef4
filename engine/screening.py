"""Images in, rows out: the one path every screened image takes, locally and on Ray.

`screen_items` runs a stream of items (a whole local run's, engine/runner.py, or one Ray
shard's, engine/distributed/shard.py) through the Screener into a ShardWriter, counting every
row into a RunSummary. The steps overlap in threads, through bounded queues, so memory does not
grow with the archive (engine/parallel.py):

    reader thread      the items' bytes (files and archive members, one after the other)
    decode workers     per image, side by side (config.workers threads, ordered_map): sha256,
                       header probe, DICOM tags and pixels (engine/io/reader.py) and, with the
                       Pillow decoders, decode + resize + normalise (Screener.preprocess_one);
                       results in input order, at most 2 x workers images in flight
    pipeline thread    the batch: DALI's decode + resize + normalise, or the per-image
                       results stacked (batch n+1 ...)
    calling thread     segmenter, lung crop, classifier, rows into the writer (... batch n)

Images are decoded one at a time in the workers because the Pillow decoders' big steps (zlib
inflate, JPEG decoding, the resize) and the reader's (sha256, NumPy's DICOM pipeline) release
the GIL: one reader thread and a decoder pool per batch left cores idle on 16-bit PNG and
DICOM (docs/performance.md). The numbers are the same: each image goes through the same
functions, and the batches are the same.

With the GPU stages, the preprocessor's device output never goes through the host: the
pipeline thread copies it device to device into the stages' own memory right after DALI's run
(DALI reuses its buffers on the next run), so decoding batch n+1 overlaps inference on batch n
as on the CPU (engine/stages/gpu.py).

Every item ends as exactly one row (engine/io/parquet.py `Row`), in input order: `finish_batch`
fills a row's model outputs (or its error) and `common_columns` the columns every row of a run
shares.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from engine.config import ScreenConfig
from engine.io import thumbs
from engine.io.archive import Item
from engine.io.parquet import Row
from engine.io.reader import Prepared, failed, location, prepare
from engine.io.writer import ShardWriter
from engine.parallel import Stage, ordered_map
from engine.pipeline import Decoded, DeviceBatch, Preprocessed, Sample
from engine.run_record import RunSummary
from engine.screener import Screener
from kernels.reference import box_to_pixels

JOIN_S = 60.0  # how long the end of a run waits for each of its threads

# What a preprocessed image's Prepared.sample becomes: it had a sample (finish_batch counts it),
# and its bytes (or DICOM pixels, 12 MB for a 2048 x 3000 image) need not wait for the batch.
DECODED = Sample()


@dataclass(slots=True)
class Batch:
    items: list[Prepared]
    # with a per-image preprocessor: each sample's result, in order (Screener.preprocess_one)
    done: list[Decoded] = field(default_factory=list)
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
    rows each batch added. Busy time per stage goes to the screener's clock ("read" and
    "decode+preprocess" summed over the decode workers). Its threads have ended when it
    returns or raises: each finishes the image or batch in hand (a read stuck on a dead
    network mount is left behind after JOIN_S, a daemon thread, rather than hang the run).
    """
    stop = threading.Event()
    clock = screener.clock
    per_image = screener.per_image

    def pulled() -> Iterator[Item]:
        it = iter(items)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            clock.add("read", time.perf_counter() - t)
            if item is None:
                return
            yield item

    def read_one(item: Item) -> tuple[Prepared, Decoded | None]:
        t = time.perf_counter()
        p = prepare(item, max_pixels=config.max_pixels, min_side=config.min_side)
        clock.add("read", time.perf_counter() - t)
        if not per_image or p.sample is None:
            return p, None
        done = screener.preprocess_one(p.sample)
        p.sample = DECODED
        return p, done

    def read() -> Iterator[Batch]:
        with closing(ordered_map(read_one, pulled(), workers=config.workers)) as done:
            yield from batches(done, config.batch_size)

    def preprocess(batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            if batch.done:
                batch.pre = screener.assemble(batch.done)
                batch.done = []
            else:
                samples = [p.sample for p in batch.items if p.sample is not None]
                if samples:
                    batch.pre = screener.preprocess_batch(samples)
            yield batch

    reader = Stage(read(), stop, name="cxr-reader")
    pipeline = Stage(preprocess(reader), stop, name="cxr-pipeline")
    try:
        for batch in pipeline:
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
        pipeline.join(JOIN_S)
        reader.join(JOIN_S)


def batches(read: Iterable[tuple[Prepared, Decoded | None]], batch_size: int) -> Iterator[Batch]:
    """Read items (with their per-image results, if any) in batches of `batch_size` samples,
    at most 4x as many items."""
    batch, n_samples = Batch([]), 0
    for p, done in read:
        batch.items.append(p)
        if done is not None:
            batch.done.append(done)
        n_samples += p.sample is not None
        if n_samples >= batch_size or len(batch.items) >= 4 * batch_size:
            yield batch
            batch, n_samples = Batch([]), 0
    if batch.items:
        yield batch


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
