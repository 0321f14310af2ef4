"""engine.eval.card_sections: the model card's pieces (the segmenter's Dice table, the parity
line, the metrics and shortcut tables, the data lines). The shipped card's segmenter section,
re-rendered from its manifest, is in test_card.py."""

from __future__ import annotations

from engine.eval import card_sections

# ---------------------------------------------------------------------------------------------
# the model card's segmenter table


def test_card_table_shows_the_interval_or_says_there_is_none():
    d = {"images": 27, "patients": 12, "mean": 0.9473, "median": 0.945, "min": 0.909}
    ci = {"low": 0.9419, "high": 0.953, "valid_resamples": 2000, "resamples": 2000}
    with_ci = "\n".join(
        card_sections._dice_lines({"metrics": {"dice": {"test": d | {"ci95": ci}}}})
    )
    assert "| test | 27 (12) | 0.947 [0.942, 0.953] | 0.945 | 0.909 |" in with_ci
    assert "2000 resamples" in with_ci
    old = {"metrics": {"dice": {"test": d}}, "splits": {"counts": {"test": {"patients": 12}}}}
    assert "| 0.947 | 0.945 |" in "\n".join(card_sections._dice_lines(old))
    assert "No interval" in "\n".join(card_sections._dice_lines(old))


def test_parity_line_gives_counts_so_a_miss_by_one_image_reads_as_one():
    from engine.eval.card import parity_line

    par = {
        "images": 288,
        "same_decision": 285 / 288,
        "held_out_images": 90,
        "same_decision_held_out": 89 / 90,
        "roc_auc_diff": -0.002,
    }
    line = parity_line("int8", par, shipped=False)
    assert (
        "same decision 0.9896 (285 of 288; on the validation and test images alone, which " in line
    )
    assert "neither calibration nor tuning saw: 89 of 90)" in line
    assert line.endswith(
        "Meets the parity bar (same decision >= 0.99 and on every held-out image, |ROC AUC "
        "diff| <= 0.01, embedding cosine mean >= 0.99): no."
    )
    assert "is not shipped" in line
    beside = parity_line("int8", par, shipped=False, beside=True)
    assert beside.startswith("The INT8 QDQ export ships beside it: `--precision auto` runs it")
    w8 = parity_line("w8", {"images": 4, "same_decision": 1.0}, shipped=False)
    assert "TensorRT's fp16/fp32 plans build from it" in w8 and "(4 of 4)" in w8


def test_metrics_table_has_a_column_per_group_and_the_paper():
    group = {
        "metrics": {"accuracy": {"value": 0.8}, "roc_auc": {"value": None}},
        "confusion": {"tp": 3, "fp": 1, "tn": 4, "fn": 2},
        "images": 10,
        "patients": 7,
    }
    lines = card_sections.metrics_table({"overall": group, "groups": {"nih": group}})
    assert lines[0] == "| metric | all | nih | paper (4 hospitals) |"
    assert lines[1] == "|---|---|---|---|"
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert set(rows) >= set(card_sections.METRICS) | {"TP/FP/TN/FN", "images (patients)"}
    assert rows["accuracy"] == "| accuracy | 0.800 | 0.800 | 0.897 |"
    assert rows["roc_auc"] == "| roc_auc | undefined | undefined | 0.950 |"
    assert "| 3/1/4/2 | 3/1/4/2 |" in rows["TP/FP/TN/FN"]
    assert "| 10 (7) | 10 (7) |" in rows["images (patients)"]


def test_shortcut_lines_list_what_was_scored_and_the_verdict():
    auc = {"as_is": {"value": 0.91, "ci95": {"low": 0.85, "high": 0.95}}, "lungs_masked": None}
    lines = card_sections.shortcut_lines({"overall": {"auc": auc}, "verdict": "shortcut"})
    assert lines[:2] == ["| scored on | ROC AUC [95% CI] |", "|---|---|"]
    assert lines[2:4] == [
        "| the lung crop as the engine sees it | 0.910 [0.850, 0.950] |",
        "| the same crop with the lungs masked out | undefined |",
    ]
    assert lines[-1] == "Verdict of the check: shortcut"
    assert card_sections.shortcut_lines({"overall": {"auc": {}}})[-1].endswith("n/a")


def test_data_counts_from_the_card_or_its_splits():
    splits = {
        "counts": {"train": {"images": 70, "patients": 30}, "test": {"images": 15, "patients": 6}}
    }
    assert card_sections.data_counts({"splits": splits}) == (85, 36)
    assert card_sections.data_counts({"splits": splits, "data": {"used": 90}}) == (90, 36)
    assert card_sections.data_counts({}) == ("?", "?")
    assert card_sections.num(None, ".3f") == "undefined" and card_sections.num(0.5, ".2f") == "0.50"


def test_data_lines_name_every_labelled_set_and_the_holdout():
    one = card_sections.data_lines({}, 85, 36)
    assert len(one) == 1 and "85 images, 36 patients" in one[0]
    sets = {
        "sets": [{"name": "dev"}, {"name": "nih"}, {"name": "rsna"}],
        "holdout": {"fraction": 0.1},
    }
    (many,) = card_sections.data_lines({"data": sets}, 900, 400)
    assert "3 labelled sets, 900 images. The first, `dev`," in many
    assert "`nih`, `rsna` are training data" in many and "slice of 0.1 of each" in many


def test_a_comparison_served_test_time_crops_says_so():
    from engine.eval.card_sections import _crops_note

    assert _crops_note(None) == "" and _crops_note({"threshold": 0.5}) == ""
    note = _crops_note({"test_time_crops": {"crops": 4, "seed": 0}})
    assert "the mean logit over 4 test-time crops (manifest `tta`)" in note
