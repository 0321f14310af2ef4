"""Retrieval quality of a run's embedding index, measured with the labels.

Every evaluated image (labelled, status ok, in the index) is a query; its neighbours are the k
nearest *other* evaluated images by cosine similarity, found by an exact scan. Two figures:

- precision@k: the share of the k neighbours whose label equals the query's, averaged over
  queries; `chance` is what neighbours drawn at random would score, (n_same - 1) / (n - 1);
- same-patient hit rate: among queries whose patient has at least two evaluated images, the
  share whose k neighbours include another image of the same patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.io import vectors


@dataclass(frozen=True, slots=True)
class RetrievalScore:
    queries: int
    precision_at_k: float
    chance_precision_at_k: float
    same_patient_queries: int  # queries whose patient has >= 2 evaluated images
    same_patient_hit_rate: float  # nan when same_patient_queries == 0

    def to_json(self) -> dict[str, Any]:
        return {f: _num(getattr(self, f)) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class Retrieval:
    k: int  # neighbours asked for
    neighbours: int  # neighbours per query actually used: min(k, queries - 1)
    not_in_index: int  # evaluated images whose key the index lacks (left out here)
    overall: RetrievalScore
    groups: dict[str, RetrievalScore]

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "neighbours": self.neighbours,
            "not_in_index": self.not_in_index,
            "search": "exact cosine scan among the evaluated images, the query itself excluded",
            "overall": self.overall.to_json(),
            "groups": {name: s.to_json() for name, s in self.groups.items()},
        }


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not np.isfinite(v) else v


def retrieval_quality(out: Path, rows: pl.DataFrame, *, k: int) -> Retrieval | None:
    """Scores for `rows` (columns key, label, patient, optional group); None without an index."""
    index = vectors.load_index(out, view=True)
    if index is None or len(index) == 0:
        return None
    keys = rows["key"].to_numpy().astype(np.uint64)
    found, matrix = _vectors_of(index, keys)
    rows = rows.filter(pl.Series(found))
    if rows.height < 2:
        return None
    neighbours = _nearest_others(matrix, rows["key"].to_numpy().astype(np.uint64), k)
    label = rows["label"].to_numpy()
    patient = np.unique(rows["patient"].to_numpy().astype(str), return_inverse=True)[1].ravel()
    scorer = _Scorer(label, patient, neighbours)
    groups: dict[str, RetrievalScore] = {}
    if "group" in rows.columns:
        group = rows["group"].to_numpy().astype(str)
        groups = {g: scorer.score(group == g) for g in sorted(set(group))}
    return Retrieval(
        k=k,
        neighbours=neighbours.shape[1],
        not_in_index=int((~found).sum()),
        overall=scorer.score(np.ones(rows.height, bool)),
        groups=groups,
    )


def _vectors_of(index: Any, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    got = index.get(keys)
    got = list(got) if isinstance(got, tuple | list) else list(np.atleast_2d(got))
    found = np.array([v is not None for v in got], dtype=bool)
    vecs = [np.asarray(v, np.float32).reshape(-1) for v in got if v is not None]
    matrix = np.stack(vecs) if vecs else np.zeros((0, index.ndim), np.float32)
    return found, matrix


def _nearest_others(matrix: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Row positions of each row's k nearest other rows (exact scan), shape (n, min(k, n-1))."""
    n = keys.size
    take = min(k, n - 1)
    sub = vectors.new_index(matrix.shape[1])
    sub.add(keys, matrix)
    found = sub.search(matrix, take + 1, exact=True).keys.reshape(n, -1)
    order = np.argsort(keys)
    result = np.empty((n, take), dtype=np.int64)
    for i in range(n):
        others = found[i][found[i] != keys[i]][:take]  # the query need not come first on ties
        result[i] = order[np.searchsorted(keys[order], others)]
    return result


class _Scorer:
    def __init__(self, label: np.ndarray, patient: np.ndarray, neighbours: np.ndarray) -> None:
        self.label, self.patient, self.nbr = label, patient, neighbours
        n = label.size
        same_label = np.bincount(label, minlength=2)[label]
        self.chance = (same_label - 1) / max(n - 1, 1)
        self.agree = (label[neighbours] == label[:, None]).mean(axis=1)
        images_of_patient = np.bincount(patient)[patient]
        self.eligible = images_of_patient >= 2
        self.hit = (patient[neighbours] == patient[:, None]).any(axis=1)

    def score(self, queries: np.ndarray) -> RetrievalScore:
        eligible = queries & self.eligible
        return RetrievalScore(
            queries=int(queries.sum()),
            precision_at_k=_mean(self.agree[queries]),
            chance_precision_at_k=_mean(self.chance[queries]),
            same_patient_queries=int(eligible.sum()),
            same_patient_hit_rate=_mean(self.hit[eligible]),
        )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
