"""engine.eval.segmentation: the entry point that writes the segmenter's Dice with its patient
intervals into a copy of the shipped segmenter's card (3 real mask pairs). Dice itself:
test_dice.py; the card's table: test_card_sections.py.

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

from engine.eval import segmentation as sg
from engine.models import PACKAGED_MODELS, sha256_file

MASKS = DATA / "lung-masks"
LABELS = DATA / "cxr-dev" / "labels.csv"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


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
    pairs = _real_pairs()  # skips, with the reason, where the lung masks are not checked out
    models = _shipped_segmenter_copy(tmp_path)  # shipped without segmenter_splits.csv
    args = ["--models", str(models), "--masks", str(MASKS)]
    assert sg.main(args) == 1
    assert "pass --labels" in capsys.readouterr().err
    index = tmp_path / "index.csv"  # 3 of the 144 pairs: the rebuilt counts cannot match
    with open(index, "w", newline="") as f:
        w = csv.DictWriter(f, ["image_path", "mask_path", "patient_id", "label", "source"])
        w.writeheader()
        for r in pairs:
            w.writerow(
                {k: r[k] for k in ("patient_id", "label", "source")}
                | {k: str(MASKS / r[k]) for k in ("image_path", "mask_path")}
            )
    assert sg.main(["--models", str(models), "--masks", str(index), "--labels", str(LABELS)]) == 1
    assert "counts" in capsys.readouterr().err
