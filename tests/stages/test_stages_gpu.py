"""engine.stages.gpu: GpuStages' own checks and bookkeeping. Without a GPU, on the emulated
CUDA of test_device_batch.py (host memory, kernels/reference.py for the kernels, ONNX Runtime
for the plans): what the constructor refuses, chunking by the smaller plan's batch, `predict`,
`ingest`, buffer reuse, dtype conversion on upload, close, `_concat`. On a GPU (marked `gpu`):
the same stages with real CUDA memory, streams and the NVRTC kernels, the plans stood in by
ONNX Runtime on device copies, against the CPU stages. The DALI hand-over (stage, slots,
streams) is in test_device_batch.py; TensorRT plans with these stages in test_tensorrt.py."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from gpu_utils import requires_gpu
from test_device_batch import (
    MAX_BATCH,
    EmulatedBuffer,
    EmulatedCuda,
    EmulatedPlan,
    assert_matches,
    cpu_path,
    view,
)

from engine.pipeline import DeviceArray, DeviceBatch, Preprocessed
from engine.runtime.onnxrt import OnnxRuntimeBackend
from engine.stages.base import Predictions, StageClock
from engine.stages.gpu import GpuStages, _concat, _Slot
from engine.stages.segment import logit_threshold

SIDE, SEG = 128, (64, 64)  # the tiny models' work image and segmenter input


def host_batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(work (n, S, S) in [0, 1], seg_input (n, 1, h, w)) float32."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)
    work = np.clip(ramp[None, None, :] * rng.uniform(0.5, 1, (n, SIDE, 1)), 0, 1)
    seg = rng.normal(0, 1, (n, 1, *SEG))
    return work.astype(np.float32), seg.astype(np.float32)


def infer_once(models: Any, seg: Any, clf: Any, work: np.ndarray, seg_input: np.ndarray) -> Any:
    """Predictions of fresh GpuStages over the two plans on host arrays; the stages closed."""
    stages = GpuStages(models, seg, clf)
    try:
        return stages.infer(work, seg_input)
    finally:
        stages.close()


class CountingPlan(EmulatedPlan):
    """EmulatedPlan that records the batch of each call."""

    def __init__(self, manifest: Any, max_batch: int) -> None:
        super().__init__(manifest, max_batch)
        self.batches: list[int] = []

    def infer_device(self, inputs, batch, *, stream=None):
        self.batches.append(batch)
        return super().infer_device(inputs, batch, stream=stream)


@pytest.fixture
def emulated(tiny_models, monkeypatch):
    emu = EmulatedCuda(monkeypatch)
    seg = CountingPlan(tiny_models.segmenter, MAX_BATCH)
    clf = CountingPlan(tiny_models.classifier, 8)
    stages = GpuStages(tiny_models, seg, clf)
    yield stages, emu, seg, clf
    stages.close()


# ---------------------------------------------------------------------------------------------
# the constructor


def plan(max_batch: int = 4, dtype: Any = np.float32) -> SimpleNamespace:
    return SimpleNamespace(max_batch=max_batch, tensor_dtype=lambda name: np.dtype(dtype))


def test_the_stages_need_loaded_plans(tiny_models):
    for seg, clf in ((plan(0), plan()), (plan(), plan(0))):
        with pytest.raises(ValueError, match="load both TensorRT backends"):
            GpuStages(tiny_models, seg, clf)  # type: ignore[arg-type]


def test_the_stages_need_a_crop_section(tiny_models):
    no_crop = replace(tiny_models, classifier=replace(tiny_models.classifier, crop=None))
    with pytest.raises(ValueError, match="classifier manifest has no crop section"):
        GpuStages(no_crop, plan(), plan())  # type: ignore[arg-type]


def test_the_stages_need_float32_tensors(tiny_models):
    with pytest.raises(ValueError, match="the segmenter plan's 'image' is float16; the GPU stages"):
        GpuStages(tiny_models, plan(dtype=np.float16), plan())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the classifier plan's 'image' is float16"):
        GpuStages(tiny_models, plan(), plan(dtype=np.float16))  # type: ignore[arg-type]


def test_settings_come_from_the_manifests(emulated, tiny_models):
    stages, _, _, _ = emulated
    assert stages.device == "gpu"
    assert stages.max_batch == MAX_BATCH  # the smaller plan's
    assert stages.threshold == logit_threshold(tiny_models.segmenter.threshold)
    assert stages.margin == tiny_models.classifier.crop.margin
    assert stages.ingest_stream != stages._stream.handle  # two streams


# ---------------------------------------------------------------------------------------------
# inference on the emulated device


def test_host_arrays_run_in_chunks_of_the_smaller_max_batch(emulated, tiny_models):
    stages, emu, seg, clf = emulated
    work, seg_input = host_batch(7)
    got = stages.infer(work, seg_input)
    assert seg.batches == clf.batches == [3, 3, 1]
    assert got.prob.shape == (7,) and got.embedding.shape[0] == 7
    assert got.lung_mask.shape == (7, *SEG) and got.lung_mask.dtype == bool
    assert got.work is None  # the caller has its host arrays
    assert ((got.prob > 0) & (got.prob < 1)).all()
    assert_matches(got, cpu_path(tiny_models, work, seg_input))
    assert emu.kinds().count("sync") == 3  # one wait per chunk, for its results


def test_uploads_take_any_float_layout(emulated, tiny_models):
    stages, _, _, _ = emulated
    work, seg_input = host_batch(2, seed=3)
    want = stages.infer(work, seg_input)
    got = stages.infer(np.asfortranarray(work.astype(np.float64)), seg_input.astype(np.float64))
    assert_matches(got, {f: getattr(want, f) for f in ("prob", "boxes", "fraction", "embedding")})


class SpeckPlan(EmulatedPlan):
    """The segmenter plan with set logits: two lung blocks and a one-pixel speck far out."""

    def infer_device(self, inputs, batch, *, stream=None):
        logits = np.full((batch, 1, *SEG), -4.0, np.float32)
        logits[:, :, 10:50, 8:28] = 4.0
        logits[:, :, 12:52, 36:56] = 4.0
        logits[:, :, 1, 62] = 4.0  # the speck: without the rule it stretches every box
        buf = self._out.setdefault("mask_logit", EmulatedBuffer())
        buf.reserve(logits.nbytes)
        view(buf.ptr, logits.shape)[...] = logits
        return {"mask_logit": buf.ptr}


def test_a_box_rule_without_specks_finds_the_boxes_on_the_host(tiny_models, monkeypatch):
    from kernels.reference import lung_bbox

    EmulatedCuda(monkeypatch)
    models = replace(tiny_models, segmenter=replace(tiny_models.segmenter, box_min_region=0.01))
    work, seg_input = host_batch(4, seed=3)
    got = infer_once(models, SpeckPlan(models.segmenter, MAX_BATCH),
                     EmulatedPlan(models.classifier, 8), work, seg_input)  # fmt: skip
    mask = got.lung_mask.astype(np.float32)
    margin = models.classifier.crop.margin
    want, fraction = lung_bbox(mask, 0.5, margin, 0.01)
    np.testing.assert_array_equal(got.boxes, want)
    np.testing.assert_array_equal(got.fraction, fraction)  # every pixel counts here
    every_pixel, _ = lung_bbox(mask, 0.5, margin)
    assert (got.boxes[:, 1] > every_pixel[:, 1]).all()  # the speck no longer sets the top
    assert (got.boxes[:, 2] < every_pixel[:, 2]).all()  # nor the right edge

    # with test-time crops too: their boxes are moved from the boxes found on the host
    from engine.runtime.onnxrt import OnnxRuntimeBackend
    from engine.stages.classify import classify
    from engine.stages.crop import classifier_crops

    tta = replace(
        models,
        classifier=replace(
            models.classifier, tta=((1.05, 0.96, 0.02, -0.03), (0.95, 1.0, -0.01, 0.02))
        ),
    )
    with_crops = infer_once(tta, SpeckPlan(tta.segmenter, MAX_BATCH),
                            EmulatedPlan(tta.classifier, 8), work, seg_input)  # fmt: skip
    np.testing.assert_array_equal(with_crops.boxes, want)
    with OnnxRuntimeBackend(tta.classifier) as clf:
        prob, _ = classify(clf, tta.classifier, classifier_crops(work, want, tta.classifier))
    np.testing.assert_allclose(with_crops.prob, prob, rtol=1e-5, atol=1e-6)


def test_test_time_crops_run_in_one_classifier_call_and_match_the_cpu_path(
    tiny_models, monkeypatch
):
    transforms = ((1.06, 0.95, 0.03, -0.02), (0.93, 1.04, -0.04, 0.01))
    models = replace(tiny_models, classifier=replace(tiny_models.classifier, tta=transforms))
    EmulatedCuda(monkeypatch)
    seg, clf = CountingPlan(models.segmenter, MAX_BATCH), CountingPlan(models.classifier, 4)
    stages = GpuStages(models, seg, clf)
    assert stages.crops_per_image == 2
    assert stages.max_batch == 2  # the classifier plan's 4 crops a call, 2 an image
    stages.close()
    work, seg_input = host_batch(5, seed=2)
    got = infer_once(models, seg, clf, work, seg_input)
    assert seg.batches == [2, 2, 1] and clf.batches == [4, 4, 2]  # 2 crops an image, one call
    assert got.prob.shape == (5,) and got.boxes.shape == (5, 4)
    assert_matches(got, cpu_path(models, work, seg_input))
    one = infer_once(tiny_models, CountingPlan(tiny_models.segmenter, MAX_BATCH),
                     CountingPlan(tiny_models.classifier, 4), work, seg_input)  # fmt: skip
    np.testing.assert_array_equal(got.boxes, one.boxes)
    assert not np.allclose(got.prob, one.prob)


def test_a_classifier_plan_smaller_than_the_test_time_crops_is_refused(tiny_models):
    models = replace(tiny_models, classifier=replace(tiny_models.classifier,
                                                     tta=((1.0, 1.0, 0.0, 0.0),) * 3))  # fmt: skip
    with pytest.raises(ValueError, match="at most 2 crops a call, fewer than the 3 test-time"):
        GpuStages(models, plan(4), plan(2))  # type: ignore[arg-type]


def test_predict_times_the_fused_stage(emulated):
    stages, _, _, _ = emulated
    work, seg_input = host_batch(2)
    clock = StageClock()
    preds = stages.predict(
        Preprocessed(ok=[0, 1], work=work, seg_input=seg_input, errors={}), clock
    )
    assert list(clock.seconds) == ["segment+crop+classify (gpu)"]
    np.testing.assert_array_equal(preds.prob, stages.infer(work, seg_input).prob)


def device_batch(work: np.ndarray, seg_input: np.ndarray) -> DeviceBatch:
    """A DeviceBatch over host arrays (device memory, as the emulated CUDA sees it)."""
    f32 = np.dtype(np.float32)
    return DeviceBatch(
        ok=list(range(len(work))),
        work=DeviceArray(ptr=work.ctypes.data, shape=work.shape, dtype=f32),
        seg_input=DeviceArray(ptr=seg_input.ctypes.data, shape=seg_input.shape, dtype=f32),
        errors={},
        stream=123,
    )


def test_ingest_stages_device_batches_and_passes_host_ones(emulated):
    stages, _, _, _ = emulated
    work, seg_input = host_batch(2)
    host = Preprocessed(ok=[0, 1], work=work, seg_input=seg_input, errors={1: "x"})
    device = device_batch(work, seg_input)
    asked = []

    def run_device(samples, *, cuda_stream):
        asked.append(cuda_stream)
        return answer

    pre = SimpleNamespace(run_device=run_device)
    answer: Any = host
    assert stages.ingest(pre, []) is host  # type: ignore[arg-type]
    answer = device
    staged = stages.ingest(pre, [])  # type: ignore[arg-type]
    assert asked == [stages.ingest_stream] * 2
    assert isinstance(staged.owner, _Slot) and staged.stream is None
    assert staged.work.ptr != work.ctypes.data  # a copy in the stages' own memory
    work[...] = 0  # DALI reuses its buffer: the staged copy keeps the batch
    got = stages.infer(staged)
    np.testing.assert_array_equal(got.work, host_batch(2)[0])


def test_buffers_are_kept_between_batches(emulated):
    stages, _, _, _ = emulated
    stages.infer(*host_batch(3))
    assert set(stages._dev) == {"seg_input", "work", "boxes", "fraction", "clf_input"}
    ptrs = {k: b.ptr for k, b in stages._dev.items()}
    stages.infer(*host_batch(2, seed=1))  # smaller: the same buffers
    assert {k: b.ptr for k, b in stages._dev.items()} == ptrs


def test_close_frees_everything_once(emulated):
    stages, emu, _, _ = emulated
    stages.infer(*host_batch(1))
    buffers = [*stages._dev.values(), *stages._host.values()]
    stages.close()
    assert all(b.ptr == 0 for b in buffers) and not stages._dev and not stages._host
    closes = [e for e in emu.log if e[0] == "close"]
    assert sorted(h for _, h in closes) == sorted([stages._stream.handle, stages.ingest_stream])
    stages.close()  # again: nothing more
    assert [e for e in emu.log if e[0] == "close"] == closes


# ---------------------------------------------------------------------------------------------
# _concat


def preds(n: int, start: int, work: bool) -> Predictions:
    r = np.arange(start, start + n, dtype=np.float32)
    return Predictions(
        prob=r,
        boxes=np.repeat(r[:, None], 4, 1),
        fraction=r,
        embedding=np.repeat(r[:, None], 3, 1),
        lung_mask=np.zeros((n, 2, 2), bool),
        work=np.zeros((n, 2, 2), np.float32) if work else None,
    )


def test_concat_joins_chunks_in_order_and_keeps_absent_fields_absent():
    one = preds(2, 0, work=False)
    assert _concat([one]) is one
    joined = _concat([preds(2, 0, work=False), preds(1, 2, work=False)])
    assert joined.prob.tolist() == [0, 1, 2] and joined.boxes.shape == (3, 4)
    assert joined.work is None
    with_work = _concat([preds(2, 0, work=True), preds(3, 2, work=True)])
    assert with_work.work.shape == (5, 2, 2) and with_work.embedding[:, 0].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


# ---------------------------------------------------------------------------------------------
# on a GPU: real memory, streams and kernels


class DevicePlan:
    """A DeviceBackend stand-in on a real GPU: the input copied down, ONNX Runtime, the outputs
    copied up into its own device buffers (so GpuStages' CUDA plumbing runs for real without
    TensorRT)."""

    def __init__(self, manifest: Any, max_batch: int) -> None:
        from engine.runtime import cuda

        self.cuda = cuda
        self.manifest = manifest
        self.max_batch = max_batch
        self._ort = OnnxRuntimeBackend(manifest)
        self._ort.load()
        self._out: dict[str, Any] = {}
        self._host: list[Any] = []

    def tensor_dtype(self, name: str) -> np.dtype[Any]:
        return np.dtype(np.float32)

    def output_shape(self, name: str, batch: int) -> tuple[int, ...]:
        spec = next(s for s in (*self.manifest.inputs, *self.manifest.outputs) if s.name == name)
        return (batch, *spec.shape[1:])

    def infer_device(self, inputs, batch, *, stream=None):
        cuda, s = self.cuda, int(stream or 0)
        name = self.manifest.input.name
        shape = self.output_shape(name, batch)
        host = cuda.HostBuffer(int(np.prod(shape)) * 4)
        self._host.append(host)
        cuda.copy_to_host(host.ptr, inputs[name], host.nbytes, s)
        cuda.synchronize(s)
        ptrs = {}
        for out, arr in self._ort.infer({name: host.view(shape, np.float32).copy()}).items():
            arr = np.ascontiguousarray(arr, np.float32)
            up = cuda.HostBuffer(arr.nbytes)
            self._host.append(up)
            up.view(arr.shape, np.float32)[...] = arr
            dev = self._out.setdefault(out, cuda.DeviceBuffer())
            dev.reserve(arr.nbytes)
            cuda.copy_to_device(dev.ptr, up.ptr, arr.nbytes, s)
            ptrs[out] = dev.ptr
        cuda.synchronize(s)
        return ptrs

    def close(self) -> None:
        for b in [*self._out.values(), *self._host]:
            b.free()


@pytest.mark.gpu
@requires_gpu
def test_on_a_gpu_the_stages_equal_the_cpu_stages(tiny_models):
    seg = DevicePlan(tiny_models.segmenter, MAX_BATCH)
    clf = DevicePlan(tiny_models.classifier, 8)
    stages = GpuStages(tiny_models, seg, clf)  # type: ignore[arg-type]
    try:
        work, seg_input = host_batch(7, seed=5)
        got = stages.infer(work, seg_input)
    finally:
        stages.close()
        seg.close()
        clf.close()
    want = cpu_path(tiny_models, work, seg_input)  # ONNX Runtime in the same chunks of 3
    # the kernels equal kernels/reference.py: boxes and fractions exact, crops within 1e-5
    np.testing.assert_array_equal(got.boxes, want["boxes"])
    np.testing.assert_array_equal(got.fraction, want["fraction"])
    np.testing.assert_array_equal(got.lung_mask, want["lung_mask"])
    np.testing.assert_allclose(got.prob, want["prob"], atol=1e-4)
    np.testing.assert_allclose(got.embedding, want["embedding"], atol=1e-4)
    assert got.work is None
