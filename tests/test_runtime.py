"""engine.runtime: backend selection, ONNX Runtime on the tiny models, null, TensorRT refusal.

Also: importing the CPU path never pulls in the GPU libraries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import runtime
from engine.config import ScreenConfig
from engine.errors import BackendUnavailable, ConfigError, ModelError
from engine.models import ModelSet, TensorSpec, init_models, load_models
from engine.runtime import backend_choices, backend_names, get_backend, resolve_backend
from engine.runtime.base import REGISTRY, Backend, DeviceBackend, register
from engine.runtime.null import NullBackend
from engine.runtime.onnxrt import OnnxRuntimeBackend
from engine.runtime.tensorrt import TensorRTBackend, missing_requirements

REPO = Path(__file__).resolve().parents[1]
SEED = 3
# ORT may pick other kernels/blocking for other batch sizes: a few float32 ulps of drift.
BATCH_ATOL = 1e-4


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


def test_a_registered_backend_is_listed_and_chosen_by_name():
    @register
    class EchoBackend(NullBackend):
        name = "echo"
        rank = 15

    try:
        assert backend_names() == ("onnxruntime", "echo", "tensorrt", "null")
        assert get_backend("echo") is EchoBackend
        ScreenConfig(inputs=(Path("x"),), out=Path("o"), backend="echo")
        with pytest.raises(ValueError, match="taken by"):
            register(type("Other", (NullBackend,), {"name": "echo"}))
        with pytest.raises(ValueError, match="cannot name a backend"):
            register(type("Auto", (NullBackend,), {"name": "auto"}))
    finally:
        del REGISTRY["echo"]
    assert "echo" not in backend_choices()


def test_resolve_backend():
    assert resolve_backend("auto") == "onnxruntime"
    for name in ("onnxruntime", "null", "tensorrt"):
        assert resolve_backend(name) == name


# --------------------------------------------------------------------------- ONNX Runtime


def test_onnxruntime_output_shapes(tiny):
    with OnnxRuntimeBackend(tiny.segmenter, threads=1) as seg:
        out = seg.infer({"image": seg_batch(3)})
    assert set(out) == {"mask_logit"}
    assert out["mask_logit"].shape == (3, 1, 64, 64) and out["mask_logit"].dtype == np.float32
    assert np.isfinite(out["mask_logit"]).all()
    with OnnxRuntimeBackend(tiny.classifier, threads=1) as clf:
        out = clf.infer({"image": seg_batch(5)})
    assert set(out) == {"logit", "embedding"}
    assert out["logit"].shape == (5, 1) and out["embedding"].shape == (5, 64)
    assert np.isfinite(out["logit"]).all() and np.isfinite(out["embedding"]).all()


@pytest.mark.parametrize("role", ["segmenter", "classifier"])
def test_onnxruntime_batch_invariance(tiny, role):
    manifest = getattr(tiny, role)
    x = seg_batch(4)
    with OnnxRuntimeBackend(manifest, threads=1) as backend:
        batch = backend.infer({"image": x})
        for i in range(len(x)):
            one = backend.infer({"image": x[i : i + 1]})
            for name, value in one.items():
                np.testing.assert_allclose(batch[name][i], value[0], atol=BATCH_ATOL, err_msg=name)
        # and the same batch twice gives the same answer
        again = backend.infer({"image": x})
        for name in batch:
            np.testing.assert_array_equal(batch[name], again[name])


def test_tensor_names_not_in_the_model_are_a_model_error(tiny):
    m = tiny.classifier
    renamed_in = replace(m, inputs=(TensorSpec(name="pixels", shape=("N", 1, 64, 64)),))
    with pytest.raises(ModelError) as err:
        OnnxRuntimeBackend(renamed_in).load()
    msg = str(err.value)
    assert str(m.onnx_path) in msg and "do not match the manifest" in msg
    assert "'pixels'" in msg and "'image'" in msg
    renamed_out = replace(m, outputs=(TensorSpec(name="prob", shape=("N", 1)), *m.outputs[1:]))
    with pytest.raises(ModelError, match="'prob'"):
        OnnxRuntimeBackend(renamed_out).load()


def test_corrupt_onnx_with_a_matching_sha_is_a_model_error(tiny, tmp_path):
    d = Path(shutil.copytree(tiny.segmenter.directory, tmp_path / "models"))
    (d / "segmenter.onnx").write_bytes(b"\x08\x07garbage, not a protobuf graph" * 10)
    manifest = json.loads((d / "segmenter.json").read_text())
    manifest["sha256"] = hashlib.sha256((d / "segmenter.onnx").read_bytes()).hexdigest()
    (d / "segmenter.json").write_text(json.dumps(manifest))
    models = load_models(d)  # the checksum matches: only loading can tell
    with pytest.raises(ModelError) as err:
        OnnxRuntimeBackend(models.segmenter).load()
    msg = str(err.value)
    assert msg.startswith(f"{d / 'segmenter.onnx'}: ONNX Runtime cannot load this model")


# --------------------------------------------------------------------------- optimised graphs


def _cached_graphs(root: Path) -> list[Path]:
    return sorted((root / "ort").glob("*.onnx")) if (root / "ort").is_dir() else []


@pytest.mark.parametrize("role", ["segmenter", "classifier"])
def test_optimised_graph_is_saved_once_and_gives_the_same_outputs(
    tiny, role, tmp_path, monkeypatch
):
    import onnxruntime as ort

    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    manifest, x = getattr(tiny, role), seg_batch(3)
    with OnnxRuntimeBackend(manifest, threads=1) as first:
        fresh = first.infer({"image": x})
    (saved,) = _cached_graphs(tmp_path)
    assert first.optimized == saved and manifest.sha256[:16] in saved.name
    assert ort.__version__ in saved.name
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary file left behind
    made = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda p, **kw: made.append(p) or real(p, **kw))
    with OnnxRuntimeBackend(manifest, threads=1) as second:
        cached = second.infer({"image": x})
    assert made == [str(saved)]  # made from the saved graph, not from the model
    for name in fresh:
        np.testing.assert_array_equal(fresh[name], cached[name])


def test_damaged_optimised_graph_is_remade(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    with OnnxRuntimeBackend(tiny.segmenter, threads=1) as backend:
        want = backend.infer({"image": seg_batch(2)})
    (saved,) = _cached_graphs(tmp_path)
    saved.write_bytes(b"not a graph")
    with OnnxRuntimeBackend(tiny.segmenter, threads=1) as backend:
        got = backend.infer({"image": seg_batch(2)})
    np.testing.assert_array_equal(want["mask_logit"], got["mask_logit"])
    assert saved.stat().st_size > 100  # written again, whole


def test_optimised_graph_cache_off_or_unwritable(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", "off")
    with OnnxRuntimeBackend(tiny.segmenter, threads=1) as backend:
        assert backend.optimized is None
        backend.infer({"image": seg_batch(1)})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CXR_CACHE_DIR", str(blocker / "below"))  # cannot be made: runs anyway
    with OnnxRuntimeBackend(tiny.segmenter, threads=1) as backend:
        assert backend.infer({"image": seg_batch(1)})["mask_logit"].shape == (1, 1, 64, 64)
    assert blocker.is_file()


def test_optimised_graph_key_follows_the_cpu(monkeypatch, tmp_path):
    from engine.cpu import CpuInfo
    from engine.runtime import ort_cache

    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ort_cache, "this_cpu", lambda: CpuInfo("X", frozenset({"avx2"})))
    avx2 = ort_cache.optimized_path("ab" * 32, "1.0")
    monkeypatch.setattr(ort_cache, "this_cpu", lambda: CpuInfo("X", frozenset({"avx2", "avx512f"})))
    assert avx2 != ort_cache.optimized_path("ab" * 32, "1.0")
    assert avx2 is not None and avx2.parent == tmp_path / "ort"
    monkeypatch.delenv("CXR_CACHE_DIR")  # off unless asked for: nothing written outside --out
    assert ort_cache.cache_root() is None and ort_cache.optimized_path("ab" * 32, "1") is None


# --------------------------------------------------------------------------- null


def test_null_backend_shapes(tiny):
    with NullBackend(tiny.segmenter) as seg:
        mask = seg.infer({"image": seg_batch(2)})["mask_logit"]
    assert mask.shape == (2, 1, 64, 64) and mask.dtype == np.float32
    assert (mask == 1.0).all()  # positive logits everywhere: the whole image is "lung"
    with NullBackend(tiny.classifier) as clf:
        out = clf.infer({"image": seg_batch(3)})
    assert out["logit"].shape == (3, 1) and out["embedding"].shape == (3, 64)
    assert out["logit"].dtype == np.float32 and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-6)


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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"imported at import time: {proc.stdout.strip()}"
