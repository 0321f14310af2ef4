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
from engine.train.qdq_mirror import QDQMirror, attrs


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
    record = {
        **tuning.describe(),
        "images": len(x),
        "objective_before": before,
        "objective_after": after,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if after >= before:  # a calibration already close to FP32: the steps only added noise
        log(f"INT8 tuning: objective {after:.5f} after tuning, not lower: calibrated file kept")
        return record | {"kept": "calibrated (tuning did not lower the objective)"}
    tmp = int8_path.with_name(f".{int8_path.name}.tuning")
    onnx.save(mirror.export(), str(tmp))
    tmp.replace(int8_path)
    log(f"INT8 tuning: objective {after:.5f} after tuning -> {int8_path}")
    return record


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
        a = attrs(node)
        if (
            node.input[0] in outputs
            and node.input[1] in inits
            and node.input[2] in inits
            and a.get("alpha", 1.0) == 1.0
            and a.get("beta", 1.0) == 1.0
            and a.get("transA", 0) == 0
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
    if w.ndim != 2 or w.shape[0] != 1 or b.shape != (1,) or attrs(node).get("transB", 0) != 1:
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
