"""The DALI preprocessing pipeline: ONE graph, device is a parameter.

    encoded bytes (PNG/JPEG) --decode(gray, uint16)--+
                                                     +--> float --resize(S x S)--> intensity
    DICOM pixels (uint16, from pydicom) -------------+        normalise --> work image [0, 1]
                                                                   |
                                         resize(seg size) -> (x - mean) / std -> segmenter input

Decoding to uint16 keeps 16-bit PNGs exact and scales 8-bit sources by 257, so every source
lands on the same 0..65535 scale. DICOM pixels come through ``external_source`` and join the
decoded ones through a DALI conditional, so both run through the same operators. The work
image is the square the lung crop is later cut from (the classifier manifest's
``crop.source_size``); the segmenter input is derived from it.

DALI's operators are imported lazily so that ``import engine`` stays cheap.

On the GPU, ``Preprocessor.run_device`` hands DALI's device buffers on as a ``DeviceBatch``
(pointers, shape, dtype) instead of copying them to the host; engine/stages/gpu.py consumes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.errors import ConfigError, ImageError
from engine.models import ModelSet

UINT16_MAX = 65535.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One image ready for the pipeline: encoded bytes, or decoded uint16 (H, W) pixels."""

    encoded: np.ndarray | None = None  # uint8, 1-D
    pixels: np.ndarray | None = None  # uint16, (H, W)


@dataclass(frozen=True, slots=True)
class Preprocessed:
    """Pipeline output for the samples that decoded; failures are listed by index."""

    ok: list[int]  # indices into the input batch
    work: np.ndarray  # (n_ok, S, S) float32 in [0, 1]
    seg_input: np.ndarray  # (n_ok, 1, h, w) float32, normalised for the segmenter
    errors: dict[int, str]


# One image's preprocessing: (work (S, S), segmenter input (1, h, w)), or why it failed.
Decoded = tuple[np.ndarray, np.ndarray] | str


def assemble(results: Sequence[Decoded]) -> Preprocessed:
    """The batch of per-image results (in input order): what `run` returns for those images."""
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
    if not ok:
        return Preprocessed(
            ok=[],
            work=np.empty((0, 0, 0), np.float32),
            seg_input=np.empty((0, 1, 0, 0), np.float32),
            errors=errors,
        )
    work = np.stack([results[i][0] for i in ok])
    seg = np.stack([results[i][1] for i in ok])
    return Preprocessed(ok=ok, work=work, seg_input=seg, errors=errors)


def decode_one(preprocessor: ImagePreprocessor, sample: Sample) -> Decoded:
    """`preprocessor.run_one(sample)`, or the ImageError's message."""
    try:
        return preprocessor.run_one(sample)
    except ImageError as exc:
        return str(exc)


# DALI's type names -> NumPy (DALIDataType members; only what a pipeline here can output)
_DALI_DTYPES = {
    "FLOAT": np.float32,
    "FLOAT16": np.float16,
    "FLOAT64": np.float64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


@dataclass(frozen=True, slots=True)
class DeviceArray:
    """A dense, C-contiguous array in GPU memory that something else owns: a description only."""

    ptr: int  # device address of element 0
    shape: tuple[int, ...]  # (n, ...): the first axis is the batch
    dtype: np.dtype[Any]

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, np.dtype):
            raise ValueError(f"dtype must be a numpy dtype, not {self.dtype!r}")
        if not self.shape or any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"shape must be (n, ...) with sizes >= 0, not {self.shape!r}")
        if not isinstance(self.ptr, int) or self.ptr < 0 or (self.ptr == 0 and self.nbytes):
            raise ValueError(f"device pointer {self.ptr!r} for {self.nbytes} bytes")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def sample_nbytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.sample_nbytes

    def reshape(self, shape: tuple[int, ...]) -> DeviceArray:
        """The same bytes under another shape with the same batch size and element count."""
        if shape[:1] != self.shape[:1] or np.prod(shape) != np.prod(self.shape):
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return DeviceArray(ptr=self.ptr, shape=tuple(shape), dtype=self.dtype)


