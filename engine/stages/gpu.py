"""segment -> lung box -> crop -> classify with everything between the models on the GPU.

The CPU stages (engine/stages/cpu.py) copy the segmenter's masks to the host, run
kernels/reference.py and copy the classifier input back; here the masks stay on the device:

    seg_input, work (host --H2D--, or DALI's device output --D2D--) --> segmenter plan
    --mask logits--> lung_bbox.cu --boxes--> crop_resize_normalize.cu (work image)
    --classifier input--> classifier plan
    --D2H--> logit, embedding, boxes, fraction, mask (thresholded on the host)

Only the results come down (the masks too, because the runner keeps a lung-mask preview per
image; 256 KB per image at 256 x 256). Same semantics as the CPU path (the kernels are tested
bit for bit against the reference, the plans against ONNX Runtime), behind the same Stages
interface (engine/stages/base.py), so the Screener uses it whenever both backends keep their
tensors on the device (runtime.base.DeviceBackend: TensorRT):
``GpuStages(models, seg_backend, clf_backend).infer(pre.work, pre.seg_input)`` for host arrays,
or ``infer(batch)`` for a ``DeviceBatch`` from ``Preprocessor.run_device``.

DALI's device output, and the overlap of decode with inference. DALI may reuse its output
buffers as soon as the pipeline runs again, so ``stage(batch)`` copies them device to device
into one of this object's own buffer slots, on the stream DALI was given (so the copy follows
DALI's work), and the calling thread waits for that stream: nothing goes through the host.
``ingest`` calls ``stage`` in the pipeline thread (engine/screening.py) right after DALI's run,
so DALI is free to decode batch n+1 while the main thread runs ``infer`` on batch n from its
slot on another stream. A slot goes
back to the pool when ``infer`` is done with it; at most (queue depth + 2) batches are in
flight, so the pool stays that small. The work images come down with the results (for the
previews), queued behind the classifier on the inference stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.models import ModelSet
from engine.pipeline import DeviceArray, DeviceBatch, ImagePreprocessor, Preprocessed, Sample
from engine.runtime import cuda
from engine.runtime.base import DeviceBackend
from engine.stages.base import Predictions, StageClock
from engine.stages.classify import tta_mean
from engine.stages.crop import tta_boxes
from engine.stages.segment import logit_threshold


class _Slot:
    """This object's own device copy of one batch's two inputs."""

    __slots__ = ("work", "seg_input")

    def __init__(self) -> None:
        self.work = cuda.DeviceBuffer()
        self.seg_input = cuda.DeviceBuffer()

    def free(self) -> None:
        self.work.free()
        self.seg_input.free()


class GpuStages:
    """The Stages on the GPU; owns the device buffers between the two plans (one per Screener)."""

    device = "gpu"  # DALI decodes on the GPU too

    def __init__(
        self, models: ModelSet, segmenter: DeviceBackend, classifier: DeviceBackend
    ) -> None:
        if not segmenter.max_batch or not classifier.max_batch:
            raise ValueError("load both TensorRT backends before building the GPU stages")
        if models.classifier.crop is None:
            raise ValueError("classifier manifest has no crop section")
        for backend, manifest in ((segmenter, models.segmenter), (classifier, models.classifier)):
            for spec in (*manifest.inputs, *manifest.outputs):
                if backend.tensor_dtype(spec.name) != np.float32:
                    raise ValueError(
                        f"the {manifest.role} plan's {spec.name!r} is "
                        f"{backend.tensor_dtype(spec.name)}; the GPU stages need float32 I/O"
                    )
        self.models = models
        self.seg, self.clf = segmenter, classifier
        # a classifier with box transforms (tta) takes K crops an image in one plan call
        self.crops_per_image = max(len(models.classifier.tta), 1)
        if classifier.max_batch < self.crops_per_image:
            raise ValueError(
                f"the classifier plan takes at most {classifier.max_batch} crops a call, fewer "
                f"than the {self.crops_per_image} test-time crops (tta) of one image; rebuild it "
                "with a larger --max-batch"
            )
        self.max_batch = min(segmenter.max_batch, classifier.max_batch // self.crops_per_image)
        self.threshold = logit_threshold(models.segmenter.threshold)
        self.margin = models.classifier.crop.margin
        self.min_region = models.segmenter.box_min_region
        self._stream = cuda.Stream()  # inference (main thread)
        self._ingest = cuda.Stream()  # DALI's outputs and their copies (pipeline thread)
        self._dev: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.HostBuffer] = {}
        self._slots: list[_Slot] = []  # all of them, for close()
        self._free_slots: list[_Slot] = []
        self._pool_lock = threading.Lock()
        self._stage_lock = threading.Lock()  # close() waits for a copy in progress
        self._closed = False

    @property
    def ingest_stream(self) -> int:
        """The stream to give ``Preprocessor.run_device``: ``stage`` copies on it."""
        return self._ingest.handle

    def _host_buffer(self, name: str, nbytes: int) -> cuda.HostBuffer:
        host = self._host.setdefault(name, cuda.HostBuffer())
        host.reserve(nbytes)
        return host

    def _buffers(self, name: str, nbytes: int) -> tuple[cuda.DeviceBuffer, cuda.HostBuffer]:
        dev = self._dev.setdefault(name, cuda.DeviceBuffer())
        dev.reserve(nbytes)
        return dev, self._host_buffer(name, nbytes)

    def _upload(self, name: str, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, np.float32)
        dev, host = self._buffers(name, x.nbytes)
        host.view(x.shape, np.float32)[...] = x
        cuda.copy_to_device(dev.ptr, host.ptr, x.nbytes, self._stream.handle)
        return dev.ptr

    def _download(self, name: str, ptr: int, shape: tuple[int, ...]) -> Any:
        nbytes = int(np.prod(shape)) * 4
        host = self._host_buffer(name, nbytes)
        cuda.copy_to_host(host.ptr, ptr, nbytes, self._stream.handle)
        return host, shape

    # ---------------------------------------------------------------- the Stages interface

    def ingest(
        self, preprocessor: ImagePreprocessor, samples: Sequence[Sample]
    ) -> Preprocessed | DeviceBatch:
        """DALI's device output staged into this object's memory (see ``stage``); a batch
        that came back on the host (a bad image, a non-dense output) as it is."""
        pre = preprocessor.run_device(samples, cuda_stream=self.ingest_stream)
        return self.stage(pre) if isinstance(pre, DeviceBatch) else pre

    def predict(self, pre: Preprocessed | DeviceBatch, clock: StageClock) -> Predictions:
        t = time.perf_counter()
        if isinstance(pre, DeviceBatch):
            preds = self.infer(pre)
        else:
            preds = self.infer(pre.work, pre.seg_input)
        clock.add("segment+crop+classify (gpu)", time.perf_counter() - t)
        return preds

    # ---------------------------------------------------------------- DALI's device output

    def stage(self, batch: DeviceBatch) -> DeviceBatch:
        """Copy a DeviceBatch into a slot of this object's memory (device to device).

        Returns the same batch on the copy, complete (``stream`` None); DALI may then reuse
        its buffers. Thread-safe against ``infer``; a staged batch is returned as it is.
        """
        if isinstance(batch.owner, _Slot):
            return batch
        with self._stage_lock:
            if self._closed:
                raise RuntimeError("the GPU stages are closed")
            slot = self._take_slot()
            stream = self._ingest.handle if batch.stream is None else int(batch.stream)
            try:
                work = _copy_into(slot.work, batch.work, stream)
                seg = _copy_into(slot.seg_input, batch.seg_input, stream)
                cuda.synchronize(stream)  # DALI's buffers are free once this returns
            except BaseException:
                self._release(slot)
                raise
        return DeviceBatch(
            ok=batch.ok, work=work, seg_input=seg, errors=batch.errors, stream=None, owner=slot
        )

    def _take_slot(self) -> _Slot:
        with self._pool_lock:
            if self._free_slots:
                return self._free_slots.pop()
            slot = _Slot()
            self._slots.append(slot)
            return slot

    def _release(self, slot: _Slot) -> None:
        with self._pool_lock:
            self._free_slots.append(slot)

    # ---------------------------------------------------------------- inference

    def infer(
        self, work: np.ndarray | DeviceBatch, seg_input: np.ndarray | None = None
    ) -> Predictions:
        """Predictions for work (n, S, S) and seg_input (n, 1, h, w) float32 host arrays, or
        for one DeviceBatch (then seg_input is None, and the predictions carry ``work``)."""
        if isinstance(work, DeviceBatch):
            if seg_input is not None:
                raise TypeError("a DeviceBatch carries its seg_input; pass the batch alone")
            return self._infer_device(work)
        if seg_input is None:
            raise TypeError("host input needs both work and seg_input arrays")
        return _concat([
            self._infer_host(work[i : i + self.max_batch], seg_input[i : i + self.max_batch])
            for i in range(0, len(work), self.max_batch)
        ])  # fmt: skip

    def _infer_host(self, work: np.ndarray, seg_input: np.ndarray) -> Predictions:
        seg_in = self._upload("seg_input", seg_input)
        work_ptr = self._upload("work", work)
        return self._infer(seg_in, seg_input.shape, work_ptr, work.shape, with_work=False)

    def _infer_device(self, batch: DeviceBatch) -> Predictions:
        staged = self.stage(batch)  # a no-op for what the runner staged already
        work, seg = staged.work, staged.seg_input
        try:
            return _concat([
                self._infer(
                    seg.ptr + i * seg.sample_nbytes,
                    (min(self.max_batch, len(seg) - i), *seg.shape[1:]),
                    work.ptr + i * work.sample_nbytes,
                    (min(self.max_batch, len(work) - i), *work.shape[1:]),
                    with_work=True,
                )
                for i in range(0, len(work), self.max_batch)
            ])  # fmt: skip
        finally:
            self._release(staged.owner)  # _infer synchronised its stream: the slot is idle

    def _infer(
        self,
        seg_in: int,
        seg_shape: tuple[int, ...],
        work_ptr: int,
        work_shape: tuple[int, ...],
        *,
        with_work: bool,
    ) -> Predictions:
        from kernels.nvrtc import crop_resize_normalize_ptr, lung_bbox_ptr

        m = self.models
        n, side = work_shape[0], work_shape[1]
        s = self._stream.handle
        want = self.seg.output_shape(m.segmenter.input.name, n)  # any tensor's, inputs too
        if tuple(seg_shape) != want or len(work_shape) != 3:
            raise ValueError(
                f"seg_input {tuple(seg_shape)} / work {tuple(work_shape)}: the segmenter plan "
                f"takes {want} and the work images must be (n, S, S)"
            )
        mask_name = m.segmenter.outputs[0].name
        masks = self.seg.infer_device({m.segmenter.input.name: seg_in}, n, stream=s)[mask_name]
        h, w = self.seg.output_shape(mask_name, n)[-2:]  # (n, 1, h, w) read as (n, h, w)

        boxes_dev, _ = self._buffers("boxes", n * 4 * 4)
        frac_dev, _ = self._buffers("fraction", n * 4)
        lung_bbox_ptr(masks, n, h, w, self.threshold, self.margin, boxes_dev.ptr, frac_dev.ptr, s)
        found = self._boxes_on_host(masks, (n, h, w), boxes_dev.ptr) if self.min_region else None
        crop_boxes = boxes_dev.ptr
        k = self.crops_per_image
        if k > 1:  # the transformed boxes, transform-major, from the host
            if found is None:
                host, _ = self._download("boxes_for_tta", boxes_dev.ptr, (n, 4))
                self._stream.synchronize()
                found = host.view((n, 4), np.float32).copy()
            crop_boxes = self._upload("tta_boxes", tta_boxes(found, m.classifier))

        pre = m.classifier.preprocess
        clf_shape = (n, pre.channels, *pre.size)
        sample = int(np.prod(clf_shape)) * 4  # the bytes of one transform's n crops
        clf_in, _ = self._buffers("clf_input", k * sample)
        for t in range(k):
            crop_resize_normalize_ptr(
                work_ptr, n, side, work_shape[2], crop_boxes + t * n * 16, pre.size, pre.mean,
                pre.std, clf_in.ptr + t * sample, s,
            )  # fmt: skip
        outs = self.clf.infer_device({m.classifier.input.name: clf_in.ptr}, k * n, stream=s)
        dim = self.clf.output_shape("embedding", k * n)
        results = {
            "logit": self._download("logit", outs["logit"], (k * n,)),
            "embedding": self._download("embedding", outs["embedding"], dim),
            "boxes": self._download("boxes", boxes_dev.ptr, (n, 4)),
            "fraction": self._download("fraction", frac_dev.ptr, (n,)),
            "masks": self._download("masks", masks, (n, h, w)),
        }
        if with_work:  # the previews need the work images on the host
            results["work"] = self._download("work_out", work_ptr, tuple(work_shape))
        self._stream.synchronize()
        host = {key: buf.view(shape, np.float32).copy() for key, (buf, shape) in results.items()}
        prob, embedding = tta_mean(host["logit"], host["embedding"], m.classifier)
        return Predictions(
            prob=prob,
            boxes=host["boxes"],
            fraction=host["fraction"],
            embedding=embedding,
            lung_mask=host["masks"] >= self.threshold,  # as the CPU path: float32 >= logit
            work=host.get("work"),
        )

    def _boxes_on_host(self, masks: int, shape: tuple[int, int, int], boxes_ptr: int) -> np.ndarray:
        """The boxes of a segmenter whose box rule leaves out small mask regions: the kernel
        has no connected regions, so kernels.reference.lung_bbox finds them on the host (the
        masks are 256 KB an image) and they replace the kernel's before the crop; returned."""
        from kernels.reference import lung_bbox

        host, _ = self._download("masks_for_boxes", masks, shape)
        self._stream.synchronize()
        found, _ = lung_bbox(
            host.view(shape, np.float32), self.threshold, self.margin, self.min_region
        )
        staged = self._host_buffer("boxes_from_host", found.nbytes)
        staged.view(found.shape, np.float32)[...] = found
        cuda.copy_to_device(boxes_ptr, staged.ptr, found.nbytes, self._stream.handle)
        return found

    def close(self) -> None:
        with self._stage_lock:  # waits for a copy in progress in the pipeline thread
            if self._closed:
                return
            self._closed = True
            self._ingest.synchronize()
        self._stream.synchronize()
        for d in self._dev.values():
            d.free()
        for h in self._host.values():
            h.free()
        for slot in self._slots:
            slot.free()
        self._dev.clear()
        self._host.clear()
        self._slots.clear()
        self._free_slots.clear()
        self._stream.close()
        self._ingest.close()


def _copy_into(buf: cuda.DeviceBuffer, src: DeviceArray, stream: int) -> DeviceArray:
    buf.reserve(src.nbytes)
    cuda.copy_device_to_device(buf.ptr, src.ptr, src.nbytes, stream)
    return DeviceArray(ptr=buf.ptr, shape=src.shape, dtype=src.dtype)


def _concat(parts: list[Predictions]) -> Predictions:
    if len(parts) == 1:
        return parts[0]
    joined: dict[str, Any] = {}
    for f in Predictions.__slots__:
        first = getattr(parts[0], f)
        joined[f] = None if first is None else np.concatenate([getattr(p, f) for p in parts])
    return Predictions(**joined)
