"""engine.models.storage: the same graph with its weights stored as float16 or per-channel INT8
(float32 compute), and folded back to float32 initializers."""

from __future__ import annotations

import numpy as np
import onnx


def test_w8_weights_store_int8_and_stay_close_to_fp32(tiny_models):
    """w8: the FP32 weights stored as per-channel INT8 (a quarter of the size), float compute;
    float_weights folds them back into float32 initializers."""
    import onnxruntime as ort

    from engine.models import float_weights, w8_weights

    clf = tiny_models.classifier
    fp32 = onnx.load(str(clf.onnx_path))
    w8 = w8_weights(onnx.load(str(clf.onnx_path)), min_elements=16)
    assert "DequantizeLinear" in {n.op_type for n in w8.graph.node}
    assert len(w8.SerializeToString()) < 0.5 * len(fp32.SerializeToString())
    x = np.random.default_rng(1).uniform(-1, 1, (4, 1, 64, 64)).astype(np.float32)

    def run(model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(["embedding"], {"image": x})[0]

    a, b = run(fp32), run(w8)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999, cos
    folded = float_weights(w8)
    assert "DequantizeLinear" not in {n.op_type for n in folded.graph.node}
    np.testing.assert_allclose(run(folded), b, rtol=1e-5, atol=1e-6)


def test_fp16_weights_store_large_float_weights_as_float16_behind_a_cast(tiny_models):
    import onnxruntime as ort
    from onnx import TensorProto

    from engine.models import fp16_weights

    path = str(tiny_models.segmenter.onnx_path)
    fp32 = onnx.load(path)
    large = {i.name for i in fp32.graph.initializer if np.prod(i.dims) >= 64}
    half = fp16_weights(onnx.load(path), min_elements=64)
    by_name = {i.name: i for i in half.graph.initializer}
    assert large and all(by_name[f"{n}__fp16"].data_type == TensorProto.FLOAT16 for n in large)
    assert not large & set(by_name)  # replaced, not kept beside
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    assert {n.output[0] for n in casts} == large
    assert half.graph.node[: len(casts)] == casts  # decoded before anything reads them
    x = np.random.default_rng(2).uniform(-1, 1, (2, 1, 64, 64)).astype(np.float32)

    def run(model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(["mask_logit"], {"image": x})[0]

    np.testing.assert_allclose(run(half), run(fp32), rtol=1e-2, atol=1e-2)  # weights' rounding
