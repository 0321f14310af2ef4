"""engine.eval.results: EvalConfig's checks, and GroupScore / Evaluation as JSON (nan and empty
bins as null, intervals or their absence, the images root), on hand-made scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.errors import ConfigError
from engine.eval import metrics as m
from engine.eval.bootstrap import METHOD, Interval
from engine.eval.labels import MatchCounts
from engine.eval.results import EvalConfig, Evaluation, GroupScore


def score(y, prob, decision, *, intervals=None, name="all") -> GroupScore:
    y, prob, decision = np.asarray(y), np.asarray(prob, float), np.asarray(decision, bool)
    return GroupScore(
        name=name,
        images=len(y),
        patients=len(y),
        positives=int(y.sum()),
        negatives=int((1 - y).sum()),
        confusion=m.confusion(y, decision),
        values=m.all_metrics(y, prob, decision),
        intervals=intervals or {},
        calibration=m.reliability(y, prob),
    )


# ---------------------------------------------------------------------------------------------
# EvalConfig


def test_eval_config_defaults(tmp_path):
    c = EvalConfig(out=tmp_path / "o", labels=tmp_path / "l.csv")
    assert (c.images, c.by, c.report, c.seed, c.bootstrap, c.k) == (None, None, None, 0, 2000, 5)
    assert EvalConfig(out=tmp_path, labels=tmp_path, bootstrap=0, k=1, by="source").by == "source"
    with pytest.raises(TypeError):
        EvalConfig(tmp_path, tmp_path)  # keyword-only


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"bootstrap": -1}, "--bootstrap must be 0 (no intervals) or more, not -1"),
        ({"k": 0}, "-k must be at least 1, not 0"),
        ({"seed": -3}, "--seed must be 0 or more, not -3"),
        ({"by": "path"}, "--by path: choose a column that groups images"),
        ({"by": "label"}, "--by label: choose a column that groups images"),
    ],
)
def test_eval_config_refuses_bad_options_naming_them(tmp_path, options, words):
    with pytest.raises(ConfigError) as err:
        EvalConfig(out=tmp_path, labels=tmp_path / "l.csv", **options)
    assert words in str(err.value)


# ---------------------------------------------------------------------------------------------
# GroupScore


def test_group_score_json_counts_confusion_and_every_metric():
    s = score([1, 1, 0, 0, 0], [0.9, 0.3, 0.6, 0.2, 0.1], [1, 0, 1, 0, 0])
    j = s.to_json()
    assert (j["images"], j["patients"], j["positives"], j["negatives"]) == (5, 5, 2, 3)
    assert j["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1}
    assert list(j["metrics"]) == list(m.METRICS)
    assert j["metrics"]["accuracy"] == {"value": 0.6, "ci95": None}
    assert j["metrics"]["sensitivity"]["value"] == 0.5
    assert j["metrics"]["roc_auc"]["value"] == pytest.approx(5 / 6)


def test_group_score_json_undefined_metrics_and_empty_bins_are_null():
    s = score([0, 0, 0], [0.05, 0.15, 0.95], [0, 0, 1])  # no positive: sensitivity, AUC nan
    j = s.to_json()
    assert j["metrics"]["sensitivity"]["value"] is None
    assert j["metrics"]["roc_auc"]["value"] is None
    assert j["metrics"]["specificity"]["value"] == pytest.approx(2 / 3)
    cal = j["calibration"]
    assert cal["binning"] == m.ECE_BINNING
    assert len(cal["bins"]) == m.ECE_BINS
    first, empty, last = cal["bins"][0], cal["bins"][5], cal["bins"][9]
    assert first == {"low": 0.0, "high": 0.1, "images": 1, "mean_prob": 0.05, "observed": 0.0}
    assert empty["images"] == 0 and empty["mean_prob"] is None and empty["observed"] is None
    assert last["high"] == 1.0 and last["images"] == 1
    assert cal["ece"] == pytest.approx((0.05 + 0.15 + 0.95) / 3)
    json.dumps(j, allow_nan=False)  # strict JSON: no NaN anywhere


def _with_intervals():
    """A score with an accuracy interval and a roc_auc one that no resample made valid."""
    ci = Interval(low=0.4, high=0.9, valid=180, resamples=200)
    none_valid = Interval(low=float("nan"), high=float("nan"), valid=0, resamples=200)
    s = score(
        [1, 0, 1, 0],
        [0.8, 0.4, 0.6, 0.1],
        [1, 0, 1, 0],
        intervals={"accuracy": ci, "roc_auc": none_valid},
    )
    return s, ci


def test_group_score_json_carries_intervals_where_computed():
    s, ci = _with_intervals()
    metrics = s.to_json()["metrics"]
    assert metrics["accuracy"]["ci95"] == {
        "low": 0.4,
        "high": 0.9,
        "valid_resamples": 180,
        "resamples": 200,
    }
    assert metrics["roc_auc"]["ci95"] == {
        "low": None,
        "high": None,
        "valid_resamples": 0,
        "resamples": 200,
    }
    assert metrics["f1"]["ci95"] is None


def test_empty_calibration_has_a_null_ece():
    s = score([1], [0.5], [1])
    s = GroupScore(
        **{f: getattr(s, f) for f in GroupScore.__slots__} | {"calibration": m.reliability([], [])}
    )
    cal = s.to_json()["calibration"]
    assert cal["ece"] is None and all(b["images"] == 0 for b in cal["bins"])


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluation(config: EvalConfig) -> Evaluation:
    overall = score([1, 0], [0.7, 0.2], [1, 0])
    counts = MatchCounts(
        labelled=3, found=2, missing=1, ambiguous=0, errors=0, evaluated=2, unlabelled=4
    )
    return Evaluation(
        config=config,
        run={"model_id": "m1", "trained": True, "thresholds": [0.5]},
        counts=counts,
        overall=overall,
        groups={"x": overall},
        retrieval=None,
        caveats=["a caveat"],
        rows=pl.DataFrame({"label": [1, 0]}),
    )


def test_evaluation_json_says_what_was_asked_and_found(tmp_path):
    labels = tmp_path / "sets" / "labels.csv"
    e = evaluation(EvalConfig(out=tmp_path / "out", labels=labels, by="site", bootstrap=50, k=3))
    j = e.to_json()
    assert j["out"] == str(tmp_path / "out") and j["labels"] == str(labels)
    assert j["images_root"] == str(labels.parent)  # default: the CSV's folder
    assert j["run"] == {"model_id": "m1", "trained": True, "thresholds": [0.5]}
    assert j["counts"]["missing"] == 1 and j["counts"]["unlabelled"] == 4
    assert j["settings"] == {
        "seed": 0,
        "bootstrap_resamples": 50,
        "confidence_interval": METHOD,
        "ece_binning": m.ECE_BINNING,
        "k": 3,
        "by": "site",
    }
    assert j["overall"] == e.overall.to_json() and j["groups"] == {"x": e.overall.to_json()}
    assert j["retrieval"] is None and j["caveats"] == ["a caveat"]
    assert e.report_html is None
    json.loads(json.dumps(j, allow_nan=False))


def test_evaluation_json_images_root_as_given(tmp_path):
    e = evaluation(EvalConfig(out=tmp_path, labels=tmp_path / "l.csv", images=Path("/data/x")))
    assert e.to_json()["images_root"] == "/data/x"


def test_group_score_shown_gives_the_text_and_the_interval_to_show():
    s, ci = _with_intervals()
    assert s.shown("accuracy") == ("1.000", ci)
    assert s.shown("roc_auc") == ("1.000", None)  # no valid resample: no interval shown
    assert s.shown("specificity") == ("1.000", None)  # none drawn
    undefined = score([0, 0], [0.1, 0.2], [0, 0])
    assert undefined.shown("sensitivity") == ("undefined", None)