def device_array(tensor_list: Any) -> DeviceArray:
    """A DALI TensorListGPU as a DeviceArray, without a copy.

    ``as_tensor()`` views the batch as one (n, ...) tensor; DALI allows it only when the samples
    have one shape and lie contiguously in memory (``is_dense_tensor``), and raises otherwise.
    ``data_ptr()`` is the address of its first element (DALI's TensorListGPU/TensorGPU docs).
    """
    if not tensor_list.is_dense_tensor():
        raise ValueError("DALI's output batch is not dense (samples of different shapes)")
    tensor = tensor_list.as_tensor()
    name = getattr(tensor_list.dtype, "name", str(tensor_list.dtype))
    if name not in _DALI_DTYPES:
        raise ValueError(f"DALI output type {name} has no NumPy equivalent here")
    return DeviceArray(
        ptr=int(tensor.data_ptr()),
        shape=tuple(int(d) for d in tensor.shape()),
        dtype=np.dtype(_DALI_DTYPES[name]),
    )


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    """``Preprocessed`` with the two arrays left in GPU memory (see ``Preprocessor.run_device``).

    ``stream`` is the CUDA stream the data is ordered on (read it there, or after synchronising
    it); None means the data was complete when the batch was made. ``owner`` holds the memory:
    DALI's output TensorLists, which DALI may recycle on the pipeline's next run, or the
    GPU stages' own buffers once ``GpuStages.stage`` has copied it there.
    """

    ok: list[int]  # indices into the input batch
    work: DeviceArray  # (n_ok, S, S) float32 in [0, 1]
    seg_input: DeviceArray  # (n_ok, 1, h, w) float32, normalised for the segmenter
    errors: dict[int, str]
    stream: int | None = None
    owner: Any = None

    def __post_init__(self) -> None:
        n = len(self.ok)
        for name, arr, ndim in (("work", self.work, 3), ("seg_input", self.seg_input, 4)):
            if len(arr.shape) != ndim or len(arr) != n:
                raise ValueError(
                    f"{name} must be {ndim}-D with {n} samples (one per ok index), not {arr.shape}"
                )
            if arr.dtype != np.float32:
                raise ValueError(f"{name} must be float32, not {arr.dtype}")


