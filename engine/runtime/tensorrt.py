"""TensorRT backend (GPU). Needs the `gpu` extra, an NVIDIA GPU and plans built by `cxr build`.

A plan is tied to the ONNX file it was built from, the TensorRT version that built it and the
GPU model it was built on; each plan has a sidecar JSON (``PlanManifest``) recording these, and
loading refuses a plan whose record does not match this machine, saying to rebuild it.

Execution follows TensorRT 10's name-based I/O API (migration guide "Migrating Python Code
from TensorRT 8.x to 10.x": num_io_tensors / get_tensor_name / get_tensor_mode,
set_input_shape, set_tensor_address, execute_async_v3) with cuda-python for streams and
memory (engine.runtime.cuda), as TensorRT's samples/python/common_runtime.py does.
(docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-8x-to-10x-python-api-patterns.html)

Nothing here imports tensorrt or cuda-python at module import: the CPU path stays clean, and
a machine without them gets a message that says what is missing and how to install it.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BackendUnavailable, EngineError, ModelError
from engine.models import Manifest, ModelSet
from engine.runtime import cuda
from engine.runtime.base import Backend

GPU_EXTRA_HINT = (
    "install the GPU extra (`pip install 'cxr-engine[gpu]'`: TensorRT and cuda-python) on a "
    "machine with an NVIDIA GPU and driver"
)
INSTALL_HINT = f"{GPU_EXTRA_HINT}, then build plans with `cxr build`"
PLAN_FORMAT = "cxr-engine-plan/1"
PLAN_PRECISIONS = ("fp32", "fp16", "int8")
# When several plans match a model, the fastest wins (each passed its parity test to exist).
PLAN_PREFERENCE = ("int8", "fp16", "fp32")
PLANS_SUBDIR = "plans"


# --------------------------------------------------------------------------- requirements


def _module_present(name: str) -> bool:
    """A real, importable package (tensorrt-stubs alone is a namespace package without code)."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin not in (None, "namespace")


def _gpu_present() -> bool:
    if cuda.cuda_python_present():
        return cuda.gpu_available()
    return os.path.exists("/dev/nvidia0") and ctypes.util.find_library("cuda") is not None


def missing_requirements() -> list[str]:
    """What this machine lacks for TensorRT (empty when it has everything). Imports nothing
    unless cuda-python is installed, which it then asks for the device count."""
    missing = []
    if not _module_present("tensorrt"):
        missing.append("the Python package tensorrt")
    if not cuda.cuda_python_present():
        missing.append("the Python package cuda-python")
    if not _gpu_present():
        missing.append("an NVIDIA GPU (no CUDA device or no driver found)")
    return missing


