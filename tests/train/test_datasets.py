"""engine.train.datasets: several labelled sets in one run: the first set's patient split, a
seeded holdout slice per source of the others, groups excluded from training, duplicate images
refused, and the pairing of --labels with --images.

Synthetic sets (small PNGs and their labels CSVs) under tmp_path; the same on real images:
tests/train/test_train_multiset.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data import labelled_set, write_csv

from engine.errors import ConfigError
from engine.train.data import labels_split
from engine.train.datasets import (
    HOLDOUT,
    UNSEEN,
    LabelSet,
    load_sets,
    pair_sets,
    parse_group,
)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> tuple[LabelSet, LabelSet]:
    """cxr-dev-like primary set (20 patients of source site-a) and a second set of 30 patients,
    its CSV without a source column, under a folder named extra-set."""
    tmp = tmp_path_factory.mktemp("sets")
    primary = labelled_set(tmp / "primary", 20, source="site-a", prefix="a")
    second = labelled_set(tmp / "extra-set", 30, source=None, prefix="b", seed=1)
    return LabelSet(primary, primary.parent), LabelSet(second, second.parent)


def test_label_set_is_named_after_its_folder(tmp_path):
    assert LabelSet(tmp_path / "cxr-dev" / "labels.csv", tmp_path).name == "cxr-dev"
    assert LabelSet(Path("/labels.csv"), Path("/")).name == "labels"  # no folder: the stem


def test_images_must_pair_with_labels():
    with pytest.raises(ConfigError, match="one --images per --labels"):
        pair_sets([Path("a.csv"), Path("b.csv")], [Path("x")])
    default = pair_sets([Path("d/a.csv")], [])
    assert default[0].images == Path("d")


def test_pair_sets_keeps_the_order_and_needs_labels():
    sets = pair_sets([Path("a/l.csv"), Path("b/l.csv")], [Path("x"), Path("y")])
    assert sets == (LabelSet(Path("a/l.csv"), Path("x")), LabelSet(Path("b/l.csv"), Path("y")))
    with pytest.raises(ConfigError, match="--labels is required"):
        pair_sets([], [])


def test_parse_group_takes_the_label_after_the_last_colon():
    assert parse_group("nih-chestxray14:0") == ("nih-chestxray14", 0)
    assert parse_group("a:b:1") == ("a:b", 1)
    for bad in ("nih", ":1", "nih:2", "nih:", "nih:01"):
        with pytest.raises(ConfigError, match="expected SOURCE:LABEL"):
            parse_group(bad)


def test_first_set_follows_the_patient_split_and_the_others_train_or_hold_out(two_sets):
    primary, second = two_sets
    sel = load_sets(two_sets, seed=0, holdout=0.3)
    assert len(sel.images) == 50 and sel.dataset.tolist() == [0] * 20 + [1] * 30
    split = labels_split(primary.labels, 0)
    first = [str(s) for s in sel.split[:20]]
    assert first == [split[im.patient_id] for im in sel.images[:20]]
    assert set(sel.split[20:]) == {"train", HOLDOUT}
    assert 0 < (sel.split[20:] == HOLDOUT).sum() < 30
    # a set without a source column takes its folder's name as the source
    assert {im.source for im in sel.images[:20]} == {"site-a"}
    assert {im.source for im in sel.images[20:]} == {"extra-set"}
    # paths resolve under each set's own folder
    assert all(im.path.is_relative_to(second.images) for im in sel.images[20:])


def test_holdout_is_seeded_per_patient_and_zero_holds_none(tmp_path, two_sets):
    a = load_sets(two_sets, seed=0, holdout=0.5)
    b = load_sets(two_sets, seed=0, holdout=0.5)
    c = load_sets(two_sets, seed=1, holdout=0.5)
    assert (a.split == b.split).all() and (a.split[20:] != c.split[20:]).any()
    assert not (load_sets(two_sets, seed=0, holdout=0.0).split == HOLDOUT).any()
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"--holdout must be in \[0, 1\)"):
            load_sets(two_sets, seed=0, holdout=bad)
    # a patient's images are held out together
    two_each = labelled_set(tmp_path / "two", 30, prefix="t", images_per_patient=2)
    sel = load_sets((two_sets[0], LabelSet(two_each, two_each.parent)), seed=0, holdout=0.5)
    part: dict[str, set[str]] = {}
    for im, s, k in zip(sel.images, sel.split, sel.dataset, strict=True):
        if k == 1:
            part.setdefault(im.patient_id, set()).add(str(s))
    assert all(len(p) == 1 for p in part.values()) and {HOLDOUT} in part.values()


def test_excluded_group_is_never_trained_on_but_the_primary_test_stays(two_sets):
    sel = load_sets(two_sets, seed=0, holdout=0.2, exclude=[("site-a", 0), ("extra-set", 1)])
    labels = np.array([im.label for im in sel.images])
    first, second = sel.dataset == 0, sel.dataset == 1
    excluded = (first & (labels == 0)) | (second & (labels == 1))
    assert not (excluded & np.isin(sel.split, ["train", HOLDOUT])).any()
    assert (sel.split[excluded & second] == UNSEEN).all()
    # the primary set's val and test images stay where its split put them
    plain = load_sets(two_sets, seed=0, holdout=0.2)
    kept = excluded & first & np.isin(plain.split, ["val", "test"])
    assert kept.any() and (sel.split[kept] == plain.split[kept]).all()
    assert (sel.split[~excluded] == plain.split[~excluded]).all()
    with pytest.raises(ConfigError, match="no image has source 'nowhere' and label 0"):
        load_sets(two_sets, seed=0, exclude=[("nowhere", 0)])


def test_an_image_in_two_sets_is_refused(tmp_path, two_sets):
    primary = two_sets[0]
    again = write_csv(
        tmp_path / "again" / "labels.csv",
        [{"path": "images/a3_0.png", "label": 0, "patient_id": "x"}],
    )
    with pytest.raises(ConfigError, match=r"a3_0.png: listed twice \(.*primary.*again"):
        load_sets((primary, LabelSet(again, primary.images)), seed=0)
    with pytest.raises(ConfigError, match="listed twice"):
        load_sets((primary, primary), seed=0)


def test_column_errors_of_any_set_come_before_the_split(tmp_path, two_sets):
    bad = write_csv(tmp_path / "bad" / "labels.csv", [{"file": "a.png", "label": 1}])
    with pytest.raises(ConfigError, match=r"bad.*labels.csv: missing column\(s\) path"):
        load_sets((two_sets[0], LabelSet(bad, tmp_path)), seed=0)