class ImagePreprocessor(Protocol):
    """What the Screener and the stages use of a preprocessor: ``Preprocessor`` (DALI) here,
    ``PilPreprocessor`` (engine/pipeline_pil.py) beside it, with the same numbers."""

    device: str  # "cpu" | "gpu"
    batch_size: int
    # run_one may be called from several threads at once and costs per image what run does:
    # a caller may then preprocess images one by one in its own threads and `assemble` the
    # batch (the Pillow preprocessor). DALI runs whole batches: False.
    per_image: bool

    def run(self, samples: Sequence[Sample]) -> Preprocessed:
        """A batch to the host; a bad image is an error entry, never a failed batch."""
        ...

    def run_device(
        self, samples: Sequence[Sample], *, cuda_stream: int | None = None
    ) -> DeviceBatch | Preprocessed:
        """``run`` with the arrays left in GPU memory (ConfigError off the GPU)."""
        ...

    def run_one(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Work image (S, S) and segmenter input (1, h, w) of one sample; ImageError if bad."""
        ...

    def close(self) -> None: ...


def _define(models: ModelSet, *, device: str, batch_size: int, threads: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    seg_pre = models.segmenter.preprocess
    clf = models.classifier
    if clf.crop is None:  # validated in the manifest; guards a hand-built ModelSet
        raise ConfigError("classifier manifest has no crop section")
    side = clf.crop.source_size
    intensity = clf.preprocess.intensity
    decode_device = "mixed" if device == "gpu" else "cpu"

    @pipeline_def(  # type: ignore[call-overload]  # DALI's stubs lack exec_dynamic
        batch_size=batch_size,
        num_threads=threads,
        device_id=0 if device == "gpu" else None,
        prefetch_queue_depth=1,  # we feed one batch and run it; no look-ahead inside DALI
        exec_dynamic=True,
        enable_conditionals=True,
    )
    def preprocess():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        pixels = fn.external_source(name="pixels", dtype=types.UINT16, ndim=3, layout="HWC")
        is_pixels = fn.external_source(name="is_pixels", dtype=types.BOOL, ndim=0)
        if is_pixels:
            image = pixels.gpu() if device == "gpu" else pixels
        else:
            image = fn.decoders.image(
                encoded, device=decode_device, output_type=types.GRAY, dtype=types.UINT16
            )
        image = fn.cast(image, dtype=types.FLOAT)
        work = fn.resize(image, size=[side, side], interp_type=types.INTERP_LINEAR, antialias=True)
        if intensity == "minmax":
            lo = fn.reductions.min(work)
            hi = fn.reductions.max(work)
            work = (work - lo) / dmath.max(hi - lo, 1e-6)
        else:
            work = work * (1.0 / UINT16_MAX)
        seg = fn.resize(
            work, size=list(seg_pre.size), interp_type=types.INTERP_LINEAR, antialias=True
        )
        seg = fn.crop_mirror_normalize(
            seg, mean=list(seg_pre.mean), std=list(seg_pre.std), output_layout="CHW"
        )
        return work, seg

    return preprocess()


_EMPTY_ENCODED = np.zeros((1,), np.uint8)
_EMPTY_PIXELS = np.zeros((1, 1, 1), np.uint16)


class Preprocessor:
    """Runs batches through the pipeline; one bad image never fails the others."""

    per_image = False  # one DALI pipeline, run a batch at a time

    def __init__(self, models: ModelSet, *, device: str = "cpu", batch_size: int, threads: int):
        if device not in ("cpu", "gpu"):
            raise ConfigError(f"pipeline device must be 'cpu' or 'gpu', not {device!r}")
        self.device = device
        self.batch_size = batch_size
        self._pipe = _define(models, device=device, batch_size=batch_size, threads=threads)
        self._pipe.build()

    def _check_batch(self, samples: Sequence[Sample]) -> None:
        if not samples:
            raise ValueError("empty batch")
        if len(samples) > self.batch_size:
            raise ValueError(f"batch of {len(samples)} exceeds the pipeline's {self.batch_size}")

    def run(self, samples: Sequence[Sample]) -> Preprocessed:
        self._check_batch(samples)
        try:
            work, seg = self._run(samples)
            return Preprocessed(ok=list(range(len(samples))), work=work, seg_input=seg, errors={})
        except RuntimeError:
            pass  # also for a batch of one: a bad image becomes an error entry, never a crash
        return self._run_one_by_one(samples)

    def run_device(
        self, samples: Sequence[Sample], *, cuda_stream: int | None = None
    ) -> DeviceBatch | Preprocessed:
        """``run`` without the copy to the host (device="gpu" only): DALI's own output buffers.

        The DeviceBatch points into memory DALI recycles on the pipeline's next run ("subsequent
        invocations ... invalidate the TensorList ... If you wish to retain the data you need to
        copy it", DALI docs, data_types.html#tensorlist): copy it before calling this again.
        With ``cuda_stream``, ``Pipeline.run(cuda_stream)`` returns the outputs ordered on that
        stream instead of host-synchronous (DALI docs, Pipeline.run), so a copy queued on it
        follows DALI's work without a host wait. A batch with a bad image (rerun one by one)
        or a non-dense output comes back as a host ``Preprocessed``, exactly as ``run``.
        """
        if self.device != "gpu":
            raise ConfigError("run_device needs the pipeline on the GPU (device='gpu')")
        self._check_batch(samples)
        try:
            self._feed(samples)
            work, seg = self._pipe.run() if cuda_stream is None else self._pipe.run(cuda_stream)
        except RuntimeError:
            return self._run_one_by_one(samples)
        ok = list(range(len(samples)))
        try:
            arrays = device_array(work), device_array(seg)
        except (RuntimeError, ValueError):  # not viewable as one tensor: take the host path
            host_work, host_seg = self._to_host(work, seg)
            return Preprocessed(ok=ok, work=host_work, seg_input=host_seg, errors={})
        side = arrays[0].shape[1:3]
        return DeviceBatch(
            ok=ok,
            work=arrays[0].reshape((len(ok), *side)),  # (n, S, S, 1) HWC -> (n, S, S)
            seg_input=arrays[1],
            errors={},
            stream=cuda_stream,
            owner=(work, seg),  # keeps DALI's buffers referenced until the batch is dropped
        )

    def run_one(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Work image (S, S) and segmenter input (1, h, w) of one sample; ImageError if bad."""
        try:
            work, seg = self._run([sample])
        except RuntimeError as exc:
            raise ImageError(
                f"cannot decode: the file is truncated or corrupt ({decoder_message(exc)})"
            ) from None
        return work[0], seg[0]

    def close(self) -> None:
        pass  # nothing to release early: DALI frees the pipeline with this object

    def _run_one_by_one(self, samples: Sequence[Sample]) -> Preprocessed:
        # A decoder error fails DALI's whole batch; rerun singly to pin it on the bad images.
        return assemble([decode_one(self, sample) for sample in samples])

    def _run(self, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
        self._feed(samples)
        work, seg = self._pipe.run()
        return self._to_host(work, seg)

    def _to_host(self, work: Any, seg: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.device == "gpu":
            work, seg = work.as_cpu(), seg.as_cpu()
        return work.as_array()[..., 0], seg.as_array()

    def _feed(self, samples: Sequence[Sample]) -> None:
        encoded, pixels, is_pixels = [], [], []
        for s in samples:
            if s.pixels is not None:
                encoded.append(_EMPTY_ENCODED)
                pixels.append(s.pixels.reshape(*s.pixels.shape[:2], 1))
                is_pixels.append(np.array(True))
            else:
                if s.encoded is None:
                    raise ValueError("a Sample needs encoded bytes or pixels")
                encoded.append(s.encoded)
                pixels.append(_EMPTY_PIXELS)
                is_pixels.append(np.array(False))
        self._pipe.feed_input("encoded", encoded)
        self._pipe.feed_input("pixels", pixels)
        self._pipe.feed_input("is_pixels", is_pixels)


def decoder_message(exc: BaseException) -> str:
    """The informative part of a DALI error: what follows "encountered:", if anything.

    DALI errors embed the pipeline definition's traceback, which says nothing about the image.
    """
    text = str(exc)
    _, found, tail = text.partition("encountered:")
    lines = [ln.strip() for ln in (tail if found else text).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Current pipeline", "Critical error"))]
    text = useful[0] if useful else ""
    # "Failed to decode sample #0 :" names DALI's batch slot, which means nothing to a user;
    # the decoder's own reason goes to stderr only.
    if not text or re.fullmatch(r"Failed to decode sample #\d+\s*:?", text):
        return "the decoder rejected the data"
    return text[:300]
