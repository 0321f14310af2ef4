"""segment -> lung box -> crop -> classify with everything between the models on the GPU.

The CPU path (engine/runner.py's Screener.infer) copies the segmenter's masks to the host, runs
kernels/reference.py and copies the classifier input back; here the masks stay on the device:

    seg_input, work (host) --H2D--> segmenter plan --mask logits--> lung_bbox.cu --boxes-->
    crop_resize_normalize.cu (work image) --classifier input--> classifier plan
    --D2H--> logit, embedding, boxes, fraction, mask (thresholded on the host)

Only the two network inputs go up and the results come down (the masks too, because the
runner keeps a lung-mask preview per image; 256 KB per image at 256 x 256). Same semantics as the CPU
path (the kernels are tested bit for bit against the reference, the plans against ONNX
Runtime), so the Screener can use it whenever both backends are TensorRT backends:
``GpuStages(models, seg_backend, clf_backend).infer(pre.work, pre.seg_input)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.models import ModelSet
from engine.runtime import cuda
from engine.runtime.tensorrt import TensorRTBackend
from engine.stages.segment import logit_threshold


@dataclass(frozen=True, slots=True)
class GpuPredictions:
    prob: np.ndarray  # (n,) float32
    boxes: np.ndarray  # (n, 4) normalised, margin included
    fraction: np.ndarray  # (n,)
    embedding: np.ndarray  # (n, D) float32
    lung_mask: np.ndarray  # (n, h, w) bool, at the segmenter's resolution (for previews)


class GpuStages:
    """Owns the device buffers between the two plans; one instance per Screener."""

    def __init__(
        self, models: ModelSet, segmenter: TensorRTBackend, classifier: TensorRTBackend
    ) -> None:
        if segmenter.plan is None or classifier.plan is None:
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
        self.max_batch = min(segmenter.plan.max_batch, classifier.plan.max_batch)
        self.threshold = logit_threshold(models.segmenter.threshold)
        self.margin = models.classifier.crop.margin
        self._stream = cuda.Stream()
        self._dev: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.HostBuffer] = {}

    def _buffers(self, name: str, nbytes: int) -> tuple[cuda.DeviceBuffer, cuda.HostBuffer]:
        dev = self._dev.setdefault(name, cuda.DeviceBuffer())
        host = self._host.setdefault(name, cuda.HostBuffer())
        dev.reserve(nbytes)
        host.reserve(nbytes)
        return dev, host

    def _upload(self, name: str, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, np.float32)
        dev, host = self._buffers(name, x.nbytes)
        host.view(x.shape, np.float32)[...] = x
        cuda.copy_to_device(dev.ptr, host.ptr, x.nbytes, self._stream.handle)
        return dev.ptr

    def _download(self, name: str, ptr: int, shape: tuple[int, ...]) -> Any:
        nbytes = int(np.prod(shape)) * 4
        _, host = self._buffers(name, nbytes)
        cuda.copy_to_host(host.ptr, ptr, nbytes, self._stream.handle)
        return host, shape

    def infer(self, work: np.ndarray, seg_input: np.ndarray) -> GpuPredictions:
        """work (n, S, S) and seg_input (n, 1, h, w) float32 host arrays -> predictions."""
        parts = [
            self._infer(work[i : i + self.max_batch], seg_input[i : i + self.max_batch])
            for i in range(0, len(work), self.max_batch)
        ]
        if len(parts) == 1:
            return parts[0]
        return GpuPredictions(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in GpuPredictions.__slots__)
        )

    def _infer(self, work: np.ndarray, seg_input: np.ndarray) -> GpuPredictions:
        from kernels.nvrtc import crop_resize_normalize_ptr, lung_bbox_ptr

        m = self.models
        n, side = work.shape[0], work.shape[1]
        s = self._stream.handle
        seg_in = self._upload("seg_input", seg_input)
        work_ptr = self._upload("work", work)
        mask_name = m.segmenter.outputs[0].name
        masks = self.seg.infer_device({m.segmenter.input.name: seg_in}, n, stream=s)[mask_name]
        h, w = self.seg.output_shape(mask_name, n)[-2:]  # (n, 1, h, w) read as (n, h, w)

        boxes_dev, _ = self._buffers("boxes", n * 4 * 4)
        frac_dev, _ = self._buffers("fraction", n * 4)
        lung_bbox_ptr(masks, n, h, w, self.threshold, self.margin, boxes_dev.ptr, frac_dev.ptr, s)

        pre = m.classifier.preprocess
        clf_shape = (n, pre.channels, *pre.size)
        clf_in, _ = self._buffers("clf_input", int(np.prod(clf_shape)) * 4)
        crop_resize_normalize_ptr(
            work_ptr, n, side, work.shape[2], boxes_dev.ptr, pre.size, pre.mean, pre.std,
            clf_in.ptr, s,
        )  # fmt: skip
        outs = self.clf.infer_device({m.classifier.input.name: clf_in.ptr}, n, stream=s)
        dim = self.clf.output_shape("embedding", n)
        results = {
            "logit": self._download("logit", outs["logit"], (n,)),
            "embedding": self._download("embedding", outs["embedding"], dim),
            "boxes": self._download("boxes", boxes_dev.ptr, (n, 4)),
            "fraction": self._download("fraction", frac_dev.ptr, (n,)),
            "masks": self._download("masks", masks, (n, h, w)),
        }
        self._stream.synchronize()
        host = {k: buf.view(shape, np.float32).copy() for k, (buf, shape) in results.items()}
        logit = host["logit"].astype(np.float64)
        prob = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)  # as engine.stages.classify
        return GpuPredictions(
            prob=prob,
            boxes=host["boxes"],
            fraction=host["fraction"],
            embedding=host["embedding"],
            lung_mask=host["masks"] >= self.threshold,  # as the CPU path: float32 >= logit
        )

    def close(self) -> None:
        self._stream.synchronize()
        for d in self._dev.values():
            d.free()
        for h in self._host.values():
            h.free()
        self._dev.clear()
        self._host.clear()
        self._stream.close()
