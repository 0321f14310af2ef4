"""Quality beside speed: how far a faster configuration's outputs are from the FP32 reference.

Every faster configuration (INT8, another batch size, the Pillow or draft decoder, ...) is
compared image by image with the reference run (ONNX Runtime FP32, DALI, same images):

    same_decision           share of images with the same decision (prob >= threshold)
    prob_max_abs_diff       largest |prob - prob_ref|, and prob_mean_abs_diff
    embedding_cosine_mean   cosine of the embedding with the reference's (index vectors, f16),
    embedding_cosine_min    mean and worst image
    roc_auc_ref, roc_auc, roc_auc_diff
                            with labels (the dev set's labels.csv): AUC of each, and the
                            difference (this - reference); None without labels

The key names are those of the INT8 parity record of engine/train/export.py.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Outputs:
    """Per-image results of one run, in one order: names, probabilities, unit embeddings."""

    names: list[str]
    prob: np.ndarray  # (n,)
    embedding: np.ndarray  # (n, D), unit rows
    threshold: float


def read_run(out: Path) -> Outputs:
    """The `ok` rows of a `cxr screen` output directory and their index vectors."""
    import polars as pl

    from engine.io import parquet, vectors

    df = parquet.read_predictions(out, ["key", "source", "member", "status", "prob", "threshold"])
    df = df.filter(pl.col("status") == "ok").sort("key")
    names = [
        f"{s}:{m}" if m else s
        for s, m in zip(df["source"].to_list(), df["member"].to_list(), strict=True)
    ]
    keys = df["key"].to_numpy().astype(np.uint64)
    index = vectors.load_index(out)
    if index is None or len(keys) == 0:
        emb = np.zeros((len(keys), 0), np.float32)
    else:
        emb = np.asarray(index.get(keys), np.float32).reshape(len(keys), -1)
    threshold = float(df["threshold"][0]) if df.height else 0.5
    return Outputs(
        names=names,
        prob=df["prob"].to_numpy().astype(np.float64),
        embedding=_unit(emb),
        threshold=threshold,
    )


def from_arrays(names: list[str], prob: Any, embedding: Any, threshold: float) -> Outputs:
    emb = np.asarray(embedding, np.float32)
    return Outputs(
        names=list(names),
        prob=np.asarray(prob, np.float64),
        embedding=_unit(emb.reshape(len(names), -1)),
        threshold=threshold,
    )


def _unit(v: np.ndarray) -> np.ndarray:
    if v.size == 0:
        return v
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def read_labels(labels_csv: Path) -> dict[str, int]:
    """Resolved image path -> label (0/1), from a CSV with `path` relative to the CSV's folder."""
    labels_csv = Path(labels_csv)
    out: dict[str, int] = {}
    with open(labels_csv, newline="") as f:
        for row in csv.DictReader(f):
            out[str((labels_csv.parent / row["path"]).resolve())] = int(row["label"])
    return out


def agreement(ref: Outputs, got: Outputs, labels: dict[str, int] | None = None) -> dict[str, Any]:
    """Compare `got` with `ref` on the images both have (matched by name)."""
    from engine.eval.metrics import roc_auc

    where = {n: i for i, n in enumerate(got.names)}
    common = [(i, where[n]) for i, n in enumerate(ref.names) if n in where]
    result: dict[str, Any] = {
        "images": len(common),
        "only_in_reference": len(ref.names) - len(common),
        "only_in_this": len(got.names) - len(common),
        "threshold": ref.threshold,
    }
    if not common:
        return result
    ri = np.array([i for i, _ in common])
    gi = np.array([j for _, j in common])
    p_ref, p_got = ref.prob[ri], got.prob[gi]
    diff = np.abs(p_ref - p_got)
    result.update(
        same_decision=float(np.mean((p_ref >= ref.threshold) == (p_got >= got.threshold))),
        prob_max_abs_diff=float(diff.max()),
        prob_mean_abs_diff=float(diff.mean()),
    )
    if ref.embedding.size and got.embedding.size:
        cos = np.sum(ref.embedding[ri] * got.embedding[gi], axis=1)
        result.update(
            embedding_cosine_mean=float(cos.mean()), embedding_cosine_min=float(cos.min())
        )
    result.update(roc_auc_ref=None, roc_auc=None, roc_auc_diff=None, labelled=0)
    if labels:
        keys = [str(Path(ref.names[i]).resolve()) for i in ri]
        have = np.array([k in labels for k in keys])
        if have.any():
            y = np.array([labels[k] for k, h in zip(keys, have, strict=True) if h])
            a_ref, a_got = roc_auc(y, p_ref[have]), roc_auc(y, p_got[have])
            result.update(
                labelled=int(have.sum()),
                roc_auc_ref=_finite(a_ref),
                roc_auc=_finite(a_got),
                roc_auc_diff=_finite(a_got - a_ref),
            )
    return result


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
