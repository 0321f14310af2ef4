"""engine.eval.compare: the side-by-side table, leave-one-source-out figures and the ship rule,
on made-up evaluation JSONs with known answers (no models run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.eval.compare import (
    Column,
    parse_unseen,
    ship_rule,
    ship_rule_lines,
    side_by_side,
    unseen_of,
    wilson,
)


def _m(value, low=None, high=None):
    return {"value": value, "ci95": {"low": low, "high": high}}


def _eval(auc: float, ieee_auc: float, nih_spec: float) -> dict:
    return {
        "overall": {
            "images": 43,
            "patients": 28,
            "metrics": {"roc_auc": _m(auc, auc - 0.1, auc + 0.05), "sensitivity": _m(0.8)},
        },
        "groups": {
            "ieee8023": {"images": 33, "patients": 18, "metrics": {"roc_auc": _m(ieee_auc)}},
            "nih-chestxray14": {
                "images": 10,
                "patients": 10,
                "metrics": {"roc_auc": _m(None), "specificity": _m(nih_spec)},
            },
        },
    }


def _shortcut(masked: float) -> dict:
    return {"overall": {"auc": {"lungs_masked": _m(masked, masked - 0.2, masked + 0.1)}}}


def _loso(directory: Path, spec: float, n_neg: int = 597) -> Path:
    """A classifier.json as `cxr train classifier --exclude-from-training nih-chestxray14:0`
    writes it (the parts the comparison reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    card = {
        "threshold": 0.6,
        "data": {"excluded_from_training": ["nih-chestxray14:0"]},
        "metrics": {
            "unseen": {
                "all": {"n": n_neg, "n_pos": 0, "n_neg": n_neg, "specificity": spec},
                "source=nih-chestxray14": {
                    "n": n_neg,
                    "n_pos": 0,
                    "n_neg": n_neg,
                    "roc_auc": None,
                    "specificity": spec,
                    "sensitivity": None,
                },
            }
        },
    }
    (directory / "classifier.json").write_text(
        json.dumps({"architecture": "resnet50", "card": card})
    )
    return directory


def test_wilson_interval_known_values():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) is None
    low, high = wilson(0, 20)
    assert low == 0.0 and 0.15 < high < 0.17


def test_unseen_of_reads_the_loso_run_and_its_saved_copy(tmp_path):
    u = unseen_of(_loso(tmp_path / "loso", 0.9))
    assert u["excluded"] == ["nih-chestxray14:0"]
    (g,) = u["groups"]
    assert g["group"] == "nih-chestxray14:0" and g["metric"] == "specificity"
    assert g["value"] == 0.9 and g["images"] == 597
    assert g["ci95"][0] < 0.9 < g["ci95"][1]
    saved = tmp_path / "unseen-release-0.json"
    saved.write_text(json.dumps(u))
    assert unseen_of(saved) == json.loads(json.dumps(u))


