"""INT8 tuning: the QDQ export's integer weights (and activation scales) fine-tuned to follow
the FP32 model.

Post-training calibration alone leaves the ResNet50's logit too far from FP32 on average
(per-tensor U8 activations in every block; the errors: docs/model-eval/int8-recipes.md) for the
same decision on 99% of images when many logits sit near the threshold. Here the calibrated
QDQ model is mirrored in torch with ONNX Runtime's arithmetic (the same scales, zero points,
round-half-to-even and saturation), and its integer weights and biases are fine-tuned against
the FP32 model's outputs on the calibration crops (training images only), rounding passed
straight through in the backward pass (STE; the same idea as QAT/AdaQuant, applied to the
deployed graph itself). With learn_scales (the default) the activation scales are learned too
(LSQ-style), each INT32 bias kept in units of input scale x weight scale. Zero points, the graph
and the file layout stay as calibrated: only integer values and scales change, so ONNX Runtime
(and any QDQ consumer) runs the result with the same kernels.

refit_head then refits the float head (the embedding -> logit Gemm the recipe leaves in float)
on the INT8 embeddings by ridge regression toward the FP32 logits, where 5-fold
cross-validation on the calibration crops (folds by patient) says it lowers the logit error.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from engine.errors import ConfigError, ModelError
from engine.train.data import log
from engine.train.export import ort_run, ort_session

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


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _padding(node: onnx.NodeProto, pads: list[int]) -> tuple[int, ...]:
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        raise ModelError(f"{node.name}: asymmetric pads {pads} are not mirrored")
    return tuple(pads[:half])


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
        a, t = _attrs(node), node.op_type
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
            pads = a.get("pads", [0] * (2 * (x.ndim - 2)))
            return F.conv2d(
                x,
                ins[1],
                ins[2] if len(ins) > 2 else None,
                stride=a.get("strides", 1),
                padding=_padding(node, pads),
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
            pads = a.get("pads", [0] * (2 * (x.ndim - 2)))
            return F.max_pool2d(
                x,
                a["kernel_shape"],
                a.get("strides", 1),
                _padding(node, pads),
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


@dataclass(frozen=True, kw_only=True)
class Int8Tuning:
    """How the integer weights are tuned (recorded in the manifest's parity section).

    lr: Adam's step in integer units of the INT8 weights (a rounding flips after ~0.5);
    INT32 biases step `bias_lr_factor` times as far, float layers `float_lr_factor` times.
    learn_scales: the activation scales are learned too (log-scale steps of `scale_lr`).
    The learning rate decays to 0 on a cosine over all steps, so the last step is kept.

    The defaults are the best of the recipes compared on the shipped ResNet50s (learned scales
    with the larger scale step, then the head refit); the errors and same-decision counts of
    each recipe are in docs/model-eval/int8-recipes.md.
    """

    epochs: int = 12
    lr: float = 2e-2
    batch: int = 16
    embedding_weight: float = 1.0
    bias_lr_factor: float = 50.0
    float_lr_factor: float = 1e-2
    learn_scales: bool = True
    scale_lr: float = 3e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"INT8 tuning epochs must be 0 or more, not {self.epochs}")
        if self.batch < 1 or self.lr <= 0:
            raise ConfigError("INT8 tuning needs batch >= 1 and lr > 0")

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {
            "objective": (
                f"mean squared logit error + {self.embedding_weight:g} x mean (1 - embedding "
                "cosine), against the FP32 ONNX outputs on the calibration crops"
            ),
        }


def _objective(
    outs: list[torch.Tensor], ref: list[torch.Tensor], embedding_weight: float
) -> torch.Tensor:
    """Squared error for per-image scalars (the logit), 1 - cosine for vectors (embeddings)."""
    loss = torch.zeros(())
    for got, want in zip(outs, ref, strict=True):
        got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
        if got.shape[1] == 1:
            loss = loss + ((got - want) ** 2).mean()
        else:
            cos = F.cosine_similarity(got, want, dim=1)
            loss = loss + embedding_weight * (1 - cos).mean()
    return loss


def mean_objective(
    mirror: QDQMirror, x: np.ndarray, ref: dict[str, np.ndarray], tuning: Int8Tuning
) -> float:
    """The objective over all of x, without gradients (the value tuning lowers)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), tuning.batch):
            outs = mirror(torch.from_numpy(np.ascontiguousarray(x[i : i + tuning.batch])))
            want = [torch.from_numpy(ref[n][i : i + tuning.batch]) for n in mirror.output_names]
            total += float(_objective(outs, want, tuning.embedding_weight)) * len(outs[0])
    return total / len(x)


