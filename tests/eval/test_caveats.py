"""engine.eval.caveats: each check says its sentence exactly when its problem is in the data
(untrained models, mixed thresholds, images left out, one class, few images, shaky intervals,
confounded groups, retrieval gaps), and a clean evaluation gets none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from test_results import score

from engine.eval import caveats as cv
from engine.eval.bootstrap import Interval
from engine.eval.labels import MatchCounts
from engine.eval.metrics import METRICS
from engine.eval.results import EvalConfig
from engine.eval.retrieval import Retrieval, RetrievalScore

CLEAN_COUNTS = MatchCounts(
    labelled=40, found=40, missing=0, ambiguous=0, errors=0, evaluated=40, unlabelled=0
)
RUN = {"model_id": "m", "trained": True, "thresholds": [0.5]}


def config(**kw) -> EvalConfig:
    return EvalConfig(out=Path("/o"), labels=Path("/l.csv"), **({"bootstrap": 100} | kw))


def balanced(n: int = 40, *, name: str = "all", valid: int = 100, pos: int | None = None):
    """n images, `pos` positives (half by default), decisions right but for two, intervals with
    `valid` of 100 resamples."""
    pos = n // 2 if pos is None else pos
    y = np.r_[np.ones(pos, int), np.zeros(n - pos, int)]
    prob = np.where(y == 1, 0.8, 0.2)
    decision = y.astype(bool)
    decision[[0, -1]] = ~decision[[0, -1]]
    intervals = {k: Interval(0.1, 0.9, valid, 100) for k in METRICS}
    return score(y, prob, decision, intervals=intervals, name=name)


def rows(given: list[bool]) -> pl.DataFrame:
    return pl.DataFrame({"patient_given": given})


def retrieval(*, neighbours=5, not_in_index=0, same_patient=4) -> Retrieval:
    s = RetrievalScore(
        queries=40,
        precision_at_k=0.7,
        chance_precision_at_k=0.5,
        same_patient_queries=same_patient,
        same_patient_hit_rate=0.5 if same_patient else float("nan"),
    )
    return Retrieval(k=5, neighbours=neighbours, not_in_index=not_in_index, overall=s, groups={})


def notes(**kw) -> list[str]:
    args = {
        "config": config(),
        "counts": CLEAN_COUNTS,
        "overall": balanced(),
        "groups": {},
        "retrieval": retrieval(),
        "run": RUN,
        "rows": rows([True] * 40),
    } | kw
    return cv.caveats(**args)


def test_a_clean_evaluation_has_no_caveats():
    assert notes() == []


def test_untrained_models_and_mixed_thresholds():
    (untrained,) = notes(run=RUN | {"trained": False})
    assert "The classifier is UNTRAINED" in untrained and "only tests the pipeline" in untrained
    assert notes(run=RUN | {"trained": None}) == []  # unknown is not untrained
    (mixed,) = notes(run=RUN | {"thresholds": [0.4, 0.5]})
    assert "different decision thresholds ([0.4, 0.5])" in mixed


def test_coverage_missing_errors_ambiguous_and_patients():
    counts = MatchCounts(
        labelled=50, found=45, missing=5, ambiguous=2, errors=3, evaluated=42, unlabelled=0
    )
    got = notes(counts=counts, rows=rows([True] * 37 + [False] * 3))
    assert got == [
        "5 of 50 labelled images are not in the run (not screened, or their paths do not "
        "match): the metrics cover the others only.",
        "3 labelled images failed to screen (status 'error') and are excluded; if failures "
        "depend on the class, the metrics are biased.",
        "2 labelled images matched several prediction rows (the same image screened twice, or "
        "two label paths naming one image); one row each was used.",
        "3 images have no patient_id and count as their own patient: if a patient contributes "
        "several images, the confidence intervals are too narrow.",
    ]


def test_bootstrap_zero_is_said():
    overall = balanced()
    overall = type(overall)(
        **{f: getattr(overall, f) for f in overall.__slots__} | {"intervals": {}}
    )
    assert notes(config=config(bootstrap=0), overall=overall) == [
        "--bootstrap 0: no confidence intervals were computed."
    ]


def test_one_class_only_names_the_undefined_metrics():
    y = np.zeros(40, int)
    only_neg = score(y, np.full(40, 0.3), y.astype(bool), intervals={})
    (one,) = [n for n in notes(overall=only_neg) if n.startswith("All")]
    assert one.startswith("All 40 images overall are negative: with no positive case, ")
    # nothing called positive either: PPV and F1 are 0/0 too; specificity stays defined
    listed = "sensitivity (recall), PPV (precision), F1, ROC AUC, PR AUC (average precision)"
    assert f"{listed} are undefined there" in one
    assert "specificity" not in one


def test_no_image_called_positive_leaves_ppv_undefined():
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    never = score(y, np.where(y == 1, 0.8, 0.2), np.zeros(40, bool), intervals={})
    got = [n for n in notes(overall=never) if n.startswith("Undefined")]
    assert got == ["Undefined overall: PPV (precision), because no image was called positive."]


def test_few_images_and_shaky_intervals():
    (few,) = notes(overall=balanced(20))
    assert few == (
        "Only 20 images (10 positive, 10 negative, 20 patients) overall: the intervals are wide."
    )
    # enough images, but a class below FEW_PER_CLASS
    (rare,) = notes(overall=balanced(40, pos=5))
    assert rare.startswith("Only 40 images (5 positive, 35 negative")
    (shaky,) = notes(overall=balanced(valid=80))
    assert shaky.startswith("Many bootstrap resamples overall drew one class only")
    assert "accuracy (80/100)" in shaky and "ece (80/100)" in shaky
    assert notes(overall=balanced(valid=90)) == []  # 90% valid is enough


def test_groups_are_named_and_differing_prevalence_is_flagged():
    groups = {"x": balanced(40, name="x", pos=30), "y": balanced(40, name="y", pos=10)}
    got = notes(config=config(by="site"), groups=groups)
    assert got == [
        "The share of positives differs between site groups (x 75%, y 25%): a model can score "
        "well overall just by telling the site groups apart. Read the per-group metrics."
    ]
    close = {"x": balanced(40, name="x", pos=20), "y": balanced(40, name="y", pos=14)}
    assert notes(config=config(by="site"), groups=close) == []  # 50% vs 35%: within 0.2
    small = {"x": balanced(40, name="x"), "y": balanced(12, name="y")}
    (few,) = notes(config=config(by="site"), groups=small)
    assert few.startswith("Only 12 images") and "in site = y" in few


def test_retrieval_notes():
    (none,) = notes(retrieval=None)
    assert none.startswith("Retrieval quality was not measured: the run has no index.usearch")
    assert notes(retrieval=retrieval(not_in_index=3)) == [
        "3 evaluated images are missing from index.usearch and were left out of the "
        "retrieval figures."
    ]
    assert notes(retrieval=retrieval(neighbours=2)) == [
        "Only 40 images could be searched, so each query has 2 neighbours, not k = 5."
    ]
    assert notes(retrieval=retrieval(same_patient=0)) == [
        "No patient has two or more evaluated images: the same-patient hit rate is undefined."
    ]
