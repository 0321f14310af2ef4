"""engine.train.export: a torch model exported to ONNX computes what torch computes (BN folded)
and has the topology of the engine's own architecture (engine/arch.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")


def _warm_bn(model: Any, shape: tuple[int, ...]) -> Any:
    """A few train-mode passes so BN running stats are not the identity the folding hides."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(*shape) * 2)
    return model.eval()


@pytest.mark.parametrize(
    ("arch", "outputs", "shape"),
    [
        ("tiny-unet", ["mask_logit"], (3, 1, 64, 64)),
        ("unet-s8-128", ["mask_logit"], (2, 1, 32, 32)),  # a cheaper segmenter, at a small side
        ("tiny-classifier", ["logit", "embedding"], (3, 1, 64, 64)),
    ],
)
def test_export_matches_torch_and_arch_topology(arch, outputs, shape):
    from engine import arch as onnx_arch
    from engine.train.export import check_parity, to_onnx
    from engine.train.resnet import build_classifier
    from engine.train.unet import build_unet

    model = build_unet(arch) if "unet" in arch else build_classifier(arch, 64)
    model = _warm_bn(model, shape)
    proto = to_onnx(
        model, torch.zeros(2, *shape[1:]), output_names=outputs, architecture=arch, doc="test"
    )
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    parity = check_parity(model, proto, x, threads=1, where=Path("test.onnx"))
    assert max(parity.values()) <= 1e-4
    reference = onnx_arch.ARCHITECTURES[arch](seed=0, size=shape[-1])
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in reference.graph.node]
    assert [o.name for o in proto.graph.output] == [o.name for o in reference.graph.output]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    if "unet" in arch:  # the U-Nets' widths too, layer by layer

        def weights(m: Any) -> list[list[int]]:
            dims = {t.name: list(t.dims) for t in m.graph.initializer}
            convs = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose")]
            return [dims[n.input[1]] for n in convs]

        assert weights(proto) == weights(reference)


@pytest.mark.slow
def test_resnet50_export_matches_torch_and_arch_topology():
    from engine import arch as onnx_arch
    from engine.train.export import check_parity, to_onnx
    from engine.train.resnet import build_classifier

    model = _warm_bn(build_classifier("resnet50", 2048), (2, 1, 224, 224))
    proto = to_onnx(
        model,
        torch.zeros(2, 1, 224, 224),
        output_names=["logit", "embedding"],
        architecture="resnet50",
        doc="test",
    )
    x = np.random.default_rng(0).random((2, 1, 224, 224), dtype=np.float32)
    assert max(check_parity(model, proto, x, threads=2, where=Path("t.onnx")).values()) <= 1e-4
    reference = onnx_arch.resnet50_classifier(seed=0)
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in reference.graph.node]


def test_int8_recipe_float_nodes_follow_its_options():
    """Which nodes an INT8 recipe leaves in float: op types, the first and last N convolutions,
    depthwise (grouped) convolutions; in graph order, each once."""
    import onnx
    from onnx import helper

    from engine.train.export import Int8Recipe

    def conv(name: str, group: int = 1) -> onnx.NodeProto:
        return helper.make_node("Conv", ["x", "w"], [name], name=name, group=group)

    nodes = [conv("c0"), conv("dw1", group=8), helper.make_node("Relu", ["c0"], ["r"], name="r")]
    nodes += [conv("c2"), helper.make_node("Gemm", ["a", "b"], ["g"], name="g"), conv("c3")]
    graph = helper.make_graph(nodes, "g", [], [])
    assert Int8Recipe().float_nodes(graph) == []
    assert Int8Recipe(exclude_op_types=("Gemm",)).float_nodes(graph) == ["g"]
    assert Int8Recipe(float_ends=1).float_nodes(graph) == ["c0", "c3"]
    assert Int8Recipe(float_ends=2).float_nodes(graph) == ["c0", "dw1", "c2", "c3"]
    assert Int8Recipe(float_depthwise=True).float_nodes(graph) == ["dw1"]
    both = Int8Recipe(float_ends=1, float_depthwise=True, exclude_op_types=("Conv",))
    assert both.float_nodes(graph) == ["c0", "dw1", "c2", "c3"]  # each once
    assert Int8Recipe(float_ends=1, float_depthwise=True).describe()["float_depthwise"] is True
    # the prelude: what comes before the first convolution (a network's input standardisation)
    pre = [helper.make_node("ReduceMean", ["x"], ["m"], name="mean")]
    pre += [helper.make_node("Sub", ["x", "m"], ["s"], name="sub")]
    with_prelude = helper.make_graph(pre + nodes, "g", [], [])
    assert Int8Recipe(float_prelude=True).float_nodes(with_prelude) == ["mean", "sub"]
    assert Int8Recipe(float_prelude=True).float_nodes(graph) == []  # no prelude there
    assert Int8Recipe(float_prelude=True, float_ends=1).float_nodes(with_prelude) == [
        "mean",
        "sub",
        "c0",
        "c3",
    ]
    assert "float_prelude" in Int8Recipe(float_prelude=True).describe()
    no_conv = helper.make_graph(pre, "g", [], [])
    assert Int8Recipe(float_prelude=True).float_nodes(no_conv) == []  # nothing to stop at