def tune_int8(
    int8_path: Path,
    x: np.ndarray,
    ref: dict[str, np.ndarray],
    tuning: Int8Tuning,
    threads: int,
) -> dict[str, Any]:
    """Tune int8_path's integer weights (in place) so its outputs on x follow `ref` (the FP32
    model's outputs on x, by output name). Returns the record for the manifest."""
    if tuning.epochs == 0:
        return {"epochs": 0}
    torch.set_num_threads(threads)
    torch.manual_seed(tuning.seed)
    mirror = QDQMirror(onnx.load(str(int8_path)), learn_scales=tuning.learn_scales)
    missing = [n for n in mirror.output_names if n not in ref]
    if missing:
        raise ModelError(f"INT8 tuning: no reference outputs for {missing}")
    groups: dict[str, list[torch.nn.Parameter]] = {"int8": [], "int32": [], "float": []}
    for p in mirror.weights:
        dtype = mirror.dtype_of(p)
        kind = {int(TensorProto.INT8): "int8", int(TensorProto.INT32): "int32"}.get(dtype, "float")
        groups[kind].append(p)
    factors = {"int8": 1.0, "int32": tuning.bias_lr_factor, "float": tuning.float_lr_factor}
    param_groups = [{"params": ps, "lr": tuning.lr * factors[k]} for k, ps in groups.items() if ps]
    if len(mirror.log_scales):
        param_groups.append({"params": list(mirror.log_scales), "lr": tuning.scale_lr})
    opt = torch.optim.Adam(param_groups)
    steps_per_epoch = math.ceil(len(x) / tuning.batch)
    total = tuning.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    rng = np.random.default_rng(tuning.seed)
    started = time.perf_counter()
    before = mean_objective(mirror, x, ref, tuning)
    log(f"INT8 tuning: objective {before:.5f} on {len(x)} calibration crops before tuning")
    for epoch in range(tuning.epochs):
        order = rng.permutation(len(x))
        seen, running = 0, 0.0
        for i in range(0, len(x), tuning.batch):
            idx = np.sort(order[i : i + tuning.batch])
            outs = mirror(torch.from_numpy(np.ascontiguousarray(x[idx])))
            want = [torch.from_numpy(ref[n][idx]) for n in mirror.output_names]
            loss = _objective(outs, want, tuning.embedding_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            running += float(loss.detach()) * len(idx)
        log(
            f"INT8 tuning: epoch {epoch + 1}/{tuning.epochs}, objective {running / seen:.5f} "
            f"(while stepping), {time.perf_counter() - started:.0f}s"
        )
    after = mean_objective(mirror, x, ref, tuning)
    tmp = int8_path.with_name(f".{int8_path.name}.tuning")
    onnx.save(mirror.export(), str(tmp))
    tmp.replace(int8_path)
    log(f"INT8 tuning: objective {after:.5f} after tuning -> {int8_path}")
    return {
        **tuning.describe(),
        "images": len(x),
        "objective_before": before,
        "objective_after": after,
        "seconds": round(time.perf_counter() - started, 1),
    }


# Ridge penalties tried for the head refit, in units of the mean squared embedding entry.
HEAD_LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)
HEAD_FOLDS = 5


def group_folds(n: int, groups: np.ndarray | None, folds: int) -> np.ndarray:
    """A fold number per item; all items of a group (a patient) in the same fold. Groups are
    dealt to folds in order of first appearance; without groups every item is its own."""
    if groups is None:
        return np.arange(n) % folds
    if len(groups) != n:
        raise ConfigError(f"{len(groups)} group ids for {n} crops")
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # each group's order of first appearance
    return np.asarray(rank[inverse] % folds)


