"""TensorRT backend (GPU). Needs the `gpu` extra, an NVIDIA GPU and plans built by `cxr build`.

Loading finds the plan that serves the model on this machine (engine/runtime/plans.py: each
plan's sidecar records the ONNX, TensorRT version and GPU it was built from, with, and for) and
refuses one whose record does not match, saying to rebuild it.

Execution follows TensorRT 10's name-based I/O API (migration guide "Migrating Python Code
from TensorRT 8.x to 10.x": num_io_tensors / get_tensor_name / get_tensor_mode,
set_input_shape, set_tensor_address, execute_async_v3) with cuda-python for streams and
memory (engine.runtime.cuda), as TensorRT's samples/python/common_runtime.py does.
(docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-8x-to-10x-python-api-patterns.html)

Nothing here imports tensorrt or cuda-python at module import: the CPU path stays clean, and
a machine without them gets a message that says what is missing and how to install it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BackendUnavailable, EngineError, ModelError
from engine.models import Manifest
from engine.runtime import cuda
from engine.runtime.base import DeviceBackend, register
from engine.runtime.plans import (
    INSTALL_HINT,
    PlanManifest,
    default_plans_dir,
    find_plan,
    import_tensorrt,
    missing_requirements,
    rebuild_hint,
    sha256_bytes,
    trt_logger,
)

# --------------------------------------------------------------------------- the backend


@dataclass(slots=True)
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype[Any]
    sample_shape: tuple[int, ...]  # without the batch dimension
    device: cuda.DeviceBuffer
    host: cuda.HostBuffer

    def nbytes(self, batch: int) -> int:
        return batch * int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize


@register
class TensorRTBackend(DeviceBackend):
    """One TensorRT engine + execution context + stream, buffers sized for the plan's max batch.

    ``plans_dir`` defaults to ``<models dir>/plans`` (where `cxr build` writes); ``precision``
    picks a plan precision (default: the fastest plan built from this very ONNX).
    """

    name = "tensorrt"
    rank = 20

    def __init__(
        self,
        manifest: Manifest,
        *,
        threads: int = 1,
        plans_dir: Path | None = None,
        precision: str | None = None,
        device: int = 0,
    ) -> None:
        super().__init__(manifest, threads=threads)
        self.plans_dir = Path(plans_dir) if plans_dir else default_plans_dir(manifest.directory)
        self.plan_precision = precision
        self.device = device
        self.plan: PlanManifest | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: cuda.Stream | None = None
        self._tensors: list[_Tensor] = []
        self._thread = 0

    # -- loading

    def load(self) -> None:
        missing = missing_requirements()
        if missing:
            raise BackendUnavailable(
                f"--backend tensorrt cannot run here: missing {', '.join(missing)}. {INSTALL_HINT}"
            )
        trt = import_tensorrt()
        cuda.use_device(self.device)
        self._thread = threading.get_ident()
        gpu = cuda.device_info(self.device)
        self.plan = pm = find_plan(
            self.plans_dir,
            self.manifest,
            tensorrt_version=trt.__version__,
            gpu=gpu,
            precision=self.plan_precision,
        )
        path = self.plans_dir / pm.plan
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the plan ({exc}); {self._hint()}") from None
        if sha256_bytes(data) != pm.plan_sha256:
            raise ModelError(
                f"{path}: sha256 does not match its manifest (corrupt); {self._hint()}"
            )
        # Runtime.deserialize_cuda_engine returns None (and logs why) on a bad plan.
        self._runtime = trt.Runtime(trt_logger(trt))
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ModelError(
                f"{path}: TensorRT {trt.__version__} cannot deserialize this plan (see its "
                f"messages above); {self._hint()}"
            )
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"{path}: TensorRT could not create an execution context (GPU memory?)"
            )
        self._context = context
        self._stream = cuda.Stream()
        self._tensors = self._allocate(trt, engine, pm.max_batch)
        self.check_names(
            path,
            (t.name for t in self._tensors if t.is_input),
            (t.name for t in self._tensors if not t.is_input),
            loaded="plan",
            hint=self._hint(),
        )

    def _hint(self) -> str:
        return rebuild_hint(self.manifest.directory, self.plans_dir)

    def _allocate(self, trt: Any, engine: Any, max_batch: int) -> list[_Tensor]:
        tensors = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))  # -1 marks the dynamic batch
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if any(d < 0 for d in shape[1:]):
                raise ModelError(
                    f"{self.plans_dir / self.plan.plan if self.plan else ''}: tensor {name!r} has "
                    f"dynamic dimensions besides the batch ({shape}); only the batch may vary"
                )
            t = _Tensor(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                dtype=dtype,
                sample_shape=shape[1:],
                device=cuda.DeviceBuffer(),
                host=cuda.HostBuffer(),
            )
            t.device.reserve(t.nbytes(max_batch))
            t.host.reserve(t.nbytes(max_batch))
            tensors.append(t)
        return tensors

    # -- running

    def _require_loaded(self) -> tuple[Any, cuda.Stream]:
        if self._context is None or self._stream is None or self.plan is None:
            raise BackendUnavailable("TensorRT backend is not loaded")
        if threading.get_ident() != self._thread:  # the runtime API binds devices per thread
            cuda.check(cuda.bindings().runtime.cudaSetDevice(self.device), "cudaSetDevice")
        return self._context, self._stream

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out; batches above the plan's maximum run in chunks."""
        context, stream = self._require_loaded()
        assert self.plan is not None
        n = next(iter(feeds.values())).shape[0]
        inputs = [t for t in self._tensors if t.is_input]
        outputs = [t for t in self._tensors if not t.is_input]
        results = {t.name: np.empty((n, *t.sample_shape), t.dtype) for t in outputs}
        step = self.plan.max_batch
        for start in range(0, n, step):
            b = min(step, n - start)
            for t in inputs:
                x = np.ascontiguousarray(feeds[t.name][start : start + b], dtype=t.dtype)
                t.host.view(x.shape, t.dtype)[...] = x
                cuda.copy_to_device(t.device.ptr, t.host.ptr, x.nbytes, stream.handle)
                context.set_input_shape(t.name, x.shape)
            self._execute(context, stream.handle)
            for t in outputs:
                cuda.copy_to_host(t.host.ptr, t.device.ptr, t.nbytes(b), stream.handle)
            stream.synchronize()
            for t in outputs:
                results[t.name][start : start + b] = t.host.view((b, *t.sample_shape), t.dtype)
        return {t.name: results[t.name] for t in self.manifest.outputs}

    def infer_device(
        self,
        inputs: dict[str, int],
        batch: int,
        *,
        outputs: dict[str, int] | None = None,
        stream: int | None = None,
    ) -> dict[str, int]:
        """Device pointers in, device pointers out: no host copies, no synchronisation.

        ``inputs``/``outputs`` map tensor names to device pointers holding ``batch`` samples
        (C-contiguous, the plan's dtypes). Outputs not given land in the backend's own buffers,
        valid until the next call. The work is queued on ``stream`` (default: the backend's);
        synchronise it before reading the outputs.
        """
        context, own = self._require_loaded()
        assert self.plan is not None
        if not 1 <= batch <= self.plan.max_batch:
            raise ValueError(f"batch {batch} outside the plan's profile (1..{self.plan.max_batch})")
        addresses = {}
        for t in self._tensors:
            if t.is_input:
                addresses[t.name] = int(inputs[t.name])
                context.set_input_shape(t.name, (batch, *t.sample_shape))
            else:
                addresses[t.name] = int((outputs or {}).get(t.name, t.device.ptr))
        self._execute(context, own.handle if stream is None else int(stream), addresses)
        return {t.name: addresses[t.name] for t in self._tensors if not t.is_input}

    @property
    def max_batch(self) -> int:
        return self.plan.max_batch if self.plan is not None else 0

    def output_shape(self, name: str, batch: int) -> tuple[int, ...]:
        return (batch, *self._tensor(name).sample_shape)

    def tensor_dtype(self, name: str) -> np.dtype[Any]:
        return self._tensor(name).dtype

    def _tensor(self, name: str) -> _Tensor:
        for t in self._tensors:
            if t.name == name:
                return t
        raise KeyError(f"the {self.manifest.role} plan has no tensor {name!r}")

    def _execute(self, context: Any, stream: int, addresses: dict[str, int] | None = None) -> None:
        for t in self._tensors:
            ptr = t.device.ptr if addresses is None else addresses[t.name]
            context.set_tensor_address(t.name, ptr)
        # execute_async_v3 (TensorRT 10, enqueueV3) returns False when the enqueue failed.
        if not context.execute_async_v3(stream):
            raise EngineError(
                f"TensorRT could not run the {self.manifest.role} plan "
                f"({self.plans_dir / self.plan.plan if self.plan else '?'}); see its messages above"
            )

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.synchronize()
            finally:
                for t in self._tensors:
                    t.device.free()
                    t.host.free()
                self._stream.close()
        self._tensors = []
        self._stream = None
        self._context = None  # released before the engine, the engine before the runtime
        self._engine = None
        self._runtime = None
