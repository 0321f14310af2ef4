"""Torch -> ONNX export with a parity check, and the INT8 (QDQ) variant with its parity report.

ONNX Runtime FP32 is the oracle: an export only counts if ORT reproduces torch's outputs (to
1e-4 relative to the output's scale), and the INT8 model is judged against the FP32 ONNX.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from engine import __version__
from engine.errors import ModelError
from engine.train.metrics import roc_auc

OPSET = 17
PARITY_TOL = 1e-4


def to_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    output_names: Sequence[str],
    architecture: str,
    doc: str,
) -> onnx.ModelProto:
    """Eval-mode export (BN folded), input "image" with a dynamic batch dimension "N"."""
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    axes = {name: {0: "N"} for name in ("image", *output_names)}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the torch.export-based exporter needs onnxscript, not a dependency here.
        torch.onnx.export(
            model,
            (example.float().contiguous(),),
            buf,  # type: ignore[arg-type]  # a file object works; the stub says path
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=list(output_names),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    _inline_shared_initializers(proto)
    proto.producer_name, proto.producer_version = "cxr-engine", __version__
    proto.doc_string = f"cxr-engine: {doc}"
    onnx.helper.set_model_props(proto, {"cxr.architecture": architecture, "cxr.trained": "true"})
    onnx.checker.check_model(proto)
    return proto


def _inline_shared_initializers(proto: onnx.ModelProto) -> None:
    """Replace Identity(initializer) nodes by a copy of the initializer.

    The exporter deduplicates byte-identical folded weights (e.g. zero-initialised residual BNs)
    into Identity nodes; copying them back keeps the graph node-for-node the topology of
    engine.arch, which TensorRT and the topology test expect.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in keep for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def ort_session(model: Path | bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_run(session: Any, x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(x), batch):
        outs = session.run(names, {"image": np.ascontiguousarray(x[start : start + batch])})
        for n, o in zip(names, outs, strict=True):
            parts[n].append(o)
    return {n: np.concatenate(v) for n, v in parts.items()}


def torch_outputs(model: torch.nn.Module, x: np.ndarray, names: Sequence[str]) -> dict:
    model = model.float().eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x)))
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.float().numpy() for n, o in zip(names, out, strict=True)}


def check_parity(
    model: torch.nn.Module, proto: onnx.ModelProto, x: np.ndarray, threads: int, where: Path
) -> dict[str, float]:
    """Max |torch - ORT| per output, relative to max(1, max |torch|); ModelError above 1e-4."""
    names = [o.name for o in proto.graph.output]
    ref = torch_outputs(model, x, names)
    got = ort_run(ort_session(proto.SerializeToString(), threads), x)
    report = {}
    for n in names:
        scale = max(1.0, float(np.abs(ref[n]).max()))
        report[n] = float(np.abs(ref[n] - got[n]).max()) / scale
    bad = {n: d for n, d in report.items() if d > PARITY_TOL}
    if bad:
        raise ModelError(
            f"{where}: ONNX Runtime disagrees with torch beyond {PARITY_TOL} (relative max "
            f"difference {bad}); the export is not faithful, report this with the torch version"
        )
    return report


