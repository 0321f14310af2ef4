"""engine.train.qdq_mirror: the torch mirror of a QDQ ONNX graph computes what ONNX Runtime
computes (scales, zero points, round half to even, saturation, asymmetric pads, the float ops
of the per-image standardisation), passes gradients straight through the rounding, and writes
back exactly what it holds, integers saturated to their type.

Tiny graphs built here and the tiny classifier's INT8 export, under tmp_path. Tuning with the
mirror: tests/train/test_int8_tune.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from test_int8_tune import _images, _step, tiny_models  # noqa: E402

from engine.errors import ModelError  # noqa: E402
from engine.train.export import Int8Recipe, ort_run, ort_session, quantize_int8  # noqa: E402
from engine.train.qdq_mirror import QDQMirror, _padded, _ste_round, attrs  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny classifier (seed 3) and its MinMax INT8 export."""
    return tiny_models(tmp_path_factory.mktemp("mirror"))


def test_mirror_matches_onnxruntime(models):
    _, int8 = models
    x = _images(16, seed=2)
    got = ort_run(ort_session(int8, 1), x)
    mirror = QDQMirror(onnx.load(str(int8))).eval()
    with torch.no_grad():
        got_torch = [o.numpy() for o in mirror(torch.from_numpy(x))]
    outs = dict(zip(mirror.output_names, got_torch, strict=True))
    step = _step(int8)
    for name in ("logit", "embedding"):
        diff = np.abs(outs[name] - got[name])
        assert diff.max() <= 1.01 * step, (name, diff.max(), step)
        assert (diff > 1e-6).mean() < 0.05, name  # nearly all values identical


