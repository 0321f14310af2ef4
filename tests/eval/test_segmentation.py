"""Segmenter Dice with patient-bootstrap intervals: known answers, seeding, the entry point that
writes them into a copy of the shipped segmenter's card (3 real mask pairs), and the card table.

Everything is written under tmp_path; the data folder and engine/shipped_models are only read.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from engine.eval import card as card_md
from engine.eval import card_sections
from engine.eval import dice as dice_mod
from engine.eval import segmentation as sg
from engine.models import PACKAGED_MODELS, sha256_file
from engine.train.metrics import dice_per_image

MASKS = DATA / "lung-masks"
LABELS = DATA / "cxr-dev" / "labels.csv"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# dice_summary: known answers


def test_perfect_masks_give_dice_one_with_interval_one():
    truth = (_rng().random((6, 1, 16, 16)) > 0.5).astype(np.float32)
    truth[5] = 0  # empty mask predicted empty: Dice 1 by definition
    dice = dice_per_image(truth.copy(), truth)
    s = dice_mod.dice_summary(dice, ["a", "a", "b", "c", "c", "c"], rng=_rng(), resamples=500)
    assert (s["images"], s["patients"]) == (6, 3)
    assert s["mean"] == s["min"] == s["median"] == 1.0
    assert s["ci95"] == {"low": 1.0, "high": 1.0, "valid_resamples": 500, "resamples": 500}


def test_one_patient_gives_a_degenerate_interval_at_the_mean():
    """Every resample draws the one patient, so every resample mean is the mean itself: the
    interval is a point. Resampling images instead would give a real interval here."""
    dice = np.array([0.80, 0.90, 0.95, 0.70])
    s = dice_mod.dice_summary(dice, ["p"] * 4, rng=_rng(), resamples=300)
    assert s["patients"] == 1
    assert s["ci95"]["low"] == pytest.approx(dice.mean(), abs=1e-12)
    assert s["ci95"]["high"] == pytest.approx(dice.mean(), abs=1e-12)
    by_image = dice_mod.dice_summary(dice, list("wxyz"), rng=_rng(), resamples=300)["ci95"]
    assert by_image["low"] < dice.mean() < by_image["high"]


def test_two_patients_interval_spans_the_patient_means():
    """Two patients: a quarter of the resamples draw each patient twice, so the 2.5% and 97.5%
    percentiles are exactly the two patients' own mean Dice."""
    dice = np.array([0.6, 0.8, 0.9])  # patient a: 0.7, patient b: 0.9
    ci = dice_mod.dice_summary(dice, ["a", "a", "b"], rng=_rng(), resamples=2000)["ci95"]
    assert ci["low"] == pytest.approx(0.7) and ci["high"] == pytest.approx(0.9)


