"""TensorRT plan files (`cxr build` writes them, the backend reads them) and what a machine needs
to use them.

A plan is tied to the ONNX file it was built from, the TensorRT version that built it and the
GPU model it was built on; each plan has a sidecar JSON (``PlanManifest``) recording these.
``find_plan`` picks the plan that serves a model here or says why none does and to rebuild;
``plans_usable`` tells ``--backend auto`` whether TensorRT would load. ``missing_requirements``
says what this machine lacks (the tensorrt package, cuda-python, a GPU) without importing them.

Nothing here imports tensorrt or cuda-python at module import.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BackendUnavailable, EngineError, ModelError
from engine.models import Manifest, ModelSet
from engine.runtime import cuda

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
