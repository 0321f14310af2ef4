"""Pure-ONNX builders for the architectures that `cxr models init` exports untrained.

Why these exist: the base install has no torch, yet `cxr models init` must still write a
segmenter and a classifier that every backend (ONNX Runtime, TensorRT) loads, so the whole
pipeline runs end to end before anyone has trained a model. Building the graphs with onnx.helper
and numpy keeps torch an optional extra.

Contract with engine/train (the torch extra): a trained export must keep the same input and output
names, dtypes and shapes, so that a trained model drops in where an untrained one was:

    classifier  image [N, C, S, S] float32 -> logit [N, 1], embedding [N, D]
    segmenter   image [N, 1, S, S] float32 -> mask_logit [N, 1, S, S]

N is a dynamic dimension named "N". Initializer names follow torchvision's state_dict keys where
there is a counterpart (conv1.weight, layer1.0.conv2.bias, fc.weight), with BatchNorm folded into
each conv's bias, because an inference graph has no BN nodes. Weights are drawn from
numpy.random.Generator(seed), so one seed gives a byte-identical model and a reproducible sha256.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine import __version__
from engine.models.manifest import UNET_SEGMENTERS

OPSET = 17
# IR 9 is what onnx 1.15 writes for opset 17; every ONNX Runtime and TensorRT we support reads it.
IR_VERSION = 9
PRODUCER = "cxr-engine"

# Fixup-style damping of each residual branch's last conv: with plain He init the variance of the
# trunk grows with every one of ResNet50's 16 blocks; 0.2 keeps it near constant while the
# branches still contribute enough for different images to get different embeddings.
RESIDUAL_BRANCH_GAIN = 0.2

RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4


class GraphBuilder:
    """Collects nodes and float32 initializers, drawing every weight from one seeded Generator.

    Weights are drawn in the order layers are added, so building the same topology with the same
    seed always gives the same bytes.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken: set[str] = set()

    def unique(self, name: str) -> str:
        candidate, suffix = name, 1
        while candidate in self._taken:
            candidate, suffix = f"{name}_{suffix}", suffix + 1
        self._taken.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def he_normal(self, shape: Sequence[int], fan_in: int, gain: float = 1.0) -> np.ndarray:
        std = np.float32(gain * np.sqrt(2.0 / fan_in))
        return self.rng.standard_normal(tuple(shape), dtype=np.float32) * std

    def node(
        self, op: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs
    ) -> str:
        node_name = self.unique(name)
        out = node_name if output is None else self.unique(output)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=node_name, **attrs))
        return out

    def conv(
        self,
        x: str,
        name: str,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        gain: float = 1.0,
        output: str | None = None,
    ) -> str:
        weight = self.he_normal((c_out, c_in, kernel, kernel), c_in * kernel * kernel, gain)
        w = self.initializer(f"{name}.weight", weight)
        # Zero bias: what a freshly folded BN (beta=0, mean=0) would leave.
        b = self.initializer(f"{name}.bias", np.zeros(c_out, np.float32))
        pad = kernel // 2
        return self.node(
            "Conv",
            [x, w, b],
            name,
            output,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
        )

    def conv_relu(
        self, x: str, name: str, c_in: int, c_out: int, kernel: int, stride: int = 1
    ) -> str:
        return self.relu(self.conv(x, name, c_in, c_out, kernel, stride), f"{name}.relu")

    def up_conv(self, x: str, name: str, c_in: int, c_out: int) -> str:
        # A 2x2 stride-2 transposed conv feeds each output pixel from one input pixel per
        # channel, so its fan-in is c_in, not c_in * 4.
        w = self.initializer(f"{name}.weight", self.he_normal((c_in, c_out, 2, 2), c_in))
        b = self.initializer(f"{name}.bias", np.zeros(c_out, np.float32))
        return self.node("ConvTranspose", [x, w, b], name, kernel_shape=[2, 2], strides=[2, 2])

    def linear(
        self, x: str, name: str, d_in: int, d_out: int, gain: float = 1.0, output: str | None = None
    ) -> str:
        # torch.nn.Linear layout [out, in] with transB=1, so trained weights map across unchanged.
        w = self.initializer(f"{name}.weight", self.he_normal((d_out, d_in), d_in, gain))
        b = self.initializer(f"{name}.bias", np.zeros(d_out, np.float32))
        return self.node("Gemm", [x, w, b], name, output, transB=1)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def concat(self, parts: Sequence[str], name: str) -> str:
        return self.node("Concat", parts, name, axis=1)

    def max_pool(self, x: str, name: str, kernel: int, stride: int, pad: int = 0) -> str:
        return self.node(
            "MaxPool",
            [x],
            name,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
        )

    def global_pool(self, x: str, name: str, output: str | None = None) -> str:
        pooled = self.node("GlobalAveragePool", [x], name)
        return self.node("Flatten", [pooled], f"{name}.flatten", output, axis=1)

    def model(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        doc: str,
        seed: int,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, list(inputs), list(outputs), self.initializers, doc_string=doc
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            producer_version=__version__,
            doc_string=f"{PRODUCER}: {doc}",
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(
            model, {"cxr.architecture": name, "cxr.seed": str(seed), "cxr.trained": "false"}
        )
        onnx.checker.check_model(model)
        return model


def _float_info(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _classifier_heads(g: GraphBuilder, features: str, c_features: int, embedding_dim: int) -> None:
    """Pools features into "embedding" (projecting only when the widths differ) and adds "logit"."""
    if c_features == embedding_dim:
        embedding = g.global_pool(features, "avgpool", output="embedding")
    else:
        pooled = g.global_pool(features, "avgpool")
        embedding = g.linear(pooled, "proj", c_features, embedding_dim, output="embedding")
    # Gain 1/sqrt(2) is LeCun init: the logit starts O(1), so sigmoid is not saturated.
    g.linear(embedding, "fc", embedding_dim, 1, gain=np.sqrt(0.5), output="logit")


def _classifier_io(in_channels: int, size: int, embedding_dim: int):
    inputs = [_float_info("image", ["N", in_channels, size, size])]
    outputs = [_float_info("logit", ["N", 1]), _float_info("embedding", ["N", embedding_dim])]
    return inputs, outputs


def _bottleneck(
    g: GraphBuilder, x: str, name: str, c_in: int, width: int, stride: int
) -> tuple[str, int]:
    """torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv)."""
    c_out = width * BOTTLENECK_EXPANSION
    y = g.conv_relu(x, f"{name}.conv1", c_in, width, 1)
    y = g.conv_relu(y, f"{name}.conv2", width, width, 3, stride)
    y = g.conv(y, f"{name}.conv3", width, c_out, 1, gain=RESIDUAL_BRANCH_GAIN)
    shortcut = x
    if stride != 1 or c_in != c_out:
        shortcut = g.conv(x, f"{name}.downsample.0", c_in, c_out, 1, stride)
    return g.relu(g.add(y, shortcut, f"{name}.add"), f"{name}.relu"), c_out


def resnet50_classifier(
    *, seed: int = 0, in_channels: int = 1, size: int = 224, embedding_dim: int = 2048
) -> onnx.ModelProto:
    """ResNet50 (torchvision topology, BN folded) -> logit [N, 1] and embedding [N, D]."""
    _require_positive(in_channels=in_channels, size=size, embedding_dim=embedding_dim)
    g = GraphBuilder(seed)
    x = g.conv_relu("image", "conv1", in_channels, 64, 7, stride=2)
    x = g.max_pool(x, "maxpool", kernel=3, stride=2, pad=1)
    channels = 64
    for stage, (blocks, width) in enumerate(zip(RESNET50_BLOCKS, RESNET50_WIDTHS, strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x, channels = _bottleneck(g, x, f"layer{stage + 1}.{block}", channels, width, stride)
    _classifier_heads(g, x, channels, embedding_dim)
    inputs, outputs = _classifier_io(in_channels, size, embedding_dim)
    doc = f"untrained ResNet50 classifier, BN folded, seed {seed}"
    return g.model("resnet50", inputs, outputs, doc, seed)


TINY_CLASSIFIER_WIDTHS = (8, 16, 32, 32)


def tiny_classifier(
    *, seed: int = 0, in_channels: int = 1, size: int = 64, embedding_dim: int = 64
) -> onnx.ModelProto:
    """Four stride-2 conv+relu layers, pool, linear: the classifier contract at test speed."""
    _require_positive(in_channels=in_channels, size=size, embedding_dim=embedding_dim)
    g = GraphBuilder(seed)
    x, channels = "image", in_channels
    for i, width in enumerate(TINY_CLASSIFIER_WIDTHS):
        x = g.conv_relu(x, f"conv{i + 1}", channels, width, 3, stride=2)
        channels = width
    _classifier_heads(g, x, channels, embedding_dim)
    inputs, outputs = _classifier_io(in_channels, size, embedding_dim)
    doc = f"untrained tiny classifier, seed {seed}"
    return g.model("tiny-classifier", inputs, outputs, doc, seed)


def _double_conv(g: GraphBuilder, x: str, name: str, c_in: int, c_out: int) -> str:
    x = g.conv_relu(x, f"{name}.conv1", c_in, c_out, 3)
    return g.conv_relu(x, f"{name}.conv2", c_out, c_out, 3)


def unet_segmenter(
    *, seed: int = 0, size: int = 256, base_channels: int = 16, depth: int = 4
) -> onnx.ModelProto:
    """U-Net: depth levels of (conv3x3+relu)x2 + maxpool, up-conv 2x2 + skip concat, 1x1 head."""
    return _unet(seed, size, base_channels, depth, "unet")


def tiny_segmenter(*, seed: int = 0, size: int = 64) -> onnx.ModelProto:
    """A depth-2, 4-channel U-Net: the segmenter contract at test speed."""
    return _unet(seed, size, 4, 2, "tiny-unet")


def _unet(seed: int, size: int, base_channels: int, depth: int, name: str) -> onnx.ModelProto:
    _require_positive(size=size, base_channels=base_channels, depth=depth)
    if size % (2**depth):
        raise ValueError(
            f"size {size} must be divisible by 2**depth = {2**depth} so every skip connection "
            f"lines up; use a multiple of {2**depth} or a smaller depth"
        )
    g = GraphBuilder(seed)
    widths = [base_channels * 2**level for level in range(depth + 1)]
    x, channels, skips = "image", 1, []
    for level in range(depth):
        x = _double_conv(g, x, f"enc{level}", channels, widths[level])
        skips.append(x)
        x = g.max_pool(x, f"pool{level}", kernel=2, stride=2)
        channels = widths[level]
    x = _double_conv(g, x, "bottleneck", channels, widths[depth])
    for level in reversed(range(depth)):
        up = g.up_conv(x, f"up{level}", widths[level + 1], widths[level])
        x = g.concat([up, skips[level]], f"cat{level}")
        x = _double_conv(g, x, f"dec{level}", 2 * widths[level], widths[level])
    g.conv(x, "head", widths[0], 1, 1, gain=np.sqrt(0.5), output="mask_logit")
    inputs = [_float_info("image", ["N", 1, size, size])]
    outputs = [_float_info("mask_logit", ["N", 1, size, size])]
    doc = f"untrained U-Net segmenter (depth {depth}, base {base_channels}), seed {seed}"
    return g.model(name, inputs, outputs, doc, seed)


def segmenter_builder(name: str) -> Callable[..., onnx.ModelProto]:
    """build(seed=0, size=<the table's>) for a U-Net of engine.models.UNET_SEGMENTERS."""
    shape = UNET_SEGMENTERS[name]

    def build(*, seed: int = 0, size: int = shape.size) -> onnx.ModelProto:
        return _unet(seed, size, shape.base_channels, shape.depth, name)

    build.__name__ = f"segmenter_{name.replace('-', '_')}"
    build.__doc__ = f"U-Net {name!r}: base {shape.base_channels}, depth {shape.depth}."
    return build


ARCHITECTURES: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet50": resnet50_classifier,
    "tiny-classifier": tiny_classifier,
    **{name: segmenter_builder(name) for name in UNET_SEGMENTERS},
}