def test_bootstrap_is_reproducible_with_a_seed_and_each_split_has_its_own_stream():
    rng = _rng(1)
    per_split = {
        name: (rng.uniform(0.8, 1.0, n), rng.integers(0, n // 2, n).tolist())
        for name, n in (("train", 40), ("val", 12), ("test", 14))
    }
    a = dice_mod.dice_summaries(per_split, seed=5, resamples=400)
    assert a == dice_mod.dice_summaries(per_split, seed=5, resamples=400)
    assert (
        a["test"]["ci95"]
        != dice_mod.dice_summaries(per_split, seed=6, resamples=400)["test"]["ci95"]
    )
    alone = dice_mod.dice_summaries({"test": per_split["test"]}, seed=5, resamples=400)
    assert alone["test"] == a["test"]
    for s in a.values():
        assert s["ci95"]["low"] < s["mean"] < s["ci95"]["high"]
        assert s["ci95"]["valid_resamples"] == 400
    assert "0 resamples" in dice_mod.dice_definition(seed=0, resamples=0)
    assert dice_mod.dice_summary(np.ones(3), list("abc"), rng=_rng(), resamples=0)["ci95"] is None


# ---------------------------------------------------------------------------------------------
# the entry point on a copy of the shipped segmenter


def _real_pairs() -> list[dict[str, str]]:
    """Two images of one patient and one image of another, from the real mask index."""
    if not (MASKS / "index.csv").is_file():
        pytest.skip(f"no lung masks at {MASKS}")
    with open(MASKS / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    two = next(v for v in by_patient.values() if len(v) >= 2)[:2]
    one = next(v for v in by_patient.values() if v[0]["patient_id"] != two[0]["patient_id"])[:1]
    return [*two, *one]


def _shipped_segmenter_copy(tmp_path: Path) -> Path:
    if not (PACKAGED_MODELS / "segmenter.json").is_file():
        pytest.skip("no shipped segmenter")
    out = tmp_path / "models"
    out.mkdir()
    for name in ("segmenter.json", "segmenter.onnx"):
        shutil.copy(PACKAGED_MODELS / name, out / name)
    return out


def test_entry_point_writes_patient_intervals_into_the_card_copy(tmp_path, capsys):
    models = _shipped_segmenter_copy(tmp_path)
    pairs = _real_pairs()
    with open(models / "segmenter_splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "mask_path", "patient_id", "split"])
        for r, split in zip(pairs, ("test", "test", "val"), strict=True):
            w.writerow([f"/elsewhere/{r['image_path']}", r["mask_path"], r["patient_id"], split])
    before = json.loads((models / "segmenter.json").read_text())
    args = ["--models", str(models), "--masks", str(MASKS), "--resamples", "300", "--write"]

    # The card's Dice is over the whole training split, not these 3 pairs: refuse to overwrite.
    assert sg.main(args) == 1
    assert "does not reproduce" in capsys.readouterr().err
    assert json.loads((models / "segmenter.json").read_text()) == before

    assert sg.main([*args, "--replace"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "test" in printed
    after = json.loads((models / "segmenter.json").read_text())
    dice = after["card"]["metrics"]["dice"]
    assert sorted(dice) == ["test", "val"]
    test, val = dice["test"], dice["val"]
    assert (test["images"], test["patients"], val["images"], val["patients"]) == (2, 1, 1, 1)
    for d in (test, val):  # one patient each: the interval is the mean itself
        assert 0.5 < d["min"] <= d["mean"] <= 1.0
        assert d["ci95"]["low"] == pytest.approx(d["mean"]) == d["ci95"]["high"]
        assert d["ci95"]["resamples"] == 300
    assert "resampling its patients" in after["card"]["metrics"]["definition"]
    assert "300 resamples, seed 0" in after["card"]["metrics"]["definition"]
    # Only the card's metrics changed; the ONNX and its sha256 did not.
    for doc in (before, after):
        del doc["card"]["metrics"]
    assert after == before
    assert sha256_file(models / "segmenter.onnx") == before["sha256"]

    assert sg.main(args[:-1]) == 0  # recomputing now matches what was written
    assert "matches the card" in capsys.readouterr().out


def test_missing_split_file_needs_labels_and_must_rebuild_the_card_counts(tmp_path, capsys):
    models = _shipped_segmenter_copy(tmp_path)  # shipped without segmenter_splits.csv
    args = ["--models", str(models), "--masks", str(MASKS)]
    assert sg.main(args) == 1
    assert "pass --labels" in capsys.readouterr().err
    index = tmp_path / "index.csv"  # 3 of the 144 pairs: the rebuilt counts cannot match
    with open(index, "w", newline="") as f:
        w = csv.DictWriter(f, ["image_path", "mask_path", "patient_id", "label", "source"])
        w.writeheader()
        for r in _real_pairs():
            w.writerow(
                {k: r[k] for k in ("patient_id", "label", "source")}
                | {k: str(MASKS / r[k]) for k in ("image_path", "mask_path")}
            )
    assert sg.main(["--models", str(models), "--masks", str(index), "--labels", str(LABELS)]) == 1
    assert "counts" in capsys.readouterr().err


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


def test_shipped_model_card_segmenter_section_is_rendered_from_the_manifest():
    md = PACKAGED_MODELS / "MODEL_CARD.md"
    if not md.is_file():
        pytest.skip("no shipped model card")
    text = md.read_text()
    assert card_md.replace_segmenter_section(text, PACKAGED_MODELS) == text
    assert "| test | 27 (12) | 0.947 [" in text


# ---------------------------------------------------------------------------------------------
# the `python -m` entry points are `cxr` commands


@pytest.mark.parametrize(
    ("words", "module"),
    [
        (["eval", "release"], "engine.eval.release"),
        (["eval", "card"], "engine.eval.card"),
        (["eval", "segmentation"], "engine.eval.segmentation"),
        (["train", "parity"], "engine.train.parity"),
    ],
)
def test_python_m_entry_points_run_the_cxr_commands(words, module, capsys):
    import importlib

    import typer

    from engine.cli import app

    group = typer.main.get_command(app)
    mounted = group.commands[words[0]].commands[words[1]]  # type: ignore[attr-defined]
    script = typer.Typer(add_completion=False)
    script.command()(getattr(importlib.import_module(module), f"{words[1]}_command"))
    alone = typer.main.get_command(script)
    assert [p.opts for p in alone.params] == [p.opts for p in mounted.params]
    assert importlib.import_module(module).main(["--help"]) == 0
    assert f"Usage: python -m {module} [OPTIONS]" in " ".join(capsys.readouterr().out.split())
