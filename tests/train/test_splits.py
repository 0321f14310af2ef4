"""engine.train.splits: the patient split is deterministic, seed-dependent, independent of the
order of the table and stratified 70/15/15; on the real labels each patient is in one part."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict

import pytest
from conftest import DATA

from engine.train.splits import SPLITS, split_patients


def _synthetic_strata() -> dict[str, str]:
    strata = {f"ieee:{i}": "label=1|source=ieee" for i in range(80)}
    strata |= {f"ieee:{i}": "label=0|source=ieee" for i in range(80, 120)}
    strata |= {f"nih:{i}": "label=0|source=nih" for i in range(70)}
    return strata


def test_split_is_deterministic_and_seed_dependent():
    strata = _synthetic_strata()
    a, b = split_patients(strata, seed=0), split_patients(strata, seed=0)
    assert a == b
    assert set(a) == set(strata) and set(a.values()) == set(SPLITS)
    assert split_patients(strata, seed=1) != a
    # A patient's part does not depend on the order the table lists patients in.
    assert split_patients(dict(reversed(list(strata.items()))), seed=0) == a


def test_split_is_stratified_70_15_15():
    strata = _synthetic_strata()
    split = split_patients(strata, seed=3)
    per = defaultdict(Counter)
    for pid, part in split.items():
        per[strata[pid]][part] += 1
    for stratum, counts in per.items():
        n = sum(counts.values())
        for part, share in zip(SPLITS, (0.70, 0.15, 0.15), strict=True):
            assert abs(counts[part] - share * n) <= 1, (stratum, dict(counts))


def test_real_labels_keep_each_patient_in_one_part():
    labels = DATA / "cxr-dev" / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"real data not found at {labels}: check out shared/ beside the repository")
    from engine.train.data import labels_split

    split = labels_split(labels, seed=0)
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["patient_id"] for r in rows} == set(split)
    parts = Counter(split.values())
    assert parts["train"] > parts["val"] > 0 and parts["test"] > 0