def _float_head(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str, str] | None:
    """The float Gemm that makes the `logit` output from the `embedding` output, with its
    weight and bias initializer names; None where the graph has no such head."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) != 3 or node.output[0] not in outputs:
            continue
        attrs = _attrs(node)
        if (
            node.input[0] in outputs
            and node.input[1] in inits
            and node.input[2] in inits
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and attrs.get("transA", 0) == 0
        ):
            return node, node.input[1], node.input[2]
    return None


def _ridge(e: np.ndarray, r: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """dw, db minimising |e dw + db - r|^2 + lam n |dw|^2 (the intercept not penalised)."""
    mu = e.mean(0)
    ec = e - mu
    dw = np.linalg.solve(ec.T @ ec + lam * len(e) * np.eye(e.shape[1]), ec.T @ (r - r.mean()))
    return dw, float(r.mean() - mu @ dw)


def refit_head(
    int8_path: Path,
    x: np.ndarray,
    ref: dict[str, np.ndarray],
    threads: int,
    patients: np.ndarray | None = None,
) -> dict[str, Any]:
    """Refit the float head (embedding -> logit Gemm) of int8_path on its own INT8 embeddings of
    x, so that its logits follow the reference's (FP32, by output name); in place. A ridge
    correction of the FP32 head, its penalty chosen by 5-fold cross-validation on x (all crops
    of a patient in one fold where `patients`, the patient id of each crop, is given), is
    applied only where it lowers the cross-validated mean |logit error|. The embeddings are not
    changed."""
    model = onnx.load(str(int8_path))
    head = _float_head(model)
    if head is None or head[0].output[0] not in ref:
        return {"refit": False, "why": "no float Gemm from the embedding to the logit"}
    if len(x) < 2 * HEAD_FOLDS:
        return {"refit": False, "why": f"{len(x)} crops are too few to cross-validate"}
    node, w_name, b_name = head
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[w_name])
    b = numpy_helper.to_array(inits[b_name])
    if w.ndim != 2 or w.shape[0] != 1 or b.shape != (1,) or _attrs(node).get("transB", 0) != 1:
        return {"refit": False, "why": f"a head weight of shape {w.shape} (one logit expected)"}
    got = ort_run(ort_session(int8_path, threads), x)
    emb = got[node.input[0]].reshape(len(x), -1).astype(np.float64)
    logit = node.output[0]
    resid = (ref[logit].reshape(-1) - got[logit].reshape(-1)).astype(np.float64)
    scale = float((emb**2).mean()) or 1.0
    folds = group_folds(len(x), patients, HEAD_FOLDS)
    if len(np.unique(folds)) < HEAD_FOLDS:
        return {"refit": False, "why": f"fewer than {HEAD_FOLDS} groups to cross-validate"}

    def cv(lam: float | None) -> float:
        errs = []
        for f in range(HEAD_FOLDS):
            fit, held = folds != f, folds == f
            if lam is None:  # no correction
                errs.append(np.abs(resid[held]).mean())
                continue
            dw, db = _ridge(emb[fit], resid[fit], lam * scale)
            errs.append(np.abs(resid[held] - emb[held] @ dw - db).mean())
        return float(np.mean(errs))

    before = cv(None)
    scores = {lam: cv(lam) for lam in HEAD_LAMBDAS}
    best = min(scores, key=lambda k: scores[k])
    record: dict[str, Any] = {
        "images": len(x),
        "folds": HEAD_FOLDS,
        "folds_by": "crop" if patients is None else "patient",
        "cv_logit_error_before": before,
        "cv_logit_error_after": scores[best],
        "lambda": best,
    }
    if scores[best] >= before:
        return record | {"refit": False, "why": "no penalty lowers the cross-validated error"}
    dw, db = _ridge(emb, resid, best * scale)
    inits[w_name].CopyFrom(numpy_helper.from_array((w + dw[None, :]).astype(w.dtype), w_name))
    inits[b_name].CopyFrom(numpy_helper.from_array((b + db).astype(b.dtype), b_name))
    tmp = int8_path.with_name(f".{int8_path.name}.head")
    onnx.save(model, str(tmp))
    tmp.replace(int8_path)
    log(
        f"INT8 head refit: cross-validated mean |logit error| {before:.4f} -> {scores[best]:.4f} "
        f"(ridge lambda {best:g})"
    )
    return record | {"refit": True}
