"""engine.eval.retrieval: precision at k of the similarity index and same-patient hits, on vectors
with known neighbours (a hand-built run, through `evaluate`)."""

from __future__ import annotations

import pytest
from test_evaluate import fake_run, row, write_csv

from engine.eval.evaluate import EvalConfig, evaluate


def test_retrieval_precision_at_k_and_same_patient_hits(tmp_path):
    # name: (label, patient, group, vector); the nearest other image of each (k = 1):
    # a->b, b->a, c->b (label differs), d->f (other patient), e->d, f->d
    spec = {
        "a": (1, "p1", "x", [1, 0, 0, 0]),
        "b": (1, "p1", "x", [1, 0.05, 0, 0]),
        "c": (0, "p2", "x", [0.9, 0.1, 0, 0]),
        "d": (0, "p3", "y", [0, 1, 0, 0]),
        "e": (0, "p3", "y", [0, 0.3, 0, 1]),
        "f": (0, "p4", "y", [0, 1, 0.3, 0]),
        "h": (1, "p5", "y", None),  # screened ok, but its vector never reached the index
    }
    rows = [row(tmp_path / f"{n}.png", prob=0.5) for n in spec]
    vecs = {r["key"]: v[3] for r, v in zip(rows, spec.values(), strict=True) if v[3]}
    fake_run(tmp_path / "out", rows, vecs)
    csv = write_csv(
        tmp_path / "labels.csv",
        [
            {"path": f"{n}.png", "label": v[0], "patient_id": v[1], "g": v[2]}
            for n, v in spec.items()
        ],
    )
    e = evaluate(EvalConfig(out=tmp_path / "out", labels=csv, by="g", bootstrap=0, k=1))
    r = e.retrieval
    assert r is not None and r.neighbours == 1 and r.not_in_index == 1
    assert any("1 evaluated images are missing from index.usearch" in c for c in e.caveats)
    assert r.overall.precision_at_k == pytest.approx(5 / 6)
    # chance: label-1 queries (2/6) expect 1 of 5 others alike, label-0 queries 3 of 5
    assert r.overall.chance_precision_at_k == pytest.approx((2 * 0.2 + 4 * 0.6) / 6)
    assert r.overall.same_patient_queries == 4  # a, b, d, e
    assert r.overall.same_patient_hit_rate == pytest.approx(3 / 4)
    assert r.groups["x"].precision_at_k == pytest.approx(2 / 3)
    assert r.groups["x"].same_patient_hit_rate == 1.0
    assert r.groups["y"].same_patient_hit_rate == 0.5

    wide = evaluate(EvalConfig(out=tmp_path / "out", labels=csv, bootstrap=0, k=10))
    assert wide.retrieval.neighbours == 5  # everything but the query
    assert wide.retrieval.overall.same_patient_hit_rate == 1.0
    assert any("not k = 10" in c for c in wide.caveats)
