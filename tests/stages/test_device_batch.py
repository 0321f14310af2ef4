"""DALI's GPU output handed to the GPU stages without a copy to the host.

engine.pipeline.DeviceArray / DeviceBatch / Preprocessor.run_device, GpuStages.stage and
GpuStages.infer(DeviceBatch), Screener.preprocess_batch. Without a GPU this tests everything up
to the first driver call:

- the bookkeeping and validation of DeviceArray and DeviceBatch;
- the GPU branch of the Preprocessor on a fake DALI pipeline whose TensorListGPU stand-ins
  point into host memory and, like DALI, reuse one output buffer run after run;
- GpuStages on an emulated CUDA (host memory, memmove for every copy, kernels/reference.py for
  the two kernels, ONNX Runtime for the plans), against the CPU path on the same arrays: so the
  pointers, offsets, chunking, streams and buffer slots are right, and a batch staged before
  the next DALI run survives that run.

Marked ``gpu`` (skipped here with the reason): run_device on a real GPU equals run.
"""

from __future__ import annotations

import ctypes
import io
import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from gpu_utils import requires_gpu
from PIL import Image

import kernels.nvrtc
from engine import pipeline
from engine.errors import ConfigError
from engine.io import thumbs
from engine.io.parquet import Row
from engine.io.reader import Prepared
from engine.models import ModelSet, init_models
from engine.pipeline import DeviceArray, DeviceBatch, Preprocessed, Preprocessor, Sample
from engine.runtime import cuda
from engine.runtime.onnxrt import OnnxRuntimeBackend
from engine.screener import Screener
from engine.screening import Batch, finish_batch
from engine.stages.base import StageClock
from engine.stages.classify import classify
from engine.stages.cpu import CpuStages
from engine.stages.crop import lung_crops
from engine.stages.segment import segment
from kernels import reference

F32 = np.dtype(np.float32)
SIDE = 128  # the tiny classifier's crop.source_size
SEG = (64, 64)  # the tiny segmenter's input


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelSet:
    return init_models(tmp_path_factory.mktemp("models"), size="tiny", seed=0)


