"""engine.train.generalisation: the card's shortcut measurements: the source probe on the
embeddings of every image the classifier was not trained on, the share it gets right per
held-out source and label, and the downscale agreement on the first set's test images; which
images were trained on comes from the training's own split or a directory's splits.csv.

Synthetic crops and outputs (test_classifier_fit.crop_data), and for measure_models synthetic
sets (test_crops.synthetic_sets) with the tiny untrained models, under tmp_path. The same on
real images: tests/train/test_train_multiset.py.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from test_classifier_fit import crop_data  # noqa: E402
from test_crops import BAD, synthetic_sets  # noqa: E402

from engine.errors import ConfigError  # noqa: E402
from engine.eval.source_probe import source_probe  # noqa: E402
from engine.train import generalisation  # noqa: E402
from engine.train.generalisation import (  # noqa: E402
    HELD_OUT,
    from_training,
    held_out_by_group,
    measure,
    trained_mask,
)

SPLIT = ["train"] * 8 + ["val"] * 4 + ["test"] * 4 + ["train"] * 4 + ["holdout"] * 4
SOURCES = ["a", "b"] * 8 + ["c"] * 8
DATASET = [0] * 16 + [1] * 8


def _data():
    return crop_data(SPLIT, sources=SOURCES, dataset=DATASET)


def _outputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "logit": rng.normal(size=(n, 1)).astype(np.float32),
        "embedding": rng.normal(size=(n, 8)).astype(np.float32),
    }


@pytest.fixture
def downscale_calls(monkeypatch):
    """downscale_agreement replaced by a recorder (it screens real files)."""
    calls = []

    def record(directory, paths, labels, *, threads):
        calls.append((directory, list(paths), np.asarray(labels).tolist(), threads))
        return {"images": len(paths), "same_decision": 1.0}

    monkeypatch.setattr(generalisation, "downscale_agreement", record)
    return calls


def test_held_out_by_group_counts_and_scores_each_source_and_label():
    data = crop_data(["val"] * 6, labels=[1, 1, 0, 0, 0, 1], sources=["a", "a", "a", "b", "b", "c"])
    probs = np.array([0.9, 0.2, 0.7, 0.1, 0.3, 0.6])
    held = np.array([True, True, True, True, True, False])
    got = held_out_by_group(probs, data, held, threshold=0.5)
    assert got == {
        "a:0": {"images": 1, "specificity": 0.0},  # 0.7 called positive
        "a:1": {"images": 2, "sensitivity": 0.5},  # 0.9 found, 0.2 missed
        "b:0": {"images": 2, "specificity": 1.0},
    }  # c is not held out
    # the decision is prob >= threshold
    at = held_out_by_group(np.full(6, 0.5), data, held, threshold=0.5)
    assert at["a:1"]["sensitivity"] == 1.0 and at["b:0"]["specificity"] == 0.0


def test_measure_probes_the_held_out_images_and_downscales_the_primary_test(
    tmp_path, downscale_calls
):
    data, out = _data(), _outputs(24)
    trained = data.split == "train"
    got = measure(tmp_path, data, out, trained, 0.5, threads=3)
    assert set(got) == {"source_probe", "downscale_agreement", "held_out_by_group"}
    held = ~trained
    patients = np.array([im.patient_id for im in data.images])
    want = source_probe(
        out["embedding"][held], data.sources[held], data.labels[held], patients[held]
    )
    assert got["source_probe"] == want | {"images": HELD_OUT}
    test = [i for i in range(24) if SPLIT[i] == "test" and DATASET[i] == 0]
    assert downscale_calls == [
        (tmp_path, [data.images[i].path for i in test], data.labels[test].tolist(), 3)
    ]
    assert got["downscale_agreement"] == {"images": 4, "same_decision": 1.0}
    groups = got["held_out_by_group"]
    assert sum(g["images"] for g in groups.values()) == held.sum() == 12
    assert {k.split(":")[0] for k in groups} == {"a", "b", "c"}  # the holdout's source too
    probs = 1 / (1 + np.exp(-out["logit"].reshape(-1).astype(np.float64)))
    assert groups == held_out_by_group(probs, data, held, 0.5)


def test_from_training_holds_out_what_the_split_did_not_train_on(tmp_path, downscale_calls):
    data, out = _data(), _outputs(24)
    got = from_training(tmp_path, data, out, 0.4, threads=1)
    assert got == measure(tmp_path, data, out, data.split == "train", 0.4, threads=1)


def test_trained_mask_reads_a_directory_s_splits_csv(tmp_path):
    data = _data()
    path = tmp_path / "splits.csv"
    with pytest.raises(ConfigError, match="missing; it records the split"):
        trained_mask(path, data)
    with open(path, "w", newline="") as f:  # the old format: no dataset column, first set only
        w = csv.writer(f)
        w.writerow(["path", "split"])
        w.writerows(
            [[data.images[i].rel, "train"] for i in (0, 1, 16)] + [[data.images[2].rel, "val"]]
        )
    # rows without a dataset column are the first set's: image 16 (second set) was not trained on
    assert np.flatnonzero(trained_mask(path, data)).tolist() == [0, 1]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "dataset"])
        w.writerows([[data.images[i].rel, "train", k] for i, k in ((0, 0), (16, 1), (17, 0))])
    assert np.flatnonzero(trained_mask(path, data)).tolist() == [0, 16]


def test_measure_models_on_a_models_directory(tmp_path, tiny_models):
    """The whole command path on synthetic sets: the crops of both sets, the classifier's ONNX
    outputs, its splits.csv for what was trained on; downscale agreement on the primary test
    images (smaller than 224 px, so left as they are: the same decisions)."""
    import shutil

    from engine.train.datasets import load_sets

    models = tmp_path / "models"
    shutil.copytree(tiny_models.classifier.directory, models)
    primary, second = synthetic_sets(tmp_path / "sets")
    sel = load_sets((primary, second), 0, holdout=0.05)
    with open(models / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "dataset"])
        w.writerows(
            [im.rel, s, k] for im, s, k in zip(sel.images, sel.split, sel.dataset, strict=True)
        )
    got = generalisation.measure_models(
        models,
        [primary.labels, second.labels],
        [primary.images, second.images],
        cache=tmp_path / "cache",
        threads=1,
    )
    kept = np.array(
        [not (k == 0 and im.rel == BAD) for im, k in zip(sel.images, sel.dataset, strict=True)]
    )
    n_trained = int((sel.split[kept] == "train").sum())  # the bad image is in no part
    assert sum(g["images"] for g in got["held_out_by_group"].values()) == 29 - n_trained
    down = got["downscale_agreement"]
    n_test = int(((sel.split == "test") & (sel.dataset == 0) & kept).sum())
    assert down["images"] + down["failed"] == n_test and down["same_decision"] == 1.0
    assert got["source_probe"]["images"] == HELD_OUT
