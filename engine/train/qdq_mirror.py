"""A PyTorch mirror of a QDQ ONNX graph with ONNX Runtime's arithmetic (the same scales, zero
points, round-half-to-even and saturation), whose integer weights, biases and (optionally)
activation scales are parameters: engine/train/int8_tune.py fine-tunes them against the FP32
model and writes them back into the same graph (`QDQMirror.export`).

Zero padding of a Conv (symmetric or not, e.g. the TF-style "SAME" padding of EfficientNet's
strided convolutions) pads the dequantized input with real zeros, as QLinearConv pads with the
zero point; a MaxPool pads with -inf.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from engine.errors import ModelError

# Integer ranges of the QDQ tensors (QuantizeLinear saturates to these).
QRANGE = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
MIRRORED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "Conv",
    "Relu",
    "Clip",
    "Add",
    "MaxPool",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
    # the per-image standardisation in front of the network (engine.train.resnet.Standardized)
    "ReduceMean",
    "Sub",
    "Mul",
    "Div",
    "Sqrt",
    "Constant",
)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """round half to even forward (as ONNX Runtime's QuantizeLinear); identity backward."""
    return x + (torch.round(x) - x).detach()


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _padded(
    x: torch.Tensor, node: onnx.NodeProto, pads: list[int], value: float
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(input, padding for torch): symmetric ONNX pads go to torch's `padding`; asymmetric ones
    ([top, left, bottom, right] for 2-D) pad the input explicitly with `value` first."""
    half = len(pads) // 2
    if pads[:half] == pads[half:]:
        return x, tuple(pads[:half])
    if half != 2:
        raise ModelError(f"{node.name}: asymmetric pads {pads} of a {half}-D op are not mirrored")
    top, left, bottom, right = pads
    return F.pad(x, (left, right, top, bottom), value=value), (0, 0)


class QDQMirror(torch.nn.Module):
    """A QDQ ONNX graph run by torch with ONNX Runtime's arithmetic.

    The initializers a DequantizeLinear reads (INT8 weights, INT32 biases) and the float
    initializers of Conv/Gemm (layers left in float) become parameters; integer ones are rounded
    and saturated in the forward pass with a straight-through gradient. Zero points are
    constants; so are the scales, unless learn_scales: then each activation scale (one per
    Q/DQ pair name) is learned too, as its logarithm (the LSQ idea), and the INT32 bias of a
    layer follows its input's scale (ONNX Runtime's QLinearConv reads the bias in units of
    input scale x weight scale). `export()` writes the parameters back into a copy of the model.
    """

    def __init__(self, model: onnx.ModelProto, *, learn_scales: bool = False) -> None:
        super().__init__()
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - set(MIRRORED_OPS))
        if unsupported:
            raise ModelError(f"INT8 tuning: ops not mirrored: {', '.join(unsupported)}")
        if len(graph.input) != 1:
            raise ModelError("INT8 tuning: the model must have one input")
        self._model = model
        self._inits = {i.name: i for i in graph.initializer}
        learn = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
        learn += [i for n in graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:]]
        self._param_of: dict[str, str] = {}
        self.weights = torch.nn.ParameterList()
        for name in dict.fromkeys(n for n in learn if n in self._inits):
            arr = numpy_helper.to_array(self._inits[name]).astype(np.float32)
            self._param_of[name] = str(len(self.weights))
            self.weights.append(torch.nn.Parameter(torch.from_numpy(arr)))
        self._const = {
            name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for name, init in self._inits.items()
            if name not in self._param_of
        }
        self._input = graph.input[0].name
        self.output_names = [o.name for o in graph.output]
        # learned activation scales: name -> index into log_scales
        self._scale_of: dict[str, int] = {}
        self.log_scales = torch.nn.ParameterList()
        # bias DQ output -> (bias initializer, its scale, input scale, weight scale)
        self._bias: dict[str, tuple[str, str, str, str]] = {}
        if learn_scales:
            self._learn_scales(graph)

    def _learn_scales(self, graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] not in self._inits:
                name = node.input[1]
                if name not in self._scale_of and name in self._inits:
                    value = numpy_helper.to_array(self._inits[name]).astype(np.float32)
                    self._scale_of[name] = len(self.log_scales)
                    self.log_scales.append(torch.nn.Parameter(torch.log(torch.from_numpy(value))))
        dq_of = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
        for node in graph.node:
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
                continue
            x, w, b = (dq_of.get(i) for i in node.input[:3])
            if x is None or w is None or b is None or b.input[0] not in self._inits:
                continue
            if self._inits[b.input[0]].data_type == TensorProto.INT32:
                self._bias[b.output[0]] = (b.input[0], b.input[1], x.input[1], w.input[1])

    def _scale(self, name: str) -> torch.Tensor:
        i = self._scale_of.get(name)
        return self._const[name].float() if i is None else torch.exp(self.log_scales[i])

    def dtype_of(self, p: torch.nn.Parameter) -> int:
        for name, key in self._param_of.items():
            if self.weights[int(key)] is p:
                return int(self._inits[name].data_type)
        raise KeyError("not a parameter of this mirror")

    def _value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self._scale_of:
            return self._scale(name)
        if name in self._param_of:
            p = self.weights[int(self._param_of[name])]
            dtype = self._inits[name].data_type
            if dtype in QRANGE:
                lo, hi = QRANGE[dtype]
                return torch.clamp(_ste_round(p), lo, hi)
            return p
        return self._const[name]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {self._input: x}
        for node in self._model.graph.node:
            if node.output[0] in self._bias:
                env[node.output[0]] = self._coupled_bias(node.output[0])
                continue
            env[node.output[0]] = self._run(
                node, [self._value(env, i) if i else None for i in node.input]
            )
        return [env[o] for o in self.output_names]

    def _bias_values(self, out: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A coupled INT32 bias: its float value (the parameter, in units of the scale it was
        calibrated with) and its scale now (input scale x weight scale)."""
        b, sb, sx, sw = self._bias[out]
        value = self.weights[int(self._param_of[b])] * self._const[sb].float()
        return value, self._scale(sx) * self._scale(sw)

    def _coupled_bias(self, out: str) -> torch.Tensor:
        value, scale = self._bias_values(out)
        lo, hi = QRANGE[TensorProto.INT32]
        return torch.clamp(_ste_round(value / scale), lo, hi) * scale

    def _run(self, node: onnx.NodeProto, ins: list[torch.Tensor | None]) -> torch.Tensor:
        a, t = attrs(node), node.op_type
        if t == "Constant":
            return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
        x = ins[0]
        assert x is not None
        if t in ("QuantizeLinear", "DequantizeLinear"):
            scale = ins[1]
            assert scale is not None
            zp = (
                ins[2]
                if len(ins) > 2 and ins[2] is not None
                else torch.zeros((), dtype=torch.int32)
            )
            s, z = scale.float(), zp.float()
            if s.ndim == 1 and s.numel() > 1:  # per channel, along `axis`
                shape = [1] * x.ndim
                shape[a.get("axis", 1)] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            if t == "DequantizeLinear":
                return (x.float() - z) * s
            zp_name = node.input[2] if len(node.input) > 2 else ""
            dtype = self._inits[zp_name].data_type if zp_name in self._inits else TensorProto.UINT8
            lo, hi = QRANGE[dtype]
            return torch.clamp(_ste_round(x / s) + z, lo, hi)
        if t == "Conv":
            assert ins[1] is not None
            x, padding = _padded(x, node, a.get("pads", [0] * (2 * (x.ndim - 2))), 0.0)
            return F.conv2d(
                x,
                ins[1],
                ins[2] if len(ins) > 2 else None,
                stride=a.get("strides", 1),
                padding=padding,
                dilation=a.get("dilations", 1),
                groups=a.get("group", 1),
            )
        if t == "Relu":
            return F.relu(x)
        if t == "Clip":
            lo_t = ins[1] if len(ins) > 1 else None
            hi_t = ins[2] if len(ins) > 2 else None
            return torch.clamp(
                x,
                None if lo_t is None else float(lo_t),
                None if hi_t is None else float(hi_t),
            )
        if t in ("Add", "Sub", "Mul", "Div"):
            assert ins[1] is not None
            other = ins[1]
            if t == "Add":
                return x + other
            return x - other if t == "Sub" else x * other if t == "Mul" else x / other
        if t == "Sqrt":
            return torch.sqrt(x)

        if t == "ReduceMean":
            axes_t = ins[1] if len(ins) > 1 else None
            axes = a.get("axes") if axes_t is None else [int(v) for v in axes_t.reshape(-1)]
            dims = tuple(range(x.ndim)) if not axes else tuple(int(v) for v in axes)
            return x.mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))
        if t == "MaxPool":
            x, padding = _padded(x, node, a.get("pads", [0] * (2 * (x.ndim - 2))), -math.inf)
            return F.max_pool2d(
                x,
                a["kernel_shape"],
                a.get("strides", 1),
                padding,
                ceil_mode=bool(a.get("ceil_mode", 0)),
            )
        if t == "GlobalAveragePool":
            return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        if t == "Flatten":
            return x.flatten(a.get("axis", 1))
        # Gemm
        w, b = ins[1], ins[2] if len(ins) > 2 else None
        assert w is not None
        if a.get("transA", 0):
            x = x.t()
        y = x @ (w.t() if a.get("transB", 0) else w) * a.get("alpha", 1.0)
        return y if b is None else y + b * a.get("beta", 1.0)

    def export(self) -> onnx.ModelProto:
        """A copy of the model with the parameters' current values (integers rounded, saturated)."""
        out = onnx.ModelProto()
        out.CopyFrom(self._model)
        coupled: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for dq_out, (b, sb, _, _) in self._bias.items():
                value, scale = self._bias_values(dq_out)
                s32 = scale.numpy().astype(np.float32)
                coupled[sb] = s32
                q = np.round(value.numpy().astype(np.float64) / s32.astype(np.float64))
                coupled[b] = np.clip(q, *QRANGE[TensorProto.INT32]).astype(np.int32)
            for name, i in self._scale_of.items():
                coupled[name] = torch.exp(self.log_scales[i]).numpy().astype(np.float32)
        for init in out.graph.initializer:
            if init.name in coupled:
                init.CopyFrom(numpy_helper.from_array(coupled[init.name], init.name))
                continue
            key = self._param_of.get(init.name)
            if key is None:
                continue
            v = self.weights[int(key)].detach().numpy()
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            if init.data_type in QRANGE:
                v = np.clip(np.round(v), *QRANGE[init.data_type])
            init.CopyFrom(numpy_helper.from_array(v.astype(np_dtype), init.name))
        return out