def view(ptr: int, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """NumPy array over `ptr` (host memory standing in for device memory here)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * max(count * dt.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)


# --------------------------------------------------------------------------- DeviceArray/Batch


def test_device_array_bookkeeping():
    a = DeviceArray(ptr=0x7000, shape=(4, 8, 8), dtype=F32)
    assert (len(a), a.sample_nbytes, a.nbytes) == (4, 256, 1024)
    b = a.reshape((4, 64))
    assert (b.ptr, b.shape, b.nbytes) == (a.ptr, (4, 64), a.nbytes)
    assert DeviceArray(ptr=0, shape=(0, 8), dtype=F32).nbytes == 0  # empty: no memory needed
    assert DeviceArray(ptr=0x10, shape=(3,), dtype=np.dtype(np.uint16)).nbytes == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ptr": 0x10, "shape": (), "dtype": F32}, "shape must be"),
        ({"ptr": 0x10, "shape": (2, -1), "dtype": F32}, "shape must be"),
        ({"ptr": 0x10, "shape": (2, 3.0), "dtype": F32}, "shape must be"),
        ({"ptr": 0, "shape": (2, 3), "dtype": F32}, "device pointer 0 for 24 bytes"),
        ({"ptr": -8, "shape": (2, 3), "dtype": F32}, "device pointer -8"),
        ({"ptr": 0x10, "shape": (2, 3), "dtype": np.float32}, "numpy dtype"),
    ],
)
def test_device_array_refuses_what_cannot_describe_memory(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeviceArray(**kwargs)


@pytest.mark.parametrize("shape", [(2, 128), (4, 65)])
def test_device_array_reshape_keeps_batch_and_count(shape):
    with pytest.raises(ValueError, match="cannot view"):
        DeviceArray(ptr=0x7000, shape=(4, 8, 8), dtype=F32).reshape(shape)


def batch_of(n: int, **changes: Any) -> DeviceBatch:
    fields: dict[str, Any] = {
        "ok": list(range(n)),
        "work": DeviceArray(ptr=0x1000, shape=(n, SIDE, SIDE), dtype=F32),
        "seg_input": DeviceArray(ptr=0x9000, shape=(n, 1, *SEG), dtype=F32),
        "errors": {},
    }
    return DeviceBatch(**{**fields, **changes})


def test_device_batch_validates_its_arrays():
    b = batch_of(3, stream=77)
    assert (b.stream, b.owner, len(b.work), len(b.seg_input)) == (77, None, 3, 3)
    with pytest.raises(ValueError, match=r"work must be 3-D with 2 samples"):
        batch_of(3, ok=[0, 1])
    with pytest.raises(ValueError, match=r"seg_input must be 4-D"):
        batch_of(3, seg_input=DeviceArray(ptr=0x9000, shape=(3, *SEG), dtype=F32))
    with pytest.raises(ValueError, match="work must be float32, not float16"):
        batch_of(3, work=DeviceArray(0x10, (3, SIDE, SIDE), np.dtype(np.float16)))


# --------------------------------------------------------------------------- fake DALI


class FakeTensorGPU:
    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr

    def data_ptr(self) -> int:
        return self._arr.ctypes.data

    def shape(self) -> list[int]:
        return list(self._arr.shape)


class FakeTensorListGPU:
    """What the GPU branch uses of DALI's TensorListGPU; its memory is host memory here."""

    def __init__(self, arr: np.ndarray, *, dense: bool = True, dtype: Any = None) -> None:
        from nvidia.dali import types

        self._arr, self._dense = arr, dense
        self.dtype = types.DALIDataType.FLOAT if dtype is None else dtype

    def is_dense_tensor(self) -> bool:
        return self._dense

    def as_tensor(self) -> FakeTensorGPU:
        if not self._dense:
            raise RuntimeError("The batch must be representable as a tensor")
        return FakeTensorGPU(self._arr)

    def as_cpu(self) -> Any:
        return SimpleNamespace(as_array=lambda: self._arr.copy())


def fake_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(work (S, S), seg_input (1, h, w)) that the fake pipeline makes of sample `seed`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    work = np.clip(0.6 * np.sin(6 * xx + seed) * np.cos(4 * yy) + 0.5, 0, 1)
    work += rng.uniform(0, 0.05, work.shape)
    seg = rng.normal(size=(1, *SEG)) + 2.0 * np.sin(8 * np.mgrid[0 : SEG[0], 0 : SEG[1]][1] / 64)
    return work.astype(np.float32), seg.astype(np.float32)


class FakePipe:
    """DALI stand-in: every run writes into the SAME output buffers, as DALI recycles its
    outputs; the first byte of a sample picks its image, b"bad" fails the batch."""

    def __init__(self, batch_size: int) -> None:
        self.work = np.zeros((batch_size, SIDE, SIDE, 1), np.float32)  # HWC, C = 1
        self.seg = np.zeros((batch_size, 1, *SEG), np.float32)
        self.fed: dict[str, Any] = {}
        self.run_args: list[tuple[Any, ...]] = []
        self.dense = True

    def build(self) -> None:
        pass

    def feed_input(self, name: str, data: Any) -> None:
        self.fed[name] = data

    def run(self, *args: Any) -> tuple[FakeTensorListGPU, FakeTensorListGPU]:
        self.run_args.append(args)
        encoded = self.fed["encoded"]
        if any(bytes(e) == b"bad" for e in encoded):
            raise RuntimeError("Critical error in pipeline:\nencountered:\nnot an image")
        for i, e in enumerate(encoded):
            self.work[i, ..., 0], self.seg[i] = fake_image(int(e[0]))
        n = len(encoded)
        return (
            FakeTensorListGPU(self.work[:n], dense=self.dense),
            FakeTensorListGPU(self.seg[:n], dense=self.dense),
        )


def sample(seed: int) -> Sample:
    return Sample(encoded=np.array([seed, 7, 7], np.uint8))


BAD = Sample(encoded=np.frombuffer(b"bad", np.uint8))


@pytest.fixture
def gpu_pipe(tiny, monkeypatch) -> tuple[Preprocessor, FakePipe]:
    fake = FakePipe(batch_size=8)
    monkeypatch.setattr(pipeline, "_define", lambda models, **kw: fake)
    return Preprocessor(tiny, device="gpu", batch_size=8, threads=1), fake


def expected(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [fake_image(s) for s in seeds]
    return np.stack([w for w, _ in pairs]), np.stack([s for _, s in pairs])


# --------------------------------------------------------------------------- run_device


def test_device_array_of_a_tensor_list(gpu_pipe):
    _, fake = gpu_pipe
    fake.fed["encoded"] = [sample(1).encoded, sample(2).encoded]
    work, seg = fake.run()
    a = pipeline.device_array(seg)
    assert (a.ptr, a.shape, a.dtype) == (fake.seg.ctypes.data, (2, 1, *SEG), F32)
    a = pipeline.device_array(work)
    assert (a.ptr, a.shape) == (fake.work.ctypes.data, (2, SIDE, SIDE, 1))
    from nvidia.dali import types

    with pytest.raises(ValueError, match="no NumPy equivalent"):
        pipeline.device_array(FakeTensorListGPU(fake.work, dtype=types.DALIDataType.STRING))
    with pytest.raises(ValueError, match="not dense"):
        pipeline.device_array(FakeTensorListGPU(fake.work, dense=False))


def test_run_device_hands_on_dalis_buffers_without_a_copy(gpu_pipe):
    pre, fake = gpu_pipe
    batch = pre.run_device([sample(3), sample(4), sample(5)], cuda_stream=0xABC)
    assert isinstance(batch, DeviceBatch)
    assert fake.run_args[-1] == (0xABC,)  # Pipeline.run(cuda_stream): outputs on our stream
    assert (batch.ok, batch.errors, batch.stream) == ([0, 1, 2], {}, 0xABC)
    assert batch.work == DeviceArray(fake.work.ctypes.data, (3, SIDE, SIDE), F32)
    assert batch.seg_input == DeviceArray(fake.seg.ctypes.data, (3, 1, *SEG), F32)
    assert all(isinstance(t, FakeTensorListGPU) for t in batch.owner)  # DALI's lists kept alive
    want_work, want_seg = expected([3, 4, 5])
    np.testing.assert_array_equal(view(batch.work.ptr, batch.work.shape), want_work)
    np.testing.assert_array_equal(view(batch.seg_input.ptr, batch.seg_input.shape), want_seg)


def test_run_device_without_a_stream_is_host_synchronous(gpu_pipe):
    pre, fake = gpu_pipe
    batch = pre.run_device([sample(1)])
    assert fake.run_args[-1] == () and isinstance(batch, DeviceBatch) and batch.stream is None


def test_run_device_falls_back_to_the_host_for_a_bad_image(gpu_pipe):
    pre, fake = gpu_pipe
    got = pre.run_device([sample(1), BAD, sample(2)], cuda_stream=5)
    assert isinstance(got, Preprocessed)  # rerun one by one, on the host, as `run` does
    assert got.ok == [0, 2] and list(got.errors) == [1]
    assert "cannot decode" in got.errors[1]
    want_work, want_seg = expected([1, 2])
    np.testing.assert_array_equal(got.work, want_work)
    np.testing.assert_array_equal(got.seg_input, want_seg)
    assert all(args == () for args in fake.run_args[1:])  # the singles: host-synchronous


def test_run_device_falls_back_to_the_host_when_dali_cannot_view_the_batch(gpu_pipe):
    pre, fake = gpu_pipe
    fake.dense = False
    got = pre.run_device([sample(1), sample(2)], cuda_stream=5)
    assert isinstance(got, Preprocessed) and got.ok == [0, 1] and not got.errors
    want_work, want_seg = expected([1, 2])
    np.testing.assert_array_equal(got.work, want_work)
    np.testing.assert_array_equal(got.seg_input, want_seg)


def test_run_on_the_gpu_branch_still_copies_to_the_host(gpu_pipe):
    pre, _ = gpu_pipe
    got = pre.run([sample(6), sample(7)])
    assert isinstance(got, Preprocessed)
    want_work, want_seg = expected([6, 7])
    np.testing.assert_array_equal(got.work, want_work)
    np.testing.assert_array_equal(got.seg_input, want_seg)


def test_run_device_checks_device_and_batch(tiny, gpu_pipe, monkeypatch):
    pre, _ = gpu_pipe
    with pytest.raises(ValueError, match="empty batch"):
        pre.run_device([])
    with pytest.raises(ValueError, match="exceeds"):
        pre.run_device([sample(1)] * 9)
    cpu = Preprocessor(tiny, device="cpu", batch_size=2, threads=1)  # the fake again
    with pytest.raises(ConfigError, match="device='gpu'"):
        cpu.run_device([sample(1)])


# --------------------------------------------------------------------------- emulated CUDA


class EmulatedBuffer:
    """cuda.DeviceBuffer / HostBuffer on host memory."""

    def __init__(self, nbytes: int = 0) -> None:
        self.ptr, self.nbytes, self._mem = 0, 0, None
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self._mem = np.zeros(nbytes, np.uint8)
            self.ptr, self.nbytes = self._mem.ctypes.data, nbytes

    def free(self) -> None:
        self.ptr, self.nbytes, self._mem = 0, 0, None

    def view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return view(self.ptr, shape, dtype)


class EmulatedCuda:
    """Patches engine.runtime.cuda and the two kernel launchers; logs copies and syncs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[Any, ...]] = []
        handles = itertools.count(0x5000)
        log = self.log

        class Stream:
            def __init__(self) -> None:
                self.handle = next(handles)

            def synchronize(self) -> None:
                log.append(("sync", self.handle))

            def close(self) -> None:
                log.append(("close", self.handle))

        def copier(kind: str):
            def copy(dst: int, src: int, nbytes: int, stream: int) -> None:
                ctypes.memmove(dst, src, nbytes)
                log.append((kind, stream, src, nbytes))

            return copy

        for name, value in {
            "Stream": Stream,
            "DeviceBuffer": EmulatedBuffer,
            "HostBuffer": EmulatedBuffer,
            "copy_to_device": copier("H2D"),
            "copy_to_host": copier("D2H"),
            "copy_device_to_device": copier("D2D"),
            "synchronize": lambda stream: log.append(("sync", stream)),
        }.items():
            monkeypatch.setattr(cuda, name, value)

        def lung_bbox_ptr(masks, n, h, w, threshold, margin, boxes, fraction, stream=0):
            b, f = reference.lung_bbox(view(masks, (n, h, w)), threshold, margin)
            view(boxes, (n, 4))[...], view(fraction, (n,))[...] = b, f

        def crop_ptr(images, n, height, width, boxes, out_hw, mean, std, out, stream=0):
            x = reference.crop_resize_normalize(
                view(images, (n, height, width)), view(boxes, (n, 4)), out_hw, mean, std
            )
            view(out, x.shape)[...] = x

        monkeypatch.setattr(kernels.nvrtc, "lung_bbox_ptr", lung_bbox_ptr)
        monkeypatch.setattr(kernels.nvrtc, "crop_resize_normalize_ptr", crop_ptr)

    def kinds(self) -> list[str]:
        return [e[0] for e in self.log]


class EmulatedPlan:
    """A TensorRTBackend stand-in: infer_device reads and writes host memory, runs ORT."""

    def __init__(self, manifest: Any, max_batch: int) -> None:
        self.manifest = manifest
        self.plan = SimpleNamespace(max_batch=max_batch)
        self.max_batch = max_batch
        self.streams: list[int | None] = []
        self._ort = OnnxRuntimeBackend(manifest)
        self._ort.load()
        self._out: dict[str, EmulatedBuffer] = {}

    def tensor_dtype(self, name: str) -> np.dtype[Any]:
        return F32

    def output_shape(self, name: str, batch: int) -> tuple[int, ...]:
        for spec in (*self.manifest.inputs, *self.manifest.outputs):
            if spec.name == name:
                return (batch, *spec.shape[1:])
        raise KeyError(name)

    def infer_device(self, inputs: dict[str, int], batch: int, *, stream: int | None = None):
        self.streams.append(stream)
        name = self.manifest.input.name
        x = view(inputs[name], self.output_shape(name, batch)).copy()
        ptrs = {}
        for out, arr in self._ort.infer({name: x}).items():
            buf = self._out.setdefault(out, EmulatedBuffer())
            buf.reserve(arr.nbytes)
            view(buf.ptr, arr.shape)[...] = arr
            ptrs[out] = buf.ptr
        return ptrs


MAX_BATCH = 3  # 7 images run in chunks of 3, 3, 1


@pytest.fixture
def emulated(tiny, monkeypatch):
    from engine.stages.gpu import GpuStages

    emu = EmulatedCuda(monkeypatch)
    seg, clf = EmulatedPlan(tiny.segmenter, MAX_BATCH), EmulatedPlan(tiny.classifier, 8)
    stages = GpuStages(tiny, seg, clf)
    yield stages, emu, seg, clf
    stages.close()


def cpu_path(models: ModelSet, work: np.ndarray, seg_input: np.ndarray) -> dict[str, np.ndarray]:
    """Screener's CPU path on the same arrays, in the same chunks (ORT is batch-size exact)."""
    parts = []
    with (
        OnnxRuntimeBackend(models.segmenter) as s,
        OnnxRuntimeBackend(models.classifier) as c,
    ):
        for i in range(0, len(work), MAX_BATCH):
            masks = segment(s, models.segmenter, seg_input[i : i + MAX_BATCH])
            crops = lung_crops(work[i : i + MAX_BATCH], masks, models.segmenter, models.classifier)
            prob, emb = classify(c, models.classifier, crops.classifier_input)
            parts.append({"prob": prob, "boxes": crops.boxes, "fraction": crops.fraction,
                          "embedding": emb, "lung_mask": masks >= 0.0})  # fmt: skip
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_matches(got: Any, want: dict[str, np.ndarray]) -> None:
    for k, v in want.items():
        np.testing.assert_array_equal(getattr(got, k), v, err_msg=k)


SEEDS = [11, 12, 13, 14, 15, 16, 17]


def test_gpu_stages_take_host_arrays_and_device_batches_alike(tiny, gpu_pipe, emulated):
    pre, _ = gpu_pipe
    stages, emu, seg_plan, clf_plan = emulated
    work, seg_input = expected(SEEDS)
    want = cpu_path(tiny, work, seg_input)

    host = stages.infer(work, seg_input)
    assert_matches(host, want)
    assert host.work is None  # the caller has the work images already
    assert "D2D" not in emu.kinds()

    emu.log.clear()
    batch = pre.run_device([sample(s) for s in SEEDS], cuda_stream=stages.ingest_stream)
    assert isinstance(batch, DeviceBatch)
    got = stages.infer(batch)  # not staged yet: infer stages it itself
    assert_matches(got, want)
    np.testing.assert_array_equal(got.work, work)  # for the previews
    kinds = emu.kinds()
    assert "H2D" not in kinds, "DALI's device output went through the host"
    assert kinds[:3] == ["D2D", "D2D", "sync"]  # work, seg_input, then wait for the copies
    assert {s for s in seg_plan.streams + clf_plan.streams} == {stages._stream.handle}


def test_stage_copies_on_dalis_stream_before_the_next_run(gpu_pipe, emulated, tiny):
    pre, fake = gpu_pipe
    stages, emu, _, _ = emulated
    first = pre.run_device([sample(s) for s in SEEDS[:4]], cuda_stream=stages.ingest_stream)
    assert isinstance(first, DeviceBatch)
    emu.log.clear()
    staged = stages.stage(first)
    s = stages.ingest_stream
    work_bytes, seg_bytes = 4 * SIDE * SIDE * 4, 4 * SEG[0] * SEG[1] * 4
    assert emu.log == [
        ("D2D", s, fake.work.ctypes.data, work_bytes),
        ("D2D", s, fake.seg.ctypes.data, seg_bytes),
        ("sync", s),  # DALI may reuse its buffers only after this
    ]
    assert staged.stream is None and staged.ok == first.ok
    assert staged.work.ptr != first.work.ptr and staged.work.shape == first.work.shape
    assert stages.stage(staged) is staged  # staging twice copies nothing

    # the next DALI run overwrites DALI's buffers (as DALI recycles them); the staged copy
    # is untouched, so inference on batch n can follow decoding of batch n+1
    second = pre.run_device([sample(s) for s in SEEDS[4:]], cuda_stream=s)
    assert isinstance(second, DeviceBatch) and second.work.ptr == first.work.ptr
    staged2 = stages.stage(second)
    got1, got2 = stages.infer(staged), stages.infer(staged2)
    work1, seg1 = expected(SEEDS[:4])
    work2, seg2 = expected(SEEDS[4:])
    np.testing.assert_array_equal(got1.work, work1)
    np.testing.assert_array_equal(got2.work, work2)
    assert_matches(got1, cpu_path(tiny, work1, seg1))
    assert_matches(got2, cpu_path(tiny, work2, seg2))

    # both slots are back in the pool: a third batch reuses one
    assert len(stages._slots) == 2 and len(stages._free_slots) == 2
    stages.stage(pre.run_device([sample(1)], cuda_stream=s))
    assert len(stages._slots) == 2 and len(stages._free_slots) == 1


def test_stage_uses_the_stream_the_batch_is_on(gpu_pipe, emulated):
    pre, _ = gpu_pipe
    stages, emu, _, _ = emulated
    batch = pre.run_device([sample(1)], cuda_stream=0x77)
    emu.log.clear()
    stages.stage(batch)
    assert [(e[0], e[1]) for e in emu.log] == [("D2D", 0x77), ("D2D", 0x77), ("sync", 0x77)]
    emu.log.clear()
    stages.stage(pre.run_device([sample(1)]))  # host-synchronous
    assert {e[1] for e in emu.log} == {stages.ingest_stream}


def test_gpu_stages_refuse_mixed_or_misshapen_input(emulated):
    stages, _, _, _ = emulated
    work, seg = expected([1, 2])
    with pytest.raises(TypeError, match="pass the batch alone"):
        stages.infer(batch_of(2), seg)
    with pytest.raises(TypeError, match="both work and seg_input"):
        stages.infer(work)
    with pytest.raises(ValueError, match=r"the segmenter plan takes \(2, 1, 64, 64\)"):
        stages.infer(work, seg[:, :, :32])


def test_closed_stages_stage_nothing(gpu_pipe, emulated):
    pre, _ = gpu_pipe
    stages, emu, _, _ = emulated
    stages.stage(pre.run_device([sample(1)], cuda_stream=stages.ingest_stream))
    slot = stages._slots[0]
    stages.close()
    assert slot.work.ptr == 0 and not stages._slots
    assert ("close", stages.ingest_stream) in emu.log
    with pytest.raises(RuntimeError, match="closed"):
        stages.stage(pre.run_device([sample(1)]))


# --------------------------------------------------------------------------- the runner


def gpu_screener(models: ModelSet, stages: Any, preprocessor: Preprocessor) -> Screener:
    """A Screener on the TensorRT path, with the emulated stages and the fake pipeline."""
    s = Screener.__new__(Screener)
    s.models, s.stages, s.pipeline, s.clock = models, stages, preprocessor, StageClock()
    s.backend_name, s.device, s.decoder = "tensorrt", "gpu", "dali"
    return s


def test_runner_passes_the_device_batch_through(tiny, gpu_pipe, emulated):
    pre, fake = gpu_pipe
    stages, emu, _, _ = emulated
    screener = gpu_screener(tiny, stages, pre)
    seeds = SEEDS[:3]
    batch = screener.preprocess_batch([sample(s) for s in seeds])
    assert isinstance(batch, DeviceBatch) and batch.owner in stages._slots  # staged already
    assert fake.run_args[-1] == (stages.ingest_stream,)
    preds = screener.infer(batch)
    work, seg = expected(seeds)
    np.testing.assert_array_equal(preds.work, work)
    assert_matches(preds, cpu_path(tiny, work, seg))
    assert "H2D" not in emu.kinds()

    # finish_batch makes the previews from the work images that came back with the results
    items = [
        Prepared(
            row=Row(key=i, source=f"/x/{i}.png", member=None, width=90, height=70),
            sample=sample(s),
        )
        for i, s in enumerate(seeds)
    ]
    again = screener.preprocess_batch([p.sample for p in items if p.sample is not None])
    rows, vecs, previews = finish_batch(Batch(items=items, pre=again), screener)
    assert [r.status for r in rows] == ["ok"] * 3
    np.testing.assert_array_equal(np.stack(vecs), preds.embedding)
    for j, p in enumerate(previews):
        assert p is not None and p[0] == thumbs.encode_thumb(work[j], 90, 70)


def test_cpu_screener_refuses_a_device_batch(tiny):
    s = Screener.__new__(Screener)
    s.models, s.stages, s.clock = tiny, CpuStages(tiny, None, None), StageClock()
    with pytest.raises(ValueError, match="needs the TensorRT backend"):
        s.infer(batch_of(1))


# --------------------------------------------------------------------------- on a GPU


def png(seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    img = (rng.uniform(0, 1, (150, 170)) * np.linspace(0, 255, 170)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="PNG")
    return Sample(encoded=np.frombuffer(buf.getvalue(), np.uint8))


@pytest.mark.gpu
@requires_gpu
def test_run_device_on_the_gpu_equals_run(tiny):
    """DALI on the GPU: the device batch, copied down here, equals `run`'s host arrays."""
    samples = [png(s) for s in range(5)]
    pre = Preprocessor(tiny, device="gpu", batch_size=8, threads=2)
    host = pre.run(samples)
    stream = cuda.Stream()
    try:
        batch = pre.run_device(samples, cuda_stream=stream.handle)
        assert isinstance(batch, DeviceBatch), "DALI's GPU output was not dense"
        got = {}
        for name, arr in (("work", batch.work), ("seg_input", batch.seg_input)):
            buf = cuda.HostBuffer(arr.nbytes)
            cuda.copy_to_host(buf.ptr, arr.ptr, arr.nbytes, stream.handle)
            stream.synchronize()
            got[name] = buf.view(arr.shape, np.float32).copy()
            buf.free()
    finally:
        stream.close()
    np.testing.assert_array_equal(got["work"], host.work)
    np.testing.assert_array_equal(got["seg_input"], host.seg_input)