def test_unseen_of_refuses_a_run_without_exclusions(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "classifier.json").write_text(json.dumps({"card": {"data": {}, "metrics": {}}}))
    with pytest.raises(ConfigError, match="excluded no group"):
        unseen_of(d)
    with pytest.raises(ConfigError, match="not a trained classifier"):
        unseen_of(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an unseen"):
        unseen_of(bad)


def test_parse_unseen():
    assert parse_unseen("release=../x") == ("release", Path("../x"))
    with pytest.raises(ConfigError, match="NAME=LOSO_TRAINED_DIR"):
        parse_unseen("release")


def _columns(tmp_path, new=(0.9, 0.86, 0.95, 0.6, 0.92), old=(0.8, 0.74, 0.9, 0.68, 0.85)):
    cols = []
    for name, (auc, ieee, nih, masked, unseen_spec) in (("new", new), ("old", old)):
        u = unseen_of(_loso(tmp_path / name, unseen_spec))
        card = {
            "downscale_agreement": {"same_decision": 0.95, "roc_auc_full": auc},
            "held_out_by_group": {"radiography-db:0": {"images": 100, "specificity": nih}},
        }
        cols.append(Column(name, _eval(auc, ieee, nih), _shortcut(masked), card, (u,)))
    return cols


def test_side_by_side_has_one_row_per_figure_and_a_column_per_model(tmp_path):
    lines = side_by_side(_columns(tmp_path))
    assert lines[0] == "| | new | old | paper |"
    text = "\n".join(lines)
    assert "| test ROC AUC | 0.900 [0.800, 0.950] | 0.800 [0.700, 0.850] | 0.950 |" in text
    assert "| ieee8023: ROC AUC | 0.860 | 0.740 |  |" in text
    assert "| nih-chestxray14: spec. | 0.950 | 0.900 |  |" in text
    assert "shortcut ROC AUC, lungs masked out | 0.600 [0.400, 0.700]" in text
    unseen = next(ln for ln in lines if ln.startswith("| unseen nih-chestxray14 (label 0)"))
    assert "0.920 [" in unseen and "of 597" in unseen and "0.850 [" in unseen
    assert (
        "| not trained on, radiography-db (label 0): specificity | 0.950 of 100 | 0.900 of 100 |"
        in text
    )
    # never measured for any column: no row (e.g. the source probe here)
    assert "source probe" not in text
    assert "nih-chestxray14: ROC AUC" not in text  # undefined for every column


def test_ship_rule_met_and_each_way_to_fail(tmp_path):
    cols = _columns(tmp_path / "a")
    checks = ship_rule(*cols)
    assert [ok for _, ok, _ in checks] == [True, True, True, True]
    assert "**met**" in ship_rule_lines(*cols)[0]
    # worse on ieee8023, worse unseen specificity, masked-out further from 0.5
    cols = _columns(tmp_path / "b", new=(0.9, 0.70, 0.95, 0.3, 0.80))
    checks = dict((label, ok) for label, ok, _ in ship_rule(*cols))
    assert checks["internal test ROC AUC higher"] is True
    assert checks["ieee8023 test ROC AUC higher"] is False
    assert checks["unseen-source specificity no worse"] is False
    assert checks["lungs-masked-out ROC AUC no further from 0.5"] is False
    assert "**not met**" in ship_rule_lines(*cols)[0]


def test_ship_rule_cannot_tell_without_a_shared_loso_run(tmp_path):
    new, old = _columns(tmp_path)
    old = Column(old.name, old.eval, old.shortcut, old.card, ())
    checks = dict((label, ok) for label, ok, _ in ship_rule(new, old))
    assert checks["unseen-source specificity no worse"] is None
    assert "**not met**" in ship_rule_lines(new, old)[0]


def test_training_summary_of_a_compared_classifier():
    from engine.eval.card_sections import training_summary

    card = {
        "data": {
            "sets": [{"name": "cxr-dev"}, {"name": "cxr-train"}],
            "train_counts": {"ieee8023:1": 92, "radiography-db:0": 2000},
            "excluded_from_training": ["nih-chestxray14:0"],
        },
        "training": {"sampling": "source-balanced, balance 1.0", "best_epoch": 2, "epochs_run": 12},
    }
    (line,) = [x for x in training_summary(card) if x]
    assert line.startswith("Training: trained on cxr-dev + cxr-train (2092 training images)")
    assert "sampling source-balanced, balance 1.0" in line and "best epoch 2 of 12" in line
    assert "never trained on nih-chestxray14:0" in line
    assert training_summary(None) == []


def test_training_images_of_one_set_or_several():
    from engine.eval.compare import _training_images

    assert _training_images({"data": {"train_counts": {"a:0": 3, "b:1": 4}}}) == 7
    assert _training_images({"splits": {"counts": {"train": {"images": 198}}}}) == 198
    assert _training_images({}) is None
