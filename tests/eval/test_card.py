"""engine.eval.card: the model card rendered from the tiny models' manifests and hand-made
evaluation JSONs (which sections appear when, the numbers they carry, the footer), the
segmenter section replaced in place, --unseen runs, and `python -m engine.eval.card`'s usage
errors. The card's pieces have their own file (test_card_sections.py); a whole release and its
card are in test_release.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from conftest import plain
from test_compare import _loso

from engine.errors import ConfigError
from engine.eval import card as card_md
from engine.eval.card import main, render, replace_segmenter_section, unseen_runs
from engine.eval.compare import parse_compare
from engine.models import PACKAGED_MODELS, init_models, load_manifest, manifest_path, save_manifest


def group(accuracy: float, images: int = 10) -> dict:
    return {
        "metrics": {"accuracy": {"value": accuracy}, "roc_auc": {"value": None}},
        "confusion": {"tp": 3, "fp": 1, "tn": 4, "fn": 2},
        "images": images,
        "patients": 7,
    }


EV = {
    "overall": group(0.8),
    "groups": {"nih": group(0.7, 4)},
    "caveats": ["first caveat", "second caveat"],
    "retrieval": {
        "k": 5,
        "overall": {
            "precision_at_k": 0.7,
            "chance_precision_at_k": 0.5,
            "same_patient_hit_rate": 0.25,
            "same_patient_queries": 4,
        },
    },
}


@pytest.fixture
def models(tiny_models_dir, tmp_path):
    """A copy of the tiny models (a test may change its card)."""
    return shutil.copytree(tiny_models_dir, tmp_path / "models")


def set_card(directory, card: dict) -> None:
    clf = load_manifest(manifest_path(directory, "classifier"))
    save_manifest(replace(clf, card=card), directory)


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


# ---------------------------------------------------------------------------------------------
# render


def test_render_header_sections_and_numbers(models):
    text = render(models, EV, None, None)
    lines = text.splitlines()
    assert lines[0] == "# Model card: cxr-engine default models"
    header = next(line for line in lines if line.startswith("Model id"))
    assert "Classifier: tiny-classifier (fp32)" in header and "Decision threshold 0.5000" in header
    assert "segmenter: tiny-unet (fp32)" in header
    titles = [line[3:] for line in lines if line.startswith("## ")]
    assert titles == [
        "Data and splits",
        "Segmenter",
        "Classifier on the held-out test patients (FP32 reference)",
        "Similar cases (embedding index)",
        "Known limits",
    ]
    classifier = section(text, titles[2])
    assert "ours from 10 test images" in classifier
    assert "| metric | all | nih | paper (4 hospitals) |" in classifier
    assert "| accuracy | 0.800 | 0.700 | 0.897 |" in classifier
    similar = section(text, "Similar cases (embedding index)")
    assert "precision@5 of label agreement 0.700 (chance 0.500)" in similar
    assert "in the top 5: 0.250 of 4 queries" in similar
    limits = section(text, "Known limits")
    assert "Tiny test set (10 images)" in limits
    assert limits.rstrip().endswith("- first caveat\n- second caveat")
    assert "Every number above comes from code" not in text  # no command, no footer
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_render_optional_sections_appear_with_their_inputs(models):
    shipped = {"overall": group(0.75), "groups": {}}
    sc = {"overall": {"auc": {}}, "verdict": "no shortcut found"}
    ev = {k: v for k, v in EV.items() if k != "retrieval"}
    text = render(models, ev, shipped, sc, command="cxr eval card --models M", evidence="docs/ev")
    assert "## Similar cases" not in text  # no retrieval in the evaluation
    assert "| accuracy | 0.750 | 0.897 |" in section(
        text, "The same with the shipped fp32 classifier"
    )
    assert "Verdict of the check: no shortcut found" in section(
        text, "Does it look at the lungs? (shortcut check, test patients)"
    )
    footer = text.split("\n---\n", 1)[1]
    assert "Its inputs (the evaluation and shortcut JSONs) are kept in `docs/ev`." in footer
    assert footer.rstrip().endswith("```\ncxr eval card --models M\n```")
    without_evidence = render(models, ev, None, None, command="cxr eval card")
    assert "this card was made by the command below.\n" in without_evidence


def test_render_reads_the_classifier_card(models):
    par = {"images": 4, "same_decision": 1.0, "roc_auc_diff": 0.0}
    set_card(
        models,
        {
            "training": {"initialisation": "ImageNet weights", "seconds": 600},
            "splits": {"counts": {"train": {"images": 70, "patients": 30}}},
            "data": {"used": 90},
            "w8": {"parity": par},
            "fp16": {"parity": par},
        },
    )
    text = render(models, EV, None, None)
    assert "initialisation: ImageNet weights;" in text
    assert "Trained on 70 training images in 10 min, initialisation: ImageNet weights" in text
    # parity lines: the shipped precision first (here fp32: none recorded), then fp16, w8
    parity = [line for line in text.splitlines() if "(4 of 4)" in line]
    assert len(parity) == 2 and parity[0].startswith("The fp16") and "w8" in parity[1]


def test_render_refuses_unseen_and_baseline_that_name_no_comparison(models):
    with pytest.raises(ConfigError, match=r"--unseen other=\.\.\.: no --compare named 'other'"):
        render(models, EV, None, None, unseen={"other": []})
    with pytest.raises(ConfigError, match="--baseline 'eff': no --compare of that name"):
        render(models, EV, None, None, baseline="eff")


def test_render_side_by_side_and_comparison(models, tmp_path):
    other = init_models(tmp_path / "other", size="tiny", seed=1).classifier.directory
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps(EV))
    comparison = parse_compare(f"eff={ev},{other}")
    text = render(models, EV, None, None, [comparison], unseen={"release": []})
    side = section(text, "Side by side")
    assert "| | this release (tiny-classifier) | eff | paper |" in side
    assert "## Comparison: eff" in text


# ---------------------------------------------------------------------------------------------
# the segmenter section in place


def test_replace_segmenter_section_keeps_the_rest(models):
    text = render(models, EV, None, None)
    seg = section(text, "Segmenter")
    stale = text.replace(seg, "an old table\n")
    assert replace_segmenter_section(stale, models) == text
    # also when it is the last section
    last = text.split("\n## Segmenter\n", 1)[0] + "\n## Segmenter\n\nold\n"
    again = replace_segmenter_section(last, models)
    assert (
        again.split("\n## Segmenter\n", 1)[1]
        == "\n".join(card_md.segmenter_section(models))[len("## Segmenter\n") :]
    )


def test_the_segmenter_section_states_the_box_rule_and_the_int8_parity(models):
    from conftest import add_int8_variant

    from engine.models import Variant

    assert "Lung box" not in "\n".join(card_md.segmenter_section(models))  # not set: not said
    add_int8_variant(models, "segmenter", "segmenter.int8.onnx")
    seg = load_manifest(manifest_path(models, "segmenter"))
    parity = {
        "images": 288, "box_iou_min": 0.9856, "box_iou_mean": 0.9989, "box_iou_below_bar": 0,
        "mask_images": 52, "dice_fp32": 0.9454, "dice_int8": 0.9453, "dice_drop": 0.0001,
        "bar": "box IoU >= 0.95 on every image, Dice drop <= 0.005",
    }  # fmt: skip
    v = Variant(onnx=seg.variants["int8"].onnx, sha256=seg.variants["int8"].sha256, parity=parity)
    save_manifest(replace(seg, box_min_region=0.0005, variants={"int8": v}), models)
    text = "\n".join(card_md.segmenter_section(models))
    assert "fewer than 0.0005 of the mask's pixels does not count" in text
    assert "lung-box IoU min 0.9856, mean 0.9989 over 288 labelled images (0 below 0.95)" in text
    assert "0.9454 -> 0.9453. Meets the parity bar (box IoU >= 0.95 on every image" in text
    assert text.endswith(": yes.")


def test_the_card_says_when_the_classifier_is_served_test_time_crops(models):
    text = render(models, EV, None, None)
    assert "crops, its lung box moved" not in text  # one crop: not said
    clf = load_manifest(manifest_path(models, "classifier"))
    save_manifest(replace(clf, tta=((1.05, 0.95, 0.02, 0.0), (0.95, 1.0, -0.02, 0.01))), models)
    text = render(models, EV, None, None)
    assert "scored as the mean logit (and embedding) over 2 crops, its lung box moved" in text
    assert "/tta2@" in text  # the model id names them


def test_replace_segmenter_section_refuses_another_models_card(models, tmp_path):
    other = init_models(tmp_path / "other", size="tiny", seed=1).classifier.directory
    text = render(other, EV, None, None)
    with pytest.raises(ConfigError, match="the card is not of the models in .*render it whole"):
        replace_segmenter_section(text, models)
    no_section = render(models, EV, None, None).replace("## Segmenter", "## Something")
    with pytest.raises(ConfigError, match="no '## Segmenter' section"):
        replace_segmenter_section(no_section, models)


def test_shipped_model_card_segmenter_section_is_rendered_from_the_manifest():
    md = PACKAGED_MODELS / "MODEL_CARD.md"
    if not md.is_file():
        pytest.skip("no shipped model card")
    text = md.read_text()
    assert card_md.replace_segmenter_section(text, PACKAGED_MODELS) == text
    assert "| test | 27 (12) | 0.947 [" in text


# ---------------------------------------------------------------------------------------------
# --unseen and the command


def test_unseen_runs_group_the_runs_by_name(tmp_path):
    runs = unseen_runs(
        [
            f"release={_loso(tmp_path / 'a', 0.9)}",
            f"eff={_loso(tmp_path / 'b', 0.8)}",
            f"release={_loso(tmp_path / 'c', 0.7)}",
        ]  # fmt: skip
    )
    assert list(runs) == ["release", "eff"]
    assert [u["groups"][0]["value"] for u in runs["release"]] == [0.9, 0.7]
    assert unseen_runs([]) == {}


def test_card_command_writes_the_card_and_records_its_command(models, tmp_path, capsys):
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps(EV))
    out = tmp_path / "CARD.md"
    assert main(["--models", str(models), "--eval", str(ev), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert text == render(models, EV, None, None, command=text.split("```\n")[-2].strip())
    assert f"python -m engine.eval.card --models {models} --out {out} --eval {ev}" in text
    # --segmenter-only rewrites the section of that card, nothing else
    assert main(["--models", str(models), "--segmenter-only", "--out", str(out)]) == 0
    assert f"updated the segmenter section of {out}" in capsys.readouterr().out
    assert out.read_text() == text


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ([], "--eval is required (or --segmenter-only)"),
        (["--segmenter-only", "--eval", "ev.json"], "--segmenter-only takes no --eval"),
        (["--segmenter-only"], "CARD.md"),  # no card to update
        (["--eval", "nope.json"], "nope.json"),
        (["--eval", "bad.json"], "--eval bad.json: not JSON (Expecting property name"),
        (["--eval", "ev.json", "--shortcut", "bad.json"], "--shortcut bad.json: not JSON"),
        (["--eval", "ev.json", "--compare", "justaname"], "--compare"),
    ],
)
def test_card_command_usage_errors_exit_2_with_the_reason(
    models, tmp_path, monkeypatch, capsys, extra, words
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ev.json").write_text(json.dumps(EV))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main(["--models", str(models), "--out", str(tmp_path / "CARD.md"), *extra])
    assert exc.value.code == 2
    assert words in plain(capsys.readouterr().err)
    assert not (tmp_path / "CARD.md").exists()