def test_export_without_steps_is_the_same_model(models):
    _, int8 = models
    model = onnx.load(str(int8))
    again = QDQMirror(model).export()
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in again.graph.initializer}
    assert before.keys() == after.keys()
    for name, arr in before.items():
        assert after[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(after[name], arr, err_msg=name)


def _asymmetric_pad_model() -> onnx.ModelProto:
    """image -> Conv(stride 2, pads [0, 0, 1, 1]: TF "SAME" as EfficientNet's strided convs)
    -> Relu -> MaxPool(pads [0, 0, 1, 1]) -> global pool -> embedding -> Gemm -> logit."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.normal(0, 0.5, (1, 4)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(np.zeros(1, np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("GlobalAveragePool", ["m"], ["g"]),
        helper.make_node("Flatten", ["g"], ["embedding"]),
        helper.make_node("Gemm", ["embedding", "fw", "fb"], ["logit"], transB=1),
    ]
    x = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 1, 15, 15])
    outs = [
        helper.make_tensor_value_info("logit", onnx.TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["N", 4]),
    ]
    graph = helper.make_graph(nodes, "asym", [x], outs, [w, b, fw, fb])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mirror_pads_asymmetrically_like_onnxruntime(tmp_path):
    """Asymmetric Conv/MaxPool pads (refused before: EfficientNet-Lite0's INT8 export could not
    be tuned) are mirrored: the same outputs as ONNX Runtime, to one quantization step."""
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(_asymmetric_pad_model(), str(fp32))
    rng = np.random.default_rng(6)
    calib = rng.uniform(-1, 1, (32, 1, 15, 15)).astype(np.float32)
    quantize_int8(fp32, int8, calib, Int8Recipe(method="minmax"))
    x = rng.uniform(-1, 1, (8, 1, 15, 15)).astype(np.float32)
    got = ort_run(ort_session(int8, 1), x)
    mirror = QDQMirror(onnx.load(str(int8))).eval()
    with torch.no_grad():
        outs = dict(
            zip(mirror.output_names, [o.numpy() for o in mirror(torch.from_numpy(x))], strict=True)
        )
    step = _step(int8)
    for name in ("logit", "embedding"):
        assert np.abs(outs[name] - got[name]).max() <= 1.01 * step, name
    # the quantized graph kept the asymmetric pads the mirror had to follow
    pads = [
        list(a.ints)
        for n in onnx.load(str(int8)).graph.node
        if n.op_type in ("Conv", "MaxPool")
        for a in n.attribute
        if a.name == "pads"
    ]
    assert pads == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_rounding_is_half_to_even_forward_and_identity_backward():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 2.51], requires_grad=True)
    y = _ste_round(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 3.0]  # as ONNX Runtime's QuantizeLinear
    (y * torch.arange(7.0)).sum().backward()
    assert x.grad is not None and x.grad.tolist() == list(range(7))


def test_attrs_and_pads():
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], group=3, auto_pad="NOTSET")
    assert attrs(node) == {"strides": [2, 2], "group": 3, "auto_pad": b"NOTSET"}
    x = torch.ones(1, 1, 2, 3)
    same, padding = _padded(x, node, [1, 2, 1, 2], 0.0)
    assert same is x and padding == (1, 2)  # symmetric: torch pads
    padded, padding = _padded(x, node, [0, 1, 2, 0], -5.0)  # top, left, bottom, right
    assert padding == (0, 0) and padded.shape == (1, 1, 4, 4)
    assert padded[0, 0, :, 0].tolist() == [-5.0] * 4  # the left column
    assert padded[0, 0, 2:, 1:].tolist() == [[-5.0] * 3] * 2  # the two bottom rows
    assert padded[0, 0, :2, 1:].tolist() == [[1.0] * 3] * 2
    with pytest.raises(ModelError, match=r"asymmetric pads \[0, 1\] of a 1-D op"):
        _padded(torch.ones(1, 1, 4), node, [0, 1], 0.0)


def _float_ops_model() -> onnx.ModelProto:
    """image [N, 4] standardised per row (ReduceMean, Sub, Mul, Add of a Constant eps, Sqrt, Div),
    clipped, then Gemm (transB, alpha, beta) and Relu: the float ops the mirror runs."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(-1.5, np.float32), "lo"),
        numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
    ]
    eps = numpy_helper.from_array(np.array(1e-3, np.float32), "eps_value")
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["image", "mean"], ["c"]),
        helper.make_node("Mul", ["c", "c"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1], keepdims=1),
        helper.make_node("Constant", [], ["eps"], value=eps),
        helper.make_node("Add", ["var", "eps"], ["v"]),
        helper.make_node("Sqrt", ["v"], ["std"]),
        helper.make_node("Div", ["c", "std"], ["z"]),
        helper.make_node("Clip", ["z", "lo", "hi"], ["zc"]),
        helper.make_node("Gemm", ["zc", "w", "b"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "float-ops",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float_ops_match_onnxruntime_and_float_gemm_weights_are_parameters():
    model = _float_ops_model()
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32) * 3
    want = ort_run(ort_session(model.SerializeToString(), 1), x)["y"]
    mirror = QDQMirror(model)
    with torch.no_grad():
        (got,) = mirror(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert mirror.output_names == ["y"] and len(mirror.weights) == 2  # the Gemm's w and b
    assert mirror.dtype_of(mirror.weights[0]) == TensorProto.FLOAT
    with pytest.raises(KeyError, match="not a parameter of this mirror"):
        mirror.dtype_of(torch.nn.Parameter(torch.zeros(1)))


def test_more_than_one_input_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ModelError, match="must have one input"):
        QDQMirror(helper.make_model(graph))


def test_integer_parameters_saturate_and_gradients_reach_them(models):
    _, int8 = models
    mirror = QDQMirror(onnx.load(str(int8)))
    ints = [p for p in mirror.weights if mirror.dtype_of(p) == TensorProto.INT8]
    assert ints and all(
        mirror.dtype_of(p) in (TensorProto.INT8, TensorProto.INT32) for p in mirror.weights
    )
    logit = mirror(torch.from_numpy(_images(2)))[mirror.output_names.index("logit")]
    logit.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ints)
    with torch.no_grad():
        ints[0].fill_(300.0)  # beyond INT8: saturated to 127, as QuantizeLinear would
        ints[1].fill_(-1000.7)
    exported = {t.name: t for t in mirror.export().graph.initializer}
    name_of = {id(mirror.weights[int(k)]): n for n, k in mirror._param_of.items()}
    first = numpy_helper.to_array(exported[name_of[id(ints[0])]])
    second = numpy_helper.to_array(exported[name_of[id(ints[1])]])
    assert first.dtype == np.int8 and (first == 127).all()
    assert second.dtype == np.int8 and (second == -128).all()
