"""Shortcut-learning check (engine/eval/shortcut.py) on 16 real CXRs with tiny untrained models:
the masking touches the lung pixels and only them, the "as is" path gives the probabilities of
`cxr screen` itself, the JSON holds the three AUCs, and --split selects its images.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, REPO, require_data

from engine.config import ScreenConfig
from engine.errors import ConfigError
from engine.eval.metrics import roc_auc
from engine.eval.shortcut import (
    VARIANTS,
    MaskingScreener,
    ShortcutConfig,
    fill_region,
    read_items,
    run_check,
    source_groups,
)
from engine.io import parquet
from engine.io.reader import prepare
from engine.models import load_models
from engine.runner import screen
from engine.stages.segment import upsample_nearest

DEV = DATA / "cxr-dev"


@pytest.fixture(scope="module")
def dev_set(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """labels.csv with 16 real rows: 6 ieee8023 positives, 5 ieee8023 negatives, 5 NIH."""
    require_data()
    with open(DEV / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ieee = [r for r in rows if r["source"] == "ieee8023"]
    pick = (
        [r for r in ieee if r["label"] == "1"][:6]
        + [r for r in ieee if r["label"] == "0"][:5]
        + [r for r in rows if r["source"] == "nih-chestxray14"][:5]
    )
    path = tmp_path_factory.mktemp("shortcut") / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)
    return path, pick


def _config(models: Path, labels: Path, **kw) -> ShortcutConfig:
    return ShortcutConfig(
        models=models, labels=labels, images=DEV, backend="onnxruntime", threads=2, **kw
    )


@pytest.fixture(scope="module")
def result(tiny_models_dir, dev_set):
    return run_check(_config(tiny_models_dir, dev_set[0], bootstrap=50))


def test_masking_replaces_the_lung_pixels_and_only_them(tiny_models_dir, dev_set):
    paths = [str(DEV / r["path"]) for r in dev_set[1][:8]]
    models = load_models(tiny_models_dir)
    screener = MaskingScreener(models, backend="onnxruntime", batch_size=8, threads=2)
    try:
        samples = [prepare(it, max_pixels=1 << 40, min_side=1).sample for it in read_items(paths)]
        pre = screener.preprocess(samples)  # type: ignore[arg-type]
        preds = screener.infer(pre)
        # the crop + classify of the masked variants is the engine's own on an unmasked image
        np.testing.assert_allclose(screener.classify_work(pre.work, preds.boxes), preds.prob)
    finally:
        screener.close()
    side = pre.work.shape[1]
    factor = side // preds.lung_mask.shape[1]
    lung = upsample_nearest(preds.lung_mask, side)
    assert factor * preds.lung_mask.shape[1] == side  # tiny: 64 -> 128, nearest = repeat
    np.testing.assert_array_equal(lung, preds.lung_mask.repeat(factor, 1).repeat(factor, 2))
    assert 0.05 < lung.mean() < 0.95, "the test needs masks with lung and non-lung pixels"
    for region in (lung, ~lung):  # lungs_masked, lungs_only
        filled = fill_region(pre.work, region)
        for img, out, reg in zip(pre.work, filled, region, strict=True):
            np.testing.assert_array_equal(out[~reg], img[~reg])  # untouched outside
            assert np.all(out[reg] == np.median(img[~reg]))  # one value inside
            assert np.any(out[reg] != img[reg])  # and it really changed them


def test_as_is_matches_cxr_screen(tiny_models_dir, dev_set, result, tmp_path):
    paths = tuple(DEV / r["path"] for r in dev_set[1])
    config = ScreenConfig(
        inputs=paths,
        out=tmp_path / "out",
        models=tiny_models_dir,
        backend="onnxruntime",
        batch_size=5,  # other batches than the check's 16
        threads=2,
        progress=False,
    )
    screen(config)
    rows = parquet.read_predictions(tmp_path / "out", ["source", "status", "prob"])
    assert rows["status"].to_list() == ["ok"] * len(paths)
    screened = {Path(s).name: p for s, p in zip(rows["source"], rows["prob"], strict=True)}
    mine = {Path(p).name: v for p, v in zip(result.rows["path"], result.rows["as_is"], strict=True)}
    assert mine.keys() == screened.keys()
    for name, prob in screened.items():
        assert mine[name] == pytest.approx(prob, abs=1e-5), name


def test_auc_values_and_source_rule(result, dev_set):
    rows = result.rows
    y = rows["label"].to_numpy()
    for v in VARIANTS:
        assert result.overall.values[v] == pytest.approx(roc_auc(y, rows[v].to_numpy()))
    groups = {name: (text, idx) for name, text, idx in source_groups(y, rows["source"].to_numpy())}
    assert groups["ieee8023"][0] == "within source" and groups["ieee8023"][1].size == 11
    text, idx = groups["nih-chestxray14"]  # one class: its 5 negatives vs the 6 positives
    assert text == "vs positives elsewhere" and idx.size == 11 and y[idx].sum() == 6
    assert result.counts == {"selected": 16, "scored": 16, "failed": 0, "empty_lung_masks": 0}


def test_json_command_has_the_three_aucs(tiny_models_dir, dev_set):
    proc = subprocess.run(
        [sys.executable, "-m", "engine.eval.shortcut", "--models", str(tiny_models_dir),
         "--labels", str(dev_set[0]), "--images", str(DEV), "--backend", "onnxruntime",
         "--bootstrap", "20", "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for group in (doc["overall"], *doc["sources"].values()):
        for v in VARIANTS:
            auc = group["auc"][v]
            assert 0.0 <= auc["value"] <= 1.0 and auc["ci95"]["resamples"] == 20
    assert {"source_detector", "source_prior"} <= doc["overall"]["auc"].keys()
    assert set(doc["sources"]) == {"ieee8023", "nih-chestxray14"}
    assert doc["source_positive_share"]["nih-chestxray14"]["label_prevalence"] == 0.0


def test_split_selects_its_images(tiny_models_dir, dev_set, tmp_path):
    labels, rows = dev_set
    splits = tmp_path / "splits.csv"
    test = {r["path"] for i, r in enumerate(rows) if i % 2}
    with open(splits, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split"])
        w.writerows([r["path"], "test" if r["path"] in test else "train"] for r in rows)
    r = run_check(_config(tiny_models_dir, labels, splits=splits, split="test", bootstrap=0))
    assert set(r.rows["path"]) == test and r.counts["selected"] == len(test)
    assert r.overall.intervals == {}
    with pytest.raises(ConfigError, match="no split 'val'"):
        run_check(_config(tiny_models_dir, labels, splits=splits, split="val"))
    with pytest.raises(ConfigError, match="needs --split"):
        _config(tiny_models_dir, labels, splits=splits)
