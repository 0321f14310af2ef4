"""engine.runtime.onnxrt: ONNX Runtime on the tiny models: output names and shapes, batch
invariance; a model that does not match its manifest, or does not load, is a ModelError."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_runtime import seg_batch

from engine.errors import ModelError
from engine.models import TensorSpec, load_models
from engine.runtime.onnxrt import OnnxRuntimeBackend

# ORT may pick other kernels/blocking for other batch sizes: a few float32 ulps of drift.
BATCH_ATOL = 1e-4


def test_onnxruntime_output_shapes(tiny_models):
    with OnnxRuntimeBackend(tiny_models.segmenter, threads=1) as seg:
        out = seg.infer({"image": seg_batch(3)})
    assert set(out) == {"mask_logit"}
    assert out["mask_logit"].shape == (3, 1, 64, 64) and out["mask_logit"].dtype == np.float32
    assert np.isfinite(out["mask_logit"]).all()
    with OnnxRuntimeBackend(tiny_models.classifier, threads=1) as clf:
        out = clf.infer({"image": seg_batch(5)})
    assert set(out) == {"logit", "embedding"}
    assert out["logit"].shape == (5, 1) and out["embedding"].shape == (5, 64)
    assert np.isfinite(out["logit"]).all() and np.isfinite(out["embedding"]).all()


@pytest.mark.parametrize("role", ["segmenter", "classifier"])
def test_onnxruntime_batch_invariance(tiny_models, role):
    manifest = getattr(tiny_models, role)
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


def test_tensor_names_not_in_the_model_are_a_model_error(tiny_models):
    m = tiny_models.classifier
    renamed_in = replace(m, inputs=(TensorSpec(name="pixels", shape=("N", 1, 64, 64)),))
    with pytest.raises(ModelError) as err:
        OnnxRuntimeBackend(renamed_in).load()
    msg = str(err.value)
    assert str(m.onnx_path) in msg and "do not match the manifest" in msg
    assert "'pixels'" in msg and "'image'" in msg
    renamed_out = replace(m, outputs=(TensorSpec(name="prob", shape=("N", 1)), *m.outputs[1:]))
    with pytest.raises(ModelError, match="'prob'"):
        OnnxRuntimeBackend(renamed_out).load()


def test_corrupt_onnx_with_a_matching_sha_is_a_model_error(tiny_models, tmp_path):
    d = Path(shutil.copytree(tiny_models.segmenter.directory, tmp_path / "models"))
    (d / "segmenter.onnx").write_bytes(b"\x08\x07garbage, not a protobuf graph" * 10)
    manifest = json.loads((d / "segmenter.json").read_text())
    manifest["sha256"] = hashlib.sha256((d / "segmenter.onnx").read_bytes()).hexdigest()
    (d / "segmenter.json").write_text(json.dumps(manifest))
    models = load_models(d)  # the checksum matches: only loading can tell
    with pytest.raises(ModelError) as err:
        OnnxRuntimeBackend(models.segmenter).load()
    msg = str(err.value)
    assert msg.startswith(f"{d / 'segmenter.onnx'}: ONNX Runtime cannot load this model")