def import_tensorrt(*, builder: bool = False) -> Any:
    """``import tensorrt``, refusing the lean/dispatch runtimes when the builder is needed."""
    import tensorrt as trt

    if builder and not (hasattr(trt, "Builder") and hasattr(trt, "OnnxParser")):
        raise BackendUnavailable(
            f"the installed TensorRT ({getattr(trt, '__version__', '?')}) has no builder or ONNX "
            f"parser (a lean runtime?): {INSTALL_HINT}"
        )
    return trt


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process (builders and runtimes share it), warnings and up."""
    if id(trt) not in _LOGGERS:
        _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[id(trt)]


# --------------------------------------------------------------------------- plan manifests


@dataclass(frozen=True, kw_only=True)
class PlanManifest:
    """The sidecar of one TensorRT plan: what it was built from, with, and for."""

    role: str
    plan: str  # file name, relative to the manifest's directory
    plan_sha256: str
    onnx: str  # absolute path of the ONNX at build time (informative)
    onnx_sha256: str  # what a model must have for this plan to serve it
    precision: str  # fp32 | fp16 | int8 (of the plan)
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: dict[str, dict[str, list[int]]]  # input name -> {"min", "opt", "max"} shapes
    inputs: list[dict[str, Any]]  # [{"name", "shape", "dtype"}], -1 = dynamic batch
    outputs: list[dict[str, Any]]
    strongly_typed: bool = False
    built_at: str = ""
    builder: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    @property
    def max_batch(self) -> int:
        return min(int(p["max"][0]) for p in self.profile.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PlanManifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


def plan_stem(role: str, precision: str) -> str:
    return f"{role}.{precision}"


def default_plans_dir(models_dir: Path) -> Path:
    return Path(models_dir) / PLANS_SUBDIR


def read_plan_manifest(path: Path) -> PlanManifest:
    try:
        pm = PlanManifest.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ModelError(f"{path}: plan manifest not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(
            f"{path}: cannot read this plan manifest ({type(exc).__name__}: {exc}); rebuild the "
            "plans with `cxr build`"
        ) from None
    if pm.format != PLAN_FORMAT:
        raise ModelError(f"{path}: format {pm.format!r}, this engine reads {PLAN_FORMAT!r}")
    return pm


def plan_problems(
    pm: PlanManifest, *, onnx_sha256: str, tensorrt_version: str, gpu: cuda.GpuInfo
) -> list[str]:
    """Why this plan cannot serve the model on this machine (empty: it can)."""
    problems = []
    if pm.onnx_sha256 != onnx_sha256:
        problems.append(
            f"it was built from an ONNX with sha256 {pm.onnx_sha256[:16]}..., the model's is "
            f"{onnx_sha256[:16]}..."
        )
    if pm.tensorrt_version != tensorrt_version:
        problems.append(
            f"it was built by TensorRT {pm.tensorrt_version}, this is TensorRT {tensorrt_version}"
        )
    if (pm.gpu_name, pm.compute_capability) != (gpu.name, gpu.compute_capability):
        problems.append(
            f"it was built on a {pm.gpu_name} (compute capability {pm.compute_capability}), "
            f"this GPU is a {gpu.name} ({gpu.compute_capability})"
        )
    return problems


def rebuild_hint(models_dir: Path, plans_dir: Path) -> str:
    out = "" if Path(plans_dir) == default_plans_dir(models_dir) else f" --out {plans_dir}"
    return f"rebuild the plans on this machine: `cxr build --models {models_dir}{out}`"


def find_plan(
    plans_dir: Path,
    manifest: Manifest,
    *,
    tensorrt_version: str,
    gpu: cuda.GpuInfo,
    precision: str | None = None,
) -> PlanManifest:
    """The plan in plans_dir that serves this model here, preferring int8 > fp16 > fp32.

    Raises ModelError when there is none (saying to build) or when every candidate was built
    from another ONNX, by another TensorRT or on another GPU (saying what and to rebuild).
    """
    plans_dir = Path(plans_dir)
    hint = rebuild_hint(manifest.directory, plans_dir)
    wanted = [precision] if precision else list(PLAN_PREFERENCE)
    candidates = [
        (p, plans_dir / f"{plan_stem(manifest.role, p)}.json")
        for p in wanted
        if (plans_dir / f"{plan_stem(manifest.role, p)}.json").is_file()
    ]
    if not candidates:
        which = f"{precision} " if precision else ""
        raise ModelError(
            f"{plans_dir}: no {which}TensorRT plan for the {manifest.role}; build the plans with "
            f"`cxr build --models {manifest.directory}"
            + ("" if plans_dir == default_plans_dir(manifest.directory) else f" --out {plans_dir}")
            + "`"
        )
    # A plan may come from any export the manifest lists (e.g. fp16 plans from the w8 variant
    # of a classifier that ships INT8).
    exports = {manifest.sha256, *(v.sha256 for v in manifest.variants.values())}
    refusals = []
    for _, path in candidates:
        pm = read_plan_manifest(path)
        sha = pm.onnx_sha256 if pm.onnx_sha256 in exports else manifest.sha256
        problems = plan_problems(pm, onnx_sha256=sha, tensorrt_version=tensorrt_version, gpu=gpu)
        if pm.role != manifest.role:
            problems.append(f"it is a plan for the {pm.role}, not the {manifest.role}")
        if not problems:
            return pm
        refusals.append(f"{path.name}: " + "; ".join(problems))
    raise ModelError(
        f"{plans_dir}: no TensorRT plan there matches the {manifest.role} "
        f"({manifest.onnx_path}) on this machine: " + " | ".join(refusals) + f". {hint}"
    )


def plans_usable(models: ModelSet, plans_dir: Path | None = None) -> bool:
    """Whether --backend tensorrt would load both models here (for --backend auto).

    Cheap checks first; imports tensorrt and cuda-python only when plans exist.
    """
    seg, clf = models.segmenter, models.classifier
    directory = Path(plans_dir) if plans_dir else default_plans_dir(clf.directory)
    if not any(directory.glob(f"{seg.role}.*.json")) or not any(
        directory.glob(f"{clf.role}.*.json")
    ):
        return False
    if missing_requirements():
        return False
    try:
        trt = import_tensorrt()
        gpu = cuda.device_info(0)
        for m in (seg, clf):
            find_plan(directory, m, tensorrt_version=trt.__version__, gpu=gpu)
    except (EngineError, ImportError, OSError):
        return False
    return True


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


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


class TensorRTBackend(Backend):
    """One TensorRT engine + execution context + stream, buffers sized for the plan's max batch.

    ``plans_dir`` defaults to ``<models dir>/plans`` (where `cxr build` writes); ``precision``
    picks a plan precision (default: the fastest plan built from this very ONNX).
    """

    name = "tensorrt"

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
        self._check_names(path)

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

    def _check_names(self, path: Path) -> None:
        got_in = {t.name for t in self._tensors if t.is_input}
        got_out = {t.name for t in self._tensors if not t.is_input}
        want_in = {t.name for t in self.manifest.inputs}
        want_out = {t.name for t in self.manifest.outputs}
        if not want_in <= got_in or not want_out <= got_out:
            raise ModelError(
                f"{path}: tensors do not match the manifest: plan has inputs {sorted(got_in)} / "
                f"outputs {sorted(got_out)}, manifest names {sorted(want_in)} / "
                f"{sorted(want_out)}; {self._hint()}"
            )

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
