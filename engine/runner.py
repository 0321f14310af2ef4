"""Orchestration of `cxr screen`: read -> preprocess -> segment -> crop -> classify -> write.

Three stages overlap through bounded queues, so memory does not grow with the archive:

    reader thread      archive walk, file bytes, sha256, header probe, DICOM decode
    pipeline thread    DALI decode + resize + normalise (batch n+1 ...)
    main thread        segmenter, lung crop, classifier, Parquet/embedding shards (... batch n)

With TensorRT, DALI's device output never goes through the host: the pipeline thread copies it
device to device into the GPU stages' own memory right after DALI's run (DALI reuses its
buffers on the next run), so decoding batch n+1 overlaps inference on batch n as on the CPU
(engine/stages/gpu.py).

Every image ends as exactly one row. Rows collect into shards; a shard's embeddings sidecar is
written first and its Parquet part last (the commit point), so a run killed at any moment and
rerun ends with every image once in Parquet and once in the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.config import ScreenConfig, resolve_decoder
from engine.cpu import this_cpu
from engine.errors import ImageError, OutputError
from engine.io import parquet, thumbs, vectors
from engine.io.archive import ArchiveStats, Item, iter_items
from engine.io.dicom import decode_dicom, read_dicom_meta
from engine.io.outdir import OutputLock, read_run_json, write_run_json
from engine.io.probe import check_limits, probe
from engine.io.resume import check_resumable
from engine.models import ModelSet, load_models
from engine.nightly import monitor, runs
from engine.pipeline import DeviceBatch, ImagePreprocessor, Preprocessed, Preprocessor, Sample
from engine.runtime import get_backend, resolve_backend
from engine.runtime.base import Backend, DeviceBackend
from engine.stages.base import Predictions, StageClock, Stages
from engine.stages.cpu import CpuStages
from kernels.reference import box_to_pixels

QUEUE_DEPTH = 2  # batches in flight between two stages


@dataclass(slots=True)
class Prepared:
    """One input after the reader: its row so far, and a Sample unless it already failed."""

    row: dict[str, Any]
    sample: Sample | None


@dataclass(slots=True)
class Batch:
    items: list[Prepared]
    pre: Preprocessed | DeviceBatch | None = None


class Screener:
    """The models, the pipeline and the backends: turns samples into predictions.

    Shared by `cxr screen` and `cxr similar`, so a query image goes through exactly the
    same code as the archive did. It picks its objects once (backends, stages, preprocessor)
    and then only delegates.
    """

    def __init__(
        self,
        models: ModelSet,
        *,
        backend: str,
        batch_size: int,
        threads: int,
        device: str = "cpu",
        decoder: str = "auto",
    ) -> None:
        self.models = models
        self.backend_name = resolve_backend(backend, models=models)
        cls = get_backend(self.backend_name)
        self._seg = cls(models.segmenter, threads=threads)
        self._clf = cls(models.classifier, threads=threads)
        self._seg.load()
        self._clf.load()
        self.stages = pick_stages(models, self._seg, self._clf)
        self.device = device if self.stages.device == "cpu" else self.stages.device
        self.decoder = resolve_decoder(decoder, self.device)
        self.pipeline = make_preprocessor(
            models, self.decoder, device=self.device, batch_size=batch_size, threads=threads
        )
        self.clock = StageClock()

    def preprocess(self, samples: list[Sample]) -> Preprocessed:
        """The batch preprocessed to host arrays."""
        t = time.perf_counter()
        pre = self.pipeline.run(samples)
        self.clock.add("decode+preprocess", time.perf_counter() - t)
        return pre

    def preprocess_batch(self, samples: list[Sample]) -> Preprocessed | DeviceBatch:
        """The batch preprocessed into the stages' memory: with the GPU stages it stays on the
        device, copied there in the calling (pipeline) thread, so DALI may reuse its buffers
        for the next batch at once."""
        t = time.perf_counter()
        pre = self.stages.ingest(self.pipeline, samples)
        self.clock.add("decode+preprocess", time.perf_counter() - t)
        return pre

    def infer(self, pre: Preprocessed | DeviceBatch) -> Predictions:
        return self.stages.predict(pre, self.clock)

    def close(self) -> None:
        self.stages.close()
        self.pipeline.close()
        self._seg.close()
        self._clf.close()


def pick_stages(models: ModelSet, segmenter: Backend, classifier: Backend) -> Stages:
    """The GPU stages where both backends keep their tensors on the device, else the CPU ones."""
    if isinstance(segmenter, DeviceBackend) and isinstance(classifier, DeviceBackend):
        # Masks, boxes and the classifier input stay on the device between the two plans
        # (kernels/*.cu); DALI decodes on the GPU too.
        from engine.stages.gpu import GpuStages

        return GpuStages(models, segmenter, classifier)
    return CpuStages(models, segmenter, classifier)


def make_preprocessor(
    models: ModelSet, decoder: str, *, device: str, batch_size: int, threads: int
) -> ImagePreprocessor:
    """The preprocessor `decoder` names ("dali", "pillow", "pillow-draft") on `device`."""
    if decoder == "dali":
        return Preprocessor(models, device=device, batch_size=batch_size, threads=threads)
    from engine.pipeline_pil import PilPreprocessor

    return PilPreprocessor(
        models,
        batch_size=batch_size,
        threads=threads,
        draft=2 if decoder == "pillow-draft" else 0,
    )


def location(source: str, member: str | None) -> str:
    return f"{source}:{member}" if member else source


def prepare(item: Item, *, max_pixels: int, min_side: int) -> Prepared:
    """Reader-side work for one item: hash, probe the header, refuse bombs, decode DICOM."""
    ref = item.ref
    row: dict[str, Any] = {"key": ref.key, "source": ref.source, "member": ref.member}
    where = location(ref.source, ref.member)
    if item.error is not None or item.data is None:
        return Prepared(_failed(row, where, item.error or "no data"), None)
    data = item.data
    row["sha256"] = hashlib.sha256(data).hexdigest()
    row.update(source_stat(ref.source, ref.member, len(data)))
    try:
        info = probe(data)
        row.update(
            format=info.format, width=info.width, height=info.height, bit_depth=info.bit_depth
        )
        if info.format == "dicom":
            row.update(read_dicom_meta(data))
        check_limits(info, max_pixels=max_pixels, min_side=min_side)
        if info.format == "dicom":
            sample = Sample(pixels=decode_dicom(data).pixels)
        else:
            sample = Sample(encoded=np.frombuffer(data, np.uint8))
    except ImageError as exc:
        return Prepared(_failed(row, where, str(exc)), None)
    return Prepared(row, sample)


def source_stat(source: str, member: str | None, size_read: int) -> dict[str, int]:
    """Size and mtime of the file (or archive) an image came from, for the nightly change check.

    Taken after the read: a plain file whose size is no longer what was read is being written
    to, so nothing is recorded and the next check reads it (engine/nightly/changes.py).
    """
    try:
        st = os.stat(source)
    except OSError:
        return {}
    if member is None and st.st_size != size_read:
        return {}
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _failed(row: dict[str, Any], where: str, message: str) -> dict[str, Any]:
    row.update(status="error", error=f"{where}: {message}")
    return row


class ShardWriter:
    """Collects finished rows; every `shard_size` rows commits a sidecar and a Parquet part."""

    def __init__(
        self,
        out: Path,
        *,
        shard_size: int,
        common: dict[str, Any],
        with_embeddings: bool,
        dim: int,
        number: int | None = None,  # the first part's number; None: after the last committed
    ):
        self.out = out
        self.shard_size = shard_size
        self.common = common
        self.with_embeddings = with_embeddings
        self.dim = dim
        self.number = parquet.next_part_number(out) if number is None else number
        self.schema = parquet.directory_schema(out)  # every part keeps the first one's columns
        self._rows: list[dict[str, Any]] = []
        self._vectors: list[np.ndarray | None] = []
        self._previews: list[tuple[bytes, bytes] | None] = []
        self.parts_written = 0

    def add(
        self, row: dict[str, Any], vector: np.ndarray | None, preview: tuple[bytes, bytes] | None
    ) -> None:
        self._rows.append(row)
        self._vectors.append(vector)
        self._previews.append(preview)
        if len(self._rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        if parquet.part_path(self.out, self.number).exists():
            # An interrupt landed after this shard's part was renamed into place but before
            # the bookkeeping below: the part holds exactly these rows, so it is committed.
            self._advance()
            return
        try:
            self._commit()
        except OutputError:
            # The part is the commit point: without it, this shard's sidecar and previews
            # would be orphans (a rerun deletes those too, but a failed run leaves nothing).
            if not parquet.part_path(self.out, self.number).exists():
                with contextlib.suppress(OSError):
                    vectors.sidecar_path(self.out, self.number).unlink(missing_ok=True)
                    thumbs.thumbs_path(self.out, self.number).unlink(missing_ok=True)
            raise
        self._advance()

    def _commit(self) -> None:
        rows = [{**self.common, **r} for r in self._rows]
        ok = [i for i, v in enumerate(self._vectors) if v is not None]
        keys = np.array([rows[i]["key"] for i in ok], np.uint64)
        mat = np.stack([v for v in self._vectors if v is not None]) if ok else None
        if mat is not None:
            vectors.write_sidecar(self.out, self.number, keys, vectors.unit(mat))
        shown = [(r["key"], p) for r, p in zip(rows, self._previews, strict=True) if p is not None]
        if shown:
            thumbs.write_thumbs(
                self.out,
                self.number,
                [k for k, _ in shown],
                [p[0] for _, p in shown],
                [p[1] for _, p in shown],
            )
        emb = None
        if self.with_embeddings:
            # every part has the column, even one of error rows only: one schema per directory
            emb = np.full((len(rows), self.dim), np.nan, np.float32)
            if mat is not None:
                emb[ok] = mat
        frame = parquet.conform(parquet.rows_frame(rows, emb), self.schema)
        parquet.write_part(self.out, self.number, frame)

    def _advance(self) -> None:
        self.number += 1
        self.parts_written += 1
        self._rows, self._vectors, self._previews = [], [], []


@dataclass
class RunSummary:
    run_id: str
    out: Path
    backend: str
    model_id: str
    trained: bool
    decoder: str = ""
    precision_why: dict[str, str] = field(default_factory=dict)  # role -> why that export runs
    processed: int = 0
    ok: int = 0
    errors: int = 0
    positives: int = 0
    skipped_existing: int = 0
    ignored_files: int = 0
    total_rows: int = 0
    total_errors: int = 0
    index_size: int = 0
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    batch_latency_ms: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    empty_inputs: list[str] = field(default_factory=list)  # INPUTs that held no image
    interrupted: bool = False
    changes: dict[str, Any] = field(default_factory=dict)  # run.json "changes" (engine/nightly)
    drift: dict[str, Any] = field(default_factory=dict)  # run.json "drift"

    @property
    def drift_flagged(self) -> list[str]:
        return list(self.drift.get("flagged") or [])

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def found_nothing(self) -> bool:
        """No INPUT held an image, not even one screened before (a finished run)."""
        return not self.interrupted and self.processed == 0 and self.skipped_existing == 0


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
        dim = int(models.classifier.output("embedding").shape[-1])
        check_resumable(
            out,
            previous=previous,
            model_id=models.model_id,
            dim=dim,
            threshold=models.classifier.threshold,
            with_embeddings=config.embeddings_in_parquet,
        )
        parquet.remove_temporaries(out)
        thumbs.remove_orphans(out)
        vectors.sync_index(out, dim)  # finish what a killed run committed
        done = parquet.existing_keys(out)
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
            model_id=models.model_id,
            trained=models.trained,
            precision_why=models.precision_why,
        )
        started = datetime.now(UTC)
        write_run_json(out, _run_record(config, models, summary, previous, started, "running"))
        t0 = time.perf_counter()
        try:
            _run_stages(config, screener, summary, done, on_progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            screener.close()
            summary.wall_s = time.perf_counter() - t0
            summary.stage_s = dict(screener.clock.seconds)
        summary.index_size = vectors.sync_index(out, dim).size
        totals = parquet.read_predictions(out, ["status"])["status"].value_counts()
        counts = dict(zip(totals["status"].to_list(), totals["count"].to_list(), strict=True))
        summary.total_rows = sum(counts.values())
        summary.total_errors = counts.get("error", 0)
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
        write_run_json(out, _run_record(config, models, summary, previous, started, status))
    return summary


def _reader(config: ScreenConfig, done: set[int], stats: ArchiveStats) -> Iterator[Batch]:
    items: list[Prepared] = []
    n_samples = 0
    for item in iter_items(config.inputs, skip=done.__contains__, stats=stats):
        p = prepare(item, max_pixels=config.max_pixels, min_side=config.min_side)
        items.append(p)
        n_samples += p.sample is not None
        if n_samples >= config.batch_size or len(items) >= 4 * config.batch_size:
            yield Batch(items)
            items, n_samples = [], 0
    if items:
        yield Batch(items)


def _run_stages(
    config: ScreenConfig,
    screener: Screener,
    summary: RunSummary,
    done: set[int],
    on_progress: ProgressFn | None,
) -> None:
    stats = ArchiveStats()
    stop = threading.Event()
    clock = screener.clock

    def read() -> Iterator[Batch]:
        it = _reader(config, done, stats)
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

    common = {
        "model_id": screener.models.model_id,
        "backend": screener.backend_name,
        "run_id": summary.run_id,
        "threshold": screener.models.classifier.threshold,
    }
    writer = ShardWriter(
        Path(config.out),
        shard_size=config.shard_size,
        common=common,
        with_embeddings=config.embeddings_in_parquet,
        dim=int(screener.models.classifier.output("embedding").shape[-1]),
    )
    latencies: list[float] = []
    batches = _threaded(preprocess(_threaded(read(), stop)), stop)
    write_failed = False
    try:
        for batch in batches:
            t = time.perf_counter()
            rows, vecs, previews = _finish_batch(batch, screener)
            latencies.append(time.perf_counter() - t)
            t = time.perf_counter()
            for row, vec, preview in zip(rows, vecs, previews, strict=True):
                _count(summary, row)
                writer.add(row, vec, preview)
            clock.add("write", time.perf_counter() - t)
            if on_progress:
                on_progress(len(rows))
    except OutputError:
        write_failed = True  # flushing again would fail the same way, with a second message
        raise
    finally:
        stop.set()
        t = time.perf_counter()
        if not write_failed:
            writer.flush()  # also on Ctrl-C: keep every finished row
        clock.add("write", time.perf_counter() - t)
        summary.ignored_files = stats.ignored
        summary.skipped_existing = stats.skipped
        summary.empty_inputs = list(stats.empty_inputs)
        if latencies:
            ms = np.array(latencies) * 1000
            summary.batch_latency_ms = {
                "p50": float(np.percentile(ms, 50)),
                "p99": float(np.percentile(ms, 99)),
            }


def _finish_batch(
    batch: Batch, screener: Screener
) -> tuple[list[dict[str, Any]], list[Any], list[tuple[bytes, bytes] | None]]:
    """Rows (in input order), embeddings and previews (None for failed images) of one batch."""
    pre = batch.pre
    preds = screener.infer(pre) if pre is not None and pre.ok else None
    threshold = screener.models.classifier.threshold
    rows: list[dict[str, Any]] = []
    vecs: list[np.ndarray | None] = []
    previews: list[tuple[bytes, bytes] | None] = []
    sample_i = 0
    for p in batch.items:
        row, vec, preview = p.row, None, None
        if p.sample is not None:
            assert pre is not None  # a batch with samples was preprocessed
            where = location(row["source"], row["member"])
            if sample_i in pre.errors:
                _failed(row, where, pre.errors[sample_i])
            else:
                j = pre.ok.index(sample_i)
                assert preds is not None
                prob = float(preds.prob[j])
                box = box_to_pixels(
                    preds.boxes[j : j + 1], np.array([row["width"]]), np.array([row["height"]])
                )[0]
                row.update(
                    status="ok",
                    prob=prob,
                    decision=prob >= threshold,
                    lung_bbox=box.tolist(),
                    lung_fraction=float(preds.fraction[j]),
                )
                vec = preds.embedding[j]
                work = pre.work if isinstance(pre, Preprocessed) else preds.work
                assert work is not None  # a DeviceBatch's predictions carry its work images
                preview = (
                    thumbs.encode_thumb(work[j], row["width"], row["height"]),
                    thumbs.encode_mask(preds.lung_mask[j]),
                )
            sample_i += 1
        row["screened_at"] = datetime.now(UTC)
        rows.append(row)
        vecs.append(vec)
        previews.append(preview)
    return rows, vecs, previews


def _count(summary: RunSummary, row: dict[str, Any]) -> None:
    summary.processed += 1
    if row["status"] == "ok":
        summary.ok += 1
        summary.positives += bool(row["decision"])
    else:
        summary.errors += 1
        if len(summary.error_samples) < 20:
            summary.error_samples.append(row["error"])


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


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "cxr-engine": __version__}
    for dist in (
        "numpy",
        "polars",
        "usearch",
        "onnxruntime",
        "onnx",
        "pydicom",
        "nvidia-dali-cuda130",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _run_record(
    config: ScreenConfig,
    models: ModelSet,
    s: RunSummary,
    previous: dict[str, Any] | None,
    started: datetime,
    status: str,
) -> dict[str, Any]:
    history = list((previous or {}).get("history", []))
    if previous and previous.get("run_id") != s.run_id:
        history.append(runs.history_entry(previous))

    def model_info(m: Any) -> dict[str, Any]:
        return {
            "architecture": m.architecture,
            "precision": m.precision,
            "precision_why": models.precision_why.get(m.role),
            "onnx": str(m.onnx_path.resolve()),
            "sha256": m.sha256,
            "trained": m.trained,
        }

    return {
        "run_id": s.run_id,
        "status": status,
        "started_at": started.isoformat(),
        "updated_at": datetime.now(UTC).isoformat(),
        "engine_version": __version__,
        "host": platform.node(),
        "cpu": this_cpu().describe(),
        "config": config.to_json(),
        "backend": s.backend,
        "decoder": s.decoder,
        "models": {
            "model_id": models.model_id,
            "directory": str(models.classifier.directory.resolve()),
            "threshold": models.classifier.threshold,
            "segmenter": model_info(models.segmenter),
            "classifier": model_info(models.classifier),
        },
        "libraries": library_versions(),
        "counts": {
            "processed": s.processed,
            "ok": s.ok,
            "error": s.errors,
            "positive": s.positives,
            "skipped_existing": s.skipped_existing,
            "ignored_files": s.ignored_files,
            "total_rows": s.total_rows,
            "total_errors": s.total_errors,
            "index_size": s.index_size,
        },
        "timings": {
            "wall_s": s.wall_s,
            "images_per_s": s.images_per_s,
            "stage_busy_s": s.stage_s,
            "batch_latency_ms": s.batch_latency_ms,
        },
        "changes": s.changes or None,
        "drift": s.drift or None,
        "history": history,
    }
