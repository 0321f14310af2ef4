"""cxr train classifier at scale: several labelled sets (engine/train/datasets.py), the crop
cache (cache.py, crops.py), the context swap in a training batch (classifier_fit.py), resume
equivalence, and the measurements of issue 14 on real crops: downscale agreement
(engine/eval/resolution.py) and a models directory's generalisation (generalisation.py).
Sampling, augmentation, bf16 and the source probe have their own test files, and so do
these modules' units on synthetic data (test_datasets, test_cache, test_crops,
test_classifier_fit, test_generalisation).

Real images from ../shared/data/cxr-dev, the shipped segmenter, the tiny classifier; all
output under tmp_path.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")

from conftest import DATA, REPO  # noqa: E402

from engine.errors import ConfigError  # noqa: E402

DEV = DATA / "cxr-dev"
SHIPPED = REPO / "engine" / "shipped_models"


def _rows() -> list[dict[str, str]]:
    if not (DEV / "labels.csv").is_file():
        pytest.skip(f"real data not found at {DEV}: check out shared/ beside the repository")
    with open(DEV / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict[str, str]], drop: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if k not in drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _pick(rows, source, label, n, skip=frozenset()):
    out, seen = [], set(skip)
    for r in rows:
        if r["source"] == source and r["label"] == label and r["patient_id"] not in seen:
            seen.add(r["patient_id"])
            out.append(r)
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """A primary set of 16 dev images (8 positive, 4+4 negative, distinct patients) and a
    second set of 8 others whose CSV has no source column and paths relative to images/."""
    rows = _rows()
    primary = _pick(rows, "ieee8023", "1", 8)
    primary += _pick(rows, "ieee8023", "0", 4) + _pick(rows, "nih-chestxray14", "0", 4)
    used = {r["patient_id"] for r in primary}
    second = _pick(rows, "ieee8023", "1", 4, used) + _pick(rows, "nih-chestxray14", "0", 4, used)
    second = [{**r, "path": r["path"].removeprefix("images/")} for r in second]
    tmp = tmp_path_factory.mktemp("sets")
    return {
        "primary": _write(tmp / "dev" / "labels.csv", primary),
        "second": _write(tmp / "extra-set" / "labels.csv", second, drop=("source",)),
        "primary_rows": primary,  # type: ignore[dict-item]
    }


def _config(sets, tmp: Path, **kw):
    """test_classifier_fit's short fit of the tiny classifier (`fit_config`) on the two sets
    (a 0.3 holdout of the second) with the shipped segmenter; output and crop cache in `tmp`."""
    from test_classifier_fit import fit_config

    from engine.train.datasets import LabelSet

    base = dict(
        labels=sets["primary"],
        images=DEV,
        extra=(LabelSet(sets["second"], DEV / "images"),),
        segmenter=SHIPPED,
        out=tmp / "out",
        cache=tmp / "cache",
        holdout=0.3,
    )
    return fit_config(**(base | kw))


@pytest.fixture(scope="module")
def loaded(sets, tmp_path_factory):
    from engine.train.classifier import load_data, load_segmenter

    tmp = tmp_path_factory.mktemp("loaded")
    cfg = _config(sets, tmp)
    data, skipped = load_data(cfg, load_segmenter(SHIPPED))
    return cfg, data, skipped


# --- several labelled sets -----------------------------------------------------------------


def test_sets_keep_their_roots_sources_and_parts(loaded):
    cfg, data, skipped = loaded
    assert skipped == {} and len(data.images) == 24
    first, second = data.dataset == 0, data.dataset == 1
    assert first.sum() == 16 and second.sum() == 8
    # each set's images resolve under its own root
    assert all(im.path.is_relative_to(DEV) for im in data.images)
    rels = [(im.rel, int(k)) for im, k in zip(data.images, data.dataset, strict=True)]
    assert all(rel.startswith("images/") for rel, k in rels if k == 0)
    assert not any(rel.startswith("images/") for rel, k in rels if k == 1)
    # the primary set's sources come from its column; the other's from its folder name
    assert set(data.sources[first]) == {"ieee8023", "nih-chestxray14"}
    assert set(data.sources[second]) == {"extra-set"}
    # val/test only in the primary set; the second set is training data plus a holdout slice
    assert set(data.split[first]) <= {"train", "val", "test"} and "val" in data.split[first]
    assert set(data.split[second]) <= {"train", "holdout"}


def test_holdout_is_seeded_and_per_patient(sets, tmp_path):
    from engine.train.datasets import LabelSet, load_sets

    both = (LabelSet(sets["primary"], DEV), LabelSet(sets["second"], DEV / "images"))
    a = load_sets(both, seed=0, holdout=0.5)
    b = load_sets(both, seed=0, holdout=0.5)
    c = load_sets(both, seed=1, holdout=0.5)
    assert (a.split == b.split).all()
    assert 0 < (a.split == "holdout").sum() < 8
    assert (a.split != c.split).any() or (a.split == "holdout").sum() in (0, 8)


def test_duplicate_image_across_sets_is_refused(sets, tmp_path):
    from engine.train.datasets import LabelSet, load_sets

    again = _write(tmp_path / "again" / "labels.csv", sets["primary_rows"][:2])
    with pytest.raises(ConfigError, match="listed twice"):
        load_sets((LabelSet(sets["primary"], DEV), LabelSet(again, DEV)), seed=0)


def test_excluded_group_is_never_trained_on(sets):
    from engine.train.datasets import LabelSet, load_sets, parse_group

    both = (LabelSet(sets["primary"], DEV), LabelSet(sets["second"], DEV / "images"))
    sel = load_sets(both, seed=0, exclude=[parse_group("nih-chestxray14:0")])
    nih = np.array([im.source == "nih-chestxray14" for im in sel.images])
    assert not ((sel.split == "train") & nih).any()
    assert ((sel.split == "unseen") & nih).any()
    with pytest.raises(ConfigError, match="SOURCE:LABEL"):
        parse_group("nih-chestxray14")
    with pytest.raises(ConfigError, match="no image has source"):
        load_sets(both, seed=0, exclude=[("nowhere", 0)])


# --- crop cache ----------------------------------------------------------------------------


def test_cache_is_reused_and_resumes_to_the_same_arrays(sets, loaded, tmp_path, monkeypatch):
    from engine.train import cache as cache_mod
    from engine.train.classifier import load_segmenter
    from engine.train.datasets import LabelSet, load_sets
    from engine.train.specs import classifier_manifest

    cfg, data, _ = loaded
    seg, clf = load_segmenter(SHIPPED), classifier_manifest("tiny-classifier", trained=False)
    label_set = LabelSet(sets["primary"], DEV)
    images = load_sets((label_set,), seed=0).images
    built = cache_mod.open_or_build(cfg.cache, label_set, images, seg, clf, threads=1)
    np.testing.assert_array_equal(built.inputs, data.inputs[data.dataset == 0])
    # the lung mask is the segmenter's, thresholded as `cxr screen` does, and it holds the box
    assert built.masks.shape == (len(images), *seg.preprocess.size)
    assert set(np.unique(built.masks)) <= {0, 1}
    share = built.masks.reshape(len(images), -1).mean(axis=1)
    np.testing.assert_allclose(share, built.fraction, atol=1e-6)

    # a complete entry is opened, not rebuilt
    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "decode_all", no_decode)
        again = cache_mod.open_or_build(cfg.cache, label_set, images, seg, clf, threads=1)
    np.testing.assert_array_equal(again.work, built.work)

    # a build killed after its first chunk resumes there and ends with the same arrays
    monkeypatch.setattr(cache_mod, "CHUNK", 5)
    real = cache_mod.decode_all
    calls = {"n": 0}

    def dies_after_one_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "decode_all", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.open_or_build(tmp_path, label_set, images, seg, clf, threads=1)
    monkeypatch.setattr(cache_mod, "decode_all", real)
    resumed = cache_mod.open_or_build(tmp_path, label_set, images, seg, clf, threads=1)
    np.testing.assert_array_equal(resumed.work, built.work)
    np.testing.assert_array_equal(resumed.inputs, built.inputs)
    np.testing.assert_array_equal(resumed.boxes, built.boxes)
    np.testing.assert_array_equal(resumed.masks, built.masks)

    # other labels -> another entry
    other = _write(tmp_path / "dev" / "labels.csv", sets["primary_rows"][:12])
    assert cache_mod.entry_key(LabelSet(other, DEV), seg, clf) != cache_mod.entry_key(
        label_set, seg, clf
    )


# --- the context swap in a training batch -----------------------------------------------------


def test_context_swap_in_a_training_batch(loaded):
    from engine.train.augment import ContextSwap, CropAugment
    from engine.train.classifier_fit import train_batch
    from engine.train.specs import classifier_manifest

    _, data, _ = loaded
    clf = classifier_manifest("tiny-classifier", trained=False)
    idx = np.arange(4)

    def batch(swap):
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        return train_batch(data, idx, clf, CropAugment.off(), rng, gen, None, swap).numpy()

    plain = batch(None)
    # off: the served crops, up to the cache's uint8 rounding (0.5/255, over the std)
    np.testing.assert_allclose(plain, data.inputs[idx], atol=0.02)
    swapped = batch(ContextSwap(p=1.0))
    assert not np.allclose(swapped, plain)
    np.testing.assert_array_equal(batch(ContextSwap(p=0.0)), plain)


# --- resume ----------------------------------------------------------------------------------


def test_killed_and_resumed_run_equals_the_unbroken_one(loaded, tmp_path, monkeypatch):
    """A run killed after its epoch-2 checkpoint and resumed with --resume ends with the same
    weights, optimiser state and history as the run that was never interrupted."""
    from dataclasses import replace

    from test_classifier_fit import CLF, assert_same_fit, kill_and_resume

    from engine.train import classifier_fit

    cfg, data, _ = loaded
    unbroken, resumed, b = kill_and_resume(cfg, data, CLF, tmp_path, monkeypatch, epoch=2)
    assert_same_fit(unbroken, resumed)
    # other options cannot resume this checkpoint
    with pytest.raises(ConfigError, match="other options"):
        classifier_fit.fit(replace(b, resume=True, lr=1e-2), data, CLF, "fp32")


# --- measurements ---------------------------------------------------------------------------


def test_downscale_agreement_on_a_few_images(sets, tmp_path):
    from engine.eval.resolution import downscale, downscale_agreement

    rows = sets["primary_rows"][:3] + sets["primary_rows"][-3:]
    paths = [DEV / r["path"] for r in rows]
    labels = np.array([int(r["label"]) for r in rows])
    small = tmp_path / "s.png"
    downscale(paths[0], small, 224)
    from PIL import Image

    with Image.open(small) as im, Image.open(paths[0]) as big:
        assert max(im.size) == 224 and max(big.size) > 224
    r = downscale_agreement(None, paths, labels, side=224, threads=1)
    assert r["images"] == 6 and r["failed"] == 0
    assert 0.0 <= r["same_decision"] <= 1.0 and r["mean_abs_prob_diff"] >= 0.0
    assert r["roc_auc_full"] is not None and r["roc_auc_downscaled"] is not None
    # an image already at or below the side is left as it is: same decision on itself
    same = downscale_agreement(None, [small] * 2, np.array([0, 1]), side=224, threads=1)
    assert same["same_decision"] == 1.0 and same["mean_abs_prob_diff"] < 1e-6


def test_generalisation_of_a_models_directory_from_its_splits(sets, tmp_path):
    """`cxr train generalisation`: a classifier trained elsewhere (here tiny untrained models
    with a made-up splits.csv) gets the source probe on every image its splits.csv does not
    list as `train` and the downscale agreement on the first set's test images, in its card."""
    import json

    from typer.testing import CliRunner

    from engine.cli import app
    from engine.models import init_models, load_manifest, manifest_path
    from engine.train.datasets import LabelSet, load_sets

    models = tmp_path / "models"
    init_models(models, size="tiny", seed=0)
    sel = load_sets(
        (LabelSet(sets["primary"], DEV), LabelSet(sets["second"], DEV / "images")), 0, holdout=0.05
    )
    trained = {
        im.rel for im, s, k in zip(sel.images, sel.split, sel.dataset, strict=True) if k == 0
        and s == "train"
    }  # fmt: skip
    with open(models / "splits.csv", "w", newline="") as f:  # the old format: no dataset column
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "source", "split"])
        for im, s, k in zip(sel.images, sel.split, sel.dataset, strict=True):
            if k == 0:
                w.writerow([im.rel, im.patient_id, im.label, im.source, s])
    n_test = int(((sel.split == "test") & (sel.dataset == 0)).sum())
    out = tmp_path / "g.json"
    argv = [
        "train", "generalisation", "--models", str(models),
        "--labels", str(sets["primary"]), "--labels", str(sets["second"]),
        "--images", str(DEV), "--images", str(DEV / "images"),
        "--cache", str(tmp_path / "cache"), "--write", "--json", str(out), "--threads", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    probe = figures["source_probe"]
    held = sum(sum(v["images"].values()) for k, v in probe.items() if k.startswith("label="))
    # negatives come from three sources (ieee8023, NIH, the second set), positives from two
    assert set(probe["label=0"]["images"]) == {"ieee8023", "nih-chestxray14", "extra-set"}
    assert held == 24 - len(trained)
    assert figures["downscale_agreement"]["images"] == n_test
    groups = figures["held_out_by_group"]
    assert sum(g["images"] for g in groups.values()) == held
    assert all(0.0 <= g.get("specificity", g.get("sensitivity")) <= 1.0 for g in groups.values())
    assert "specificity" in groups["nih-chestxray14:0"] and "sensitivity" in groups["ieee8023:1"]
    card = load_manifest(manifest_path(models, "classifier")).card
    assert card["source_probe"] == probe and card["downscale_agreement"]["images"] == n_test
    # a models directory without its splits.csv is refused with a message, not a traceback
    (models / "splits.csv").unlink()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and "splits.csv" in result.output
