"""engine.runtime: the backend registry and selection, and how --backend tensorrt refuses
where it cannot run. Also: importing the CPU path never pulls in the GPU libraries. The
interface and `register` (runtime/base.py): test_base.py; each backend's own tests:
test_onnxrt.py, test_null.py, test_tensorrt.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env

from engine import runtime
from engine.config import ScreenConfig
from engine.errors import BackendUnavailable, ConfigError, ModelError
from engine.models import ModelSet, init_models
from engine.runtime import backend_choices, backend_names, get_backend, resolve_backend
from engine.runtime.base import REGISTRY, Backend, DeviceBackend
from engine.runtime.null import NullBackend
from engine.runtime.onnxrt import OnnxRuntimeBackend
from engine.runtime.tensorrt import TensorRTBackend, missing_requirements

SEED = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelSet:
    return init_models(tmp_path_factory.mktemp("models"), size="tiny", seed=0)


def seg_batch(n: int) -> np.ndarray:
    return np.random.default_rng(SEED).normal(size=(n, 1, 64, 64)).astype(np.float32)


# --------------------------------------------------------------------------- selection


def test_get_backend_by_name():
    assert get_backend("onnxruntime") is OnnxRuntimeBackend
    assert get_backend("null") is NullBackend
    assert get_backend("tensorrt") is TensorRTBackend
    assert [get_backend(n).name for n in ("onnxruntime", "null", "tensorrt")] == [
        "onnxruntime",
        "null",
        "tensorrt",
    ]


@pytest.mark.parametrize("name", ["openvino", "ONNXRUNTIME", "", "auto"])
def test_unknown_backend_is_a_config_error(name):
    # "auto" is resolved first (resolve_backend); get_backend wants a concrete name
    with pytest.raises(ConfigError, match="choose auto, onnxruntime, tensorrt or null"):
        get_backend(name)


def test_every_backend_comes_from_the_registry():
    assert backend_names() == ("onnxruntime", "tensorrt", "null")
    assert backend_choices() == ("auto", "onnxruntime", "tensorrt", "null")
    assert runtime.choices_text() == "auto | onnxruntime | tensorrt | null"
    # every Backend class in engine/runtime/ is registered (a forgotten @register shows here),
    # but for the abstract interfaces (runtime.base.DeviceBackend)
    found = {
        cls
        for cls in _subclasses(Backend)
        if cls.__module__.startswith("engine.runtime.") and not inspect.isabstract(cls)
    }
    assert DeviceBackend in _subclasses(Backend) and inspect.isabstract(DeviceBackend)
    assert found == set(REGISTRY.values()) == {OnnxRuntimeBackend, TensorRTBackend, NullBackend}
    with pytest.raises(ConfigError, match="--backend must be one of auto, onnxruntime, tensorrt"):
        ScreenConfig(inputs=(Path("x"),), out=Path("o"), backend="openvino")


def _subclasses(cls: type) -> set[type]:
    direct = set(cls.__subclasses__())
    return direct.union(*(_subclasses(c) for c in direct))


def test_resolve_backend():
    assert resolve_backend("auto") == "onnxruntime"
    for name in ("onnxruntime", "null", "tensorrt"):
        assert resolve_backend(name) == name


# --------------------------------------------------------------------------- TensorRT


def test_tensorrt_refuses_with_what_is_missing_and_how_to_install(tiny):
    missing = missing_requirements()
    with pytest.raises((BackendUnavailable, ModelError)) as err:
        TensorRTBackend(tiny.classifier).load()
    msg = str(err.value)
    if missing:
        assert isinstance(err.value, BackendUnavailable)
        assert "--backend tensorrt cannot run here: missing" in msg
        for item in missing:
            assert item in msg
        assert "pip install 'cxr-engine[gpu]'" in msg and "cxr build" in msg
    else:  # a GPU machine with the gpu extra but no plans built for these models
        assert "cxr build" in msg
    with pytest.raises(BackendUnavailable):
        TensorRTBackend(tiny.classifier).infer({"image": seg_batch(1)})
    assert "tensorrt" not in sys.modules  # checked for, never imported


def test_tensorrt_stubs_are_not_tensorrt():
    # tensorrt-stubs installs a bare namespace package `tensorrt` (only .pyi files): it must
    # still count as missing, or the refusal would not say that TensorRT is needed.
    spec = importlib.util.find_spec("tensorrt")
    if spec is not None and spec.origin is not None:
        pytest.skip(f"TensorRT is installed here ({spec.origin})")
    assert "the Python package tensorrt" in missing_requirements()


# --------------------------------------------------------------------------- import hygiene


def test_importing_the_cpu_path_does_not_import_gpu_libraries():
    code = textwrap.dedent(
        """
        import sys
        import engine, engine.runner, engine.screener, engine.screening, engine.cli, engine.runtime
        heavy = ("tensorrt", "cuda", "nvidia", "torch", "torchvision", "onnxruntime", "pycuda")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"imported at import time: {proc.stdout.strip()}"
