"""Patient-wise train/val/test split, shared by the segmenter and the classifier trainers.

Why one function for both: the segmenter's training patients must never be the classifier's
test patients, or the test crops come from masks the segmenter has memorised. Both trainers
therefore assign patients with ``split_patients`` over the SAME patient table (the classifier's
labels CSV), with the same seed.

Rule (deterministic, stratified): patients are grouped into strata (patient label, and source
where known: the data's labels are confounded with the source, so every part gets its share of
each source); inside a stratum they are ordered by sha256(f"{seed}:{patient_id}") and cut at
the cumulative fractions. A stratum of n >= 3 patients puts at least one patient in each part.
A patient's label is 1 if any of its images is positive.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)  # the published pipeline's 70/15/15


def patient_hash(patient_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


def hash_unit(patient_id: str, seed: int) -> float:
    """A uniform number in [0, 1) drawn from (seed, patient_id) alone."""
    return int(patient_hash(patient_id, seed)[:15], 16) / 16**15


def _cut_points(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    n_train = round(n * fractions[0])
    n_val = round(n * (fractions[0] + fractions[1])) - n_train
    if n >= 3:  # keep val and test non-empty: early stopping and the report need them
        n_val = max(n_val, 1)
        n_train = min(n_train, n - n_val - 1)
    return n_train, n_train + n_val


def split_patients(
    strata: Mapping[str, str],
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> dict[str, str]:
    """patient_id -> "train" | "val" | "test", stratified by ``strata[patient_id]``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    groups: dict[str, list[str]] = defaultdict(list)
    for pid, stratum in strata.items():
        groups[stratum].append(pid)
    out: dict[str, str] = {}
    for stratum in sorted(groups):
        ordered = sorted(groups[stratum], key=lambda p: (patient_hash(p, seed), p))
        a, b = _cut_points(len(ordered), fractions)
        for i, pid in enumerate(ordered):
            out[pid] = SPLITS[0] if i < a else SPLITS[1] if i < b else SPLITS[2]
    return out


def fallback_split(
    patient_id: str, seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> str:
    """For a patient outside the shared table: a split from its hash alone (not stratified)."""
    u = hash_unit(patient_id, seed)
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def patient_strata(rows: Iterable[Mapping[str, object]]) -> dict[str, str]:
    """Stratum per patient from rows with patient_id, label and (optional) source."""
    labels: dict[str, int] = {}
    sources: dict[str, str] = {}
    for row in rows:
        pid = str(row["patient_id"]).strip()
        labels[pid] = max(labels.get(pid, 0), int(row.get("label", 0) or 0))  # type: ignore[call-overload]
        sources.setdefault(pid, str(row.get("source") or ""))
    return {pid: f"label={labels[pid]}|source={sources[pid]}" for pid in labels}
