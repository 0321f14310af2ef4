"""engine.runtime.ort_cache and its use by the ONNX Runtime backend: the optimised graph of a
model is saved once under CXR_CACHE_DIR (keyed by the model's sha256, ONNX Runtime's version and
the CPU) and gives the same outputs; a damaged one is remade; off or unwritable, runs go on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_runtime import seg_batch

from engine.runtime.onnxrt import OnnxRuntimeBackend


def _cached_graphs(root: Path) -> list[Path]:
    return sorted((root / "ort").glob("*.onnx")) if (root / "ort").is_dir() else []


@pytest.mark.parametrize("role", ["segmenter", "classifier"])
def test_optimised_graph_is_saved_once_and_gives_the_same_outputs(
    tiny_models, role, tmp_path, monkeypatch
):
    import onnxruntime as ort

    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    manifest, x = getattr(tiny_models, role), seg_batch(3)
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


def test_damaged_optimised_graph_is_remade(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    with OnnxRuntimeBackend(tiny_models.segmenter, threads=1) as backend:
        want = backend.infer({"image": seg_batch(2)})
    (saved,) = _cached_graphs(tmp_path)
    saved.write_bytes(b"not a graph")
    with OnnxRuntimeBackend(tiny_models.segmenter, threads=1) as backend:
        got = backend.infer({"image": seg_batch(2)})
    np.testing.assert_array_equal(want["mask_logit"], got["mask_logit"])
    assert saved.stat().st_size > 100  # written again, whole


def test_optimised_graph_cache_off_or_unwritable(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", "off")
    with OnnxRuntimeBackend(tiny_models.segmenter, threads=1) as backend:
        assert backend.optimized is None
        backend.infer({"image": seg_batch(1)})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CXR_CACHE_DIR", str(blocker / "below"))  # cannot be made: runs anyway
    with OnnxRuntimeBackend(tiny_models.segmenter, threads=1) as backend:
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