class _Calibration:
    """onnxruntime CalibrationDataReader over an array of inputs, in batches. It also serves
    quantize_static's strided calibration (len + set_range, in batches): ORT then collects one
    batch at a time and merges ranges/histograms, so memory stays one batch of activations
    (Percentile and Entropy otherwise keep every activation of every input: tens of GB for a
    few hundred ResNet50 crops, docs/measurements.md)."""

    def __init__(self, x: np.ndarray, batch: int = 16) -> None:
        self._x, self._batch = x, batch
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self._x) // self._batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        b = self._batch
        self._batches = iter(
            [
                {"image": np.ascontiguousarray(self._x[i * b : (i + 1) * b])}
                for i in range(start_index, min(end_index, len(self)))
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@dataclass(frozen=True, kw_only=True)
class Int8Recipe:
    """How the INT8 QDQ export is calibrated (recorded in the manifest's parity section).

    symmetric_activations: S8 activations with zero point 0, which TensorRT's explicit
    quantization requires; ONNX Runtime runs both. exclude: node types left in float (e.g. the
    final Gemm, whose output is the logit the decision is taken on). float_ends: the first and
    the last N convolutions (in graph order) left in float: the first sees the raw image, the
    last writes the output (for the U-Net, the logits whose threshold decides the box edges).
    float_depthwise: depthwise (grouped) convolutions left in float: few MACs, and per-channel
    INT8 of a 3x3 single-channel filter loses more than it does on a dense one.
    float_prelude: the nodes before the first convolution left in float (a network's own input
    standardisation: per-image mean and variance, elementwise and cheap, whose U8 rounding
    reaches every later layer).
    """

    method: str = "minmax"  # minmax | percentile | entropy
    symmetric_activations: bool = False
    exclude_op_types: tuple[str, ...] = ()
    percentile: float = 99.999
    float_ends: int = 0
    float_depthwise: bool = False
    float_prelude: bool = False

    def float_nodes(self, graph: Any) -> list[str]:
        """Names of the graph's nodes this recipe leaves in float, in graph order."""
        convs = [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
        k = self.float_ends
        ends = set(convs[:k] + convs[-k:]) if k else set()
        prelude: set[str] = set()
        if self.float_prelude and convs:
            for n in graph.node:
                if n.op_type in ("Conv", "ConvTranspose"):
                    break
                prelude.add(n.name)
        return [
            n.name
            for n in graph.node
            if n.op_type in self.exclude_op_types
            or n.name in ends
            or n.name in prelude
            or (
                self.float_depthwise
                and n.op_type == "Conv"
                and any(a.name == "group" and a.i > 1 for a in n.attribute)
            )
        ]

    def describe(self) -> dict[str, Any]:
        act = "S8 symmetric" if self.symmetric_activations else "U8"
        out: dict[str, Any] = {
            "method": {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}[
                self.method
            ],
            "format": f"QDQ, per-channel S8 weights, {act} activations",
        }
        if self.method == "percentile":
            out["percentile"] = self.percentile
        if self.exclude_op_types:
            out["float_op_types"] = list(self.exclude_op_types)
        if self.float_ends:
            out["float_convolutions"] = f"the first and last {self.float_ends}"
        if self.float_depthwise:
            out["float_depthwise"] = True
        if self.float_prelude:
            out["float_prelude"] = "the nodes before the first convolution"
        return out


def quantize_int8(
    fp32_path: Path, int8_path: Path, calibration: np.ndarray, recipe: Int8Recipe | None = None
) -> None:
    """Static INT8, QDQ, per-channel weights, calibrated on the given inputs (see Int8Recipe)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    recipe = recipe or Int8Recipe()
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if recipe.method not in methods:
        raise ValueError(f"INT8 calibration method must be one of {sorted(methods)}")

    class Reader(_Calibration, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="cxr-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        exclude = recipe.float_nodes(graph)
        extra: dict[str, Any] = {
            "ActivationSymmetric": recipe.symmetric_activations,
            "CalibStridedMinMax": 1,  # one batch at a time (see _Calibration)
        }
        if recipe.method == "percentile":
            extra["CalibPercentile"] = recipe.percentile
        tmp_out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(tmp_out),
            Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if recipe.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[recipe.method],
            nodes_to_exclude=exclude,
            extra_options=extra,
        )
        int8_path.write_bytes(tmp_out.read_bytes())


PARITY_INPUTS = "unaugmented lung crops of every labelled image (all splits)"


def export_parity(
    ref: dict[str, np.ndarray],
    path: Path,
    x: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    threads: int,
    *,
    precision: str = "int8",
    held_out: np.ndarray | None = None,
) -> dict[str, Any]:
    """Another export (INT8, float16-stored weights) vs FP32 ONNX on the same inputs x (ref: the
    FP32 ONNX outputs for x): decisions, ROC AUC of each (keyed by precision), probabilities,
    embeddings. held_out: a mask of the inputs no calibration or tuning saw; their same-decision
    rate is reported apart."""
    got = ort_run(ort_session(path, threads), x)
    p_ref = 1 / (1 + np.exp(-ref["logit"].reshape(-1).astype(np.float64)))
    p_got = 1 / (1 + np.exp(-got["logit"].reshape(-1).astype(np.float64)))
    a, b = ref["embedding"].astype(np.float64), got["embedding"].astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    auc_ref, auc_got = roc_auc(p_ref, labels), roc_auc(p_got, labels)
    same = (p_ref >= threshold) == (p_got >= threshold)
    extra: dict[str, Any] = {}
    if held_out is not None and held_out.any():
        extra = {
            "held_out_images": int(held_out.sum()),
            "same_decision_held_out": float(same[held_out].mean()),
        }
    return {
        "images": len(x),
        "threshold": threshold,
        "same_decision": float(same.mean()),
        **extra,
        "roc_auc_fp32": auc_ref,
        f"roc_auc_{precision}": auc_got,
        "roc_auc_diff": None if auc_ref is None or auc_got is None else auc_got - auc_ref,
        "prob_max_abs_diff": float(np.abs(p_ref - p_got).max()),
        "embedding_cosine_mean": float(cos.mean()),
        "embedding_cosine_min": float(cos.min()),
    }
