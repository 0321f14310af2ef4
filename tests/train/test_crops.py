"""engine.train.crops: the labelled sets as served crops with their part of the split: the
segmenter directory is checked (its manifest, the patients it trained on), every set goes
through the crop cache, undecodable images are listed, a part with one class is refused; and
the splits.csv a classifier directory records, read back by (set, path).

Synthetic labelled sets (`synthetic_sets`, shared with test_generalisation.py) and the tiny
untrained models, under tmp_path.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_data import labelled_set, write_csv

pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from engine.errors import ConfigError, ModelError  # noqa: E402
from engine.models import load_manifest  # noqa: E402
from engine.train.classifier_config import ClassifierTrainConfig  # noqa: E402
from engine.train.crops import (  # noqa: E402
    check_segmenter_split,
    config_of,
    load_data,
    load_segmenter,
    recorded_splits,
    split_keys,
)
from engine.train.datasets import LabelSet, load_sets  # noqa: E402

BAD = "images/a5_0.png"  # the primary set's image that is not an image


def synthetic_sets(root: Path) -> tuple[LabelSet, LabelSet]:
    """A primary set of 20 patients (labels alternating, source site-a; one file is not an
    image) and a second set of 10 patients of source site-b."""
    primary = labelled_set(root / "primary", 20, source="site-a", prefix="a")
    (primary.parent / BAD).write_bytes(b"not an image")
    second = labelled_set(root / "second", 10, source="site-b", prefix="b", seed=1)
    return LabelSet(primary, primary.parent), LabelSet(second, second.parent)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[LabelSet, LabelSet]:
    return synthetic_sets(tmp_path_factory.mktemp("crops-sets"))


def _config(sets, segmenter: Path, out: Path, **kw) -> ClassifierTrainConfig:
    base = dict(
        labels=sets[0].labels,
        images=sets[0].images,
        extra=(sets[1],),
        segmenter=segmenter,
        out=out,
        arch="tiny-classifier",
        holdout=0.3,
        threads=1,
    )
    return ClassifierTrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def loaded(sets, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops-out")
    cfg = _config(sets, tiny_models.segmenter.directory, out)
    data, skipped = load_data(cfg, tiny_models.segmenter)
    return cfg, data, skipped


def test_load_segmenter_needs_a_manifest_and_warns_when_untrained(tmp_path, tiny_models, capsys):
    with pytest.raises(ModelError, match="no segmenter.json: --segmenter must be a models dir"):
        load_segmenter(tmp_path)
    seg = load_segmenter(tiny_models.segmenter.directory)
    assert seg.role == "segmenter" and seg.sha256 == tiny_models.segmenter.sha256
    assert "UNTRAINED segmenter" in capsys.readouterr().err


def test_segmenter_training_patients_must_not_be_validated_or_tested_on(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    check_segmenter_split(tmp_path, {"p1": "val"}, labels, 3)  # no file: a warning only
    assert "cannot check that the segmenter never saw test patients" in capsys.readouterr().err
    write_csv(
        tmp_path / "segmenter_splits.csv",
        [
            {"image_path": "a.png", "patient_id": "p1", "split": "train"},
            {"image_path": "b.png", "patient_id": "p2", "split": "train"},
            {"image_path": "c.png", "patient_id": "p3", "split": "test"},
        ],
    )
    check_segmenter_split(tmp_path, {"p1": "train", "p2": "train", "p3": "val"}, labels, 3)
    with pytest.raises(
        ConfigError, match=r"2 patient\(s\) the segmenter trained on .* \(e.g. p1\)"
    ) as e:
        check_segmenter_split(tmp_path, {"p1": "test", "p2": "val", "p3": "train"}, labels, 3)
    assert f"--labels {labels} --seed 3" in str(e.value)


def test_every_set_as_served_crops_with_its_part(loaded, sets, tiny_models):
    cfg, data, skipped = loaded
    bad_path = str(sets[0].images / BAD)
    assert list(skipped) == [bad_path] and "not a PNG" in skipped[bad_path]
    sel = load_sets(cfg.sets, cfg.seed, holdout=cfg.holdout)
    keep = [str(im.path) != bad_path for im in sel.images]
    assert [im.rel for im in data.images] == [
        im.rel for im, k in zip(sel.images, keep, strict=True) if k
    ]
    np.testing.assert_array_equal(data.split, sel.split[keep])
    np.testing.assert_array_equal(data.dataset, sel.dataset[keep])
    assert data.labels.tolist() == [im.label for im in data.images]
    assert data.sources.tolist() == [im.source for im in data.images]
    n = len(data.images)
    assert n == 29 and data.work.shape == (n, 128, 128) and data.work.dtype == np.uint8
    assert data.inputs.shape == (n, 1, 64, 64) and data.masks.shape == (n, 64, 64)
    assert data.boxes.shape == (n, 4) and data.lung_fraction.shape == (n,)
    assert not isinstance(data.inputs, np.memmap)  # read into memory from the cache
    # the default cache folder is OUT/crop-cache, one entry per set
    entries = sorted(p.name for p in (cfg.out / "crop-cache").iterdir())
    assert [e.rsplit("-", 1)[0] for e in entries] == ["primary", "second"]


def test_the_cache_is_reused_and_the_split_follows_the_seed(loaded, sets, tiny_models, monkeypatch):
    cfg, data, _ = loaded
    from engine.train import cache

    monkeypatch.setattr(cache, "decode_all", lambda *a, **k: pytest.fail("decoded again"))
    again, _ = load_data(cfg, tiny_models.segmenter)
    np.testing.assert_array_equal(again.inputs, data.inputs)
    other, _ = load_data(replace(cfg, seed=5), tiny_models.segmenter)
    np.testing.assert_array_equal(other.inputs, data.inputs)  # the same crops ...
    assert (other.split != data.split).any()  # ... in other parts


def test_a_part_with_one_class_is_refused(tmp_path, tiny_models):
    root = tmp_path / "neg"
    labels = labelled_set(root, 6, prefix="n")
    rows = [{"path": f"images/n{i}_0.png", "label": 0, "patient_id": f"n{i}"} for i in range(6)]
    write_csv(labels, rows)
    cfg = ClassifierTrainConfig(
        labels=labels,
        images=root,
        segmenter=tiny_models.segmenter.directory,
        out=tmp_path / "out",
        cache=tmp_path / "cache",
        arch="tiny-classifier",
        threads=1,
    )
    with pytest.raises(ConfigError, match="the train part has images of one class only"):
        load_data(cfg, tiny_models.segmenter)


def test_config_of_rebuilds_a_trained_directory_s_split(tiny_models, tmp_path):
    m = replace(tiny_models.classifier, card={"splits": {"seed": 7}})
    cfg = config_of(m, tmp_path, Path("l.csv"), Path("i"), 3, calibration_images=5)
    assert (cfg.seed, cfg.arch, cfg.threads) == (7, "tiny-classifier", 3)
    assert cfg.segmenter == cfg.out == tmp_path and cfg.calibration_images == 5
    assert config_of(replace(m, card={}), tmp_path, Path("l"), Path("i"), 1).seed == 0


def test_recorded_splits_are_keyed_by_set_and_path(tmp_path, loaded):
    with pytest.raises(ConfigError, match="splits.csv: missing; it records the split"):
        recorded_splits(tmp_path / "splits.csv")
    old = write_csv(
        tmp_path / "old.csv",
        [
            {"path": "images/a0_0.png", "split": "train"},
            {"path": "images/a1_0.png", "split": "val"},
        ],
    )
    assert recorded_splits(old) == {
        ("0", "images/a0_0.png"): "train",
        ("0", "images/a1_0.png"): "val",
    }
    new = write_csv(
        tmp_path / "new.csv",
        [
            {"path": "x.png", "split": "train", "dataset": "0"},
            {"path": "x.png", "split": "holdout", "dataset": "1"},
        ],
    )
    assert recorded_splits(new) == {("0", "x.png"): "train", ("1", "x.png"): "holdout"}
    _, data, _ = loaded
    keys = split_keys(data)
    assert len(keys) == len(data.images) and len(set(keys)) == len(keys)
    assert keys[0] == ("0", data.images[0].rel) and keys[-1] == ("1", data.images[-1].rel)


def test_segmenter_split_is_checked_when_loading(loaded, sets, tiny_models, tmp_path):
    cfg, data, _ = loaded
    seg_dir = tmp_path / "seg"
    seg_dir.mkdir()
    for name in ("segmenter.json", tiny_models.segmenter.onnx):
        shutil.copy(tiny_models.segmenter.directory / name, seg_dir / name)
    val = next(im.patient_id for im, s in zip(data.images, data.split, strict=True) if s == "val")
    write_csv(seg_dir / "segmenter_splits.csv", [{"patient_id": val, "split": "train"}])
    bad = replace(cfg, segmenter=seg_dir, cache=tmp_path / "cache")
    with pytest.raises(ConfigError, match=f"e.g. {val}"):
        load_data(bad, load_manifest(seg_dir / "segmenter.json"))
