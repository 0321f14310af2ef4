"""engine.train.classifier_fit: a training batch is the served crop when augmentation is off;
prediction, validation and the holdout report on the served crops; checkpoints that only the
same run may resume; and fit: seeded, bounded by --max-steps, a killed and resumed run equal to
the unbroken one.

Synthetic crops (`crop_data`, shared with the other train test files: `from
test_classifier_fit import crop_data`; so are the configs `tiny_config` and `fit_config`, and
`kill_and_resume` with `assert_same_fit`) and the tiny classifier, under tmp_path.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from engine.errors import ConfigError  # noqa: E402
from engine.train import classifier_fit  # noqa: E402
from engine.train.augment import Acquisition, ContextSwap, CropAugment  # noqa: E402
from engine.train.classifier_config import ClassifierTrainConfig  # noqa: E402
from engine.train.classifier_fit import (  # noqa: E402
    CropData,
    holdout_report,
    load_checkpoint,
    predict,
    save_checkpoint,
    train_batch,
    validate,
)
from engine.train.data import LabelledImage, classifier_inputs  # noqa: E402
from engine.train.metrics import roc_auc  # noqa: E402
from engine.train.resnet import build_classifier  # noqa: E402
from engine.train.specs import classifier_manifest  # noqa: E402

CLF = classifier_manifest("tiny-classifier", trained=False)


def crop_data(
    split: list[str],
    *,
    labels: list[int] | None = None,
    sources: list[str] | None = None,
    dataset: list[int] | None = None,
    seed: int = 0,
) -> CropData:
    """CropData of len(split) synthetic images for the tiny classifier: random uint8 working
    images (128 px), lung boxes, the served inputs cut from them, half-lung masks; labels
    alternate 1, 0 unless given; one patient per image (p0, p1, ...)."""
    n = len(split)
    rng = np.random.default_rng(seed)
    labels = labels if labels is not None else [(i + 1) % 2 for i in range(n)]
    sources = sources if sources is not None else ["site-a"] * n
    work = rng.integers(0, 256, (n, 128, 128), dtype=np.uint8)
    work[np.array(labels, bool), 40:90, 30:60] //= 3  # a darker patch on positives
    lo = rng.uniform(0.05, 0.25, (n, 2))
    hi = rng.uniform(0.75, 0.95, (n, 2))
    boxes = np.concatenate([lo, hi], axis=1).astype(np.float32)
    masks = np.zeros((n, 64, 64), np.uint8)
    masks[:, 16:48, 8:56] = 1
    images = [
        LabelledImage(Path(f"/data/{i}.png"), f"images/{i}.png", y, f"p{i}", s)
        for i, (y, s) in enumerate(zip(labels, sources, strict=True))
    ]
    return CropData(
        images,
        np.array(split),
        np.array(labels),
        work,
        boxes,
        classifier_inputs(work.astype(np.float32) / 255.0, boxes, CLF),
        masks,
        masks.reshape(n, -1).mean(axis=1).astype(np.float32),
        np.array(dataset if dataset is not None else [0] * n),
        np.array(sources),
    )


def tiny_config(out: Path, **kw) -> ClassifierTrainConfig:
    """The config of the tiny classifier on one thread, writing to `out`, `kw` over it. Its
    labels, images and segmenter are placeholders, for tests that give the data themselves."""
    base = dict(labels=Path("labels.csv"), images=Path("images"), segmenter=Path("seg"))
    return ClassifierTrainConfig(**(base | dict(out=out, arch="tiny-classifier", threads=1) | kw))


def fit_config(out: Path, **kw) -> ClassifierTrainConfig:
    """`tiny_config` of a short FP32 fit: 3 epochs of 8 images in batches of 4."""
    short = dict(batch_size=4, epochs=3, epoch_images=8, precision="fp32")
    return tiny_config(out, **(short | kw))


def _rngs(seed: int = 0):
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


SPLIT16 = ["train"] * 10 + ["val"] * 4 + ["test"] * 2


def test_a_batch_without_augmentation_is_the_served_crop():
    data = crop_data(SPLIT16)
    idx = np.array([3, 0, 7])
    x = train_batch(data, idx, CLF, CropAugment.off(), *_rngs())
    assert x.dtype == torch.float32 and x.shape == (3, 1, 64, 64)
    # equal up to the float rounding of the box (centre +- half side) in jitter_boxes
    np.testing.assert_allclose(x.numpy(), data.inputs[idx], atol=1e-4)
    # float working images in [0, 1] are taken as they are, uint8 ones divided by 255
    as_float = replace(data, work=data.work.astype(np.float32) / 255.0)
    np.testing.assert_allclose(
        train_batch(as_float, idx, CLF, CropAugment.off(), *_rngs()).numpy(), x.numpy(), atol=1e-6
    )


def test_a_batch_is_seeded_and_each_augmentation_changes_it():
    data = crop_data(SPLIT16, sources=["a", "b"] * 8)
    idx = np.arange(6)
    aug = CropAugment()
    a = train_batch(data, idx, CLF, aug, *_rngs(1)).numpy()
    np.testing.assert_array_equal(a, train_batch(data, idx, CLF, aug, *_rngs(1)).numpy())
    assert not np.allclose(a, train_batch(data, idx, CLF, aug, *_rngs(2)).numpy())
    assert np.abs(a - data.inputs[idx]).max() > 1e-2
    off = CropAugment.off()
    plain = train_batch(data, idx, CLF, off, *_rngs()).numpy()
    acq = train_batch(data, idx, CLF, off, *_rngs(), Acquisition()).numpy()
    swap = train_batch(data, idx, CLF, off, *_rngs(), None, ContextSwap(p=1.0)).numpy()
    assert not np.allclose(acq, plain) and not np.allclose(swap, plain)


def test_predict_gives_one_logit_per_input_in_batches_of_32():
    torch.manual_seed(0)
    model = build_classifier("tiny-classifier", 64)
    x = np.random.default_rng(0).normal(size=(40, 1, 64, 64)).astype(np.float32)
    logits = predict(model, x, "fp32")
    assert logits.shape == (40,) and not model.training  # left in eval mode
    with torch.no_grad():
        want = model(torch.from_numpy(x))[0].reshape(-1).numpy()
    np.testing.assert_allclose(logits, want, atol=1e-5)
    assert predict(model, x[:0], "fp32").shape == (0,)


def test_validate_scores_the_served_crops_overall_and_of_one_source():
    torch.manual_seed(0)
    data = crop_data(SPLIT16, sources=["a", "b"] * 8)
    model = build_classifier("tiny-classifier", 64)
    idx = np.flatnonzero(data.split != "test")
    loss, auc, score = validate(model, data, idx, "fp32")
    logit = predict(model, data.inputs[idx], "fp32").astype(np.float64)
    y = data.labels[idx]
    p = 1 / (1 + np.exp(-logit))
    assert loss == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), rel=1e-4)
    assert auc == score == pytest.approx(roc_auc(p, y))
    _, auc_b, score_b = validate(model, data, idx, "fp32", select_source="b")
    own = data.sources[idx] == "b"
    assert auc_b == auc and score_b == pytest.approx(roc_auc(p[own], y[own]))
    # a source without both classes gives no selection score
    one_class = replace(data, sources=np.where(data.labels == 1, "pos", "neg"))
    assert validate(model, one_class, idx, "fp32", select_source="pos")[2] is None


def test_holdout_report_per_source_of_the_held_out_slice():
    torch.manual_seed(0)
    model = build_classifier("tiny-classifier", 64)
    assert holdout_report(model, crop_data(SPLIT16), "fp32") == {}
    split = ["train"] * 8 + ["holdout"] * 8
    sources = ["x"] * 8 + ["a"] * 4 + ["b"] * 4
    labels = [1, 0] * 4 + [1, 0, 1, 0] + [0, 0, 0, 0]
    report = holdout_report(model, crop_data(split, labels=labels, sources=sources), "fp32")
    assert set(report) == {"a", "b"}
    assert report["a"]["n"] == 4 and report["a"]["roc_auc"] is not None
    assert {"mean_prob_label0", "mean_prob_label1"} <= set(report["a"])
    assert report["b"]["roc_auc"] is None and "mean_prob_label1" not in report["b"]
    assert 0.0 < report["b"]["mean_prob_label0"] < 1.0


def test_checkpoints_resume_only_the_same_run(tmp_path):
    cfg = fit_config(tmp_path)
    fp = classifier_fit._fingerprint(cfg, 10)
    assert classifier_fit._fingerprint(replace(cfg, threads=2, resume=True), 10) == fp
    assert classifier_fit._fingerprint(replace(cfg, lr=1e-3), 10) != fp
    assert classifier_fit._fingerprint(cfg, 11) != fp  # other training images
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(ConfigError, match="--resume: .*checkpoint.pt not found"):
        load_checkpoint(path, fp)
    state = {"epoch": 2, "weights": torch.arange(3.0), "fingerprint": fp}
    save_checkpoint(path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    loaded = load_checkpoint(path, fp)
    assert loaded["epoch"] == 2 and torch.equal(loaded["weights"], state["weights"])
    with pytest.raises(ConfigError, match="other options or data"):
        load_checkpoint(path, classifier_fit._fingerprint(replace(cfg, lr=1e-3), 10))


def _strip(history):
    timing = ("img_per_s", "train_s")
    return [{k: v for k, v in h.items() if k not in timing} for h in history]


def test_fit_is_seeded_bounded_by_max_steps_and_checkpoints_each_epoch(tmp_path):
    data = crop_data(SPLIT16, sources=["a", "b"] * 8)
    model, stopper, history, _ = classifier_fit.fit(fit_config(tmp_path / "a"), data, CLF, "fp32")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["steps"] for h in history] == [2, 4, 6]  # 8 draws per epoch, batches of 4
    assert 1 <= stopper.best_epoch <= 3
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 3 and state["history"] == history
    again, _, history_b, _ = classifier_fit.fit(fit_config(tmp_path / "b"), data, CLF, "fp32")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert _strip(history) == _strip(history_b)
    _, _, short, _ = classifier_fit.fit(fit_config(tmp_path / "c", max_steps=3), data, CLF, "fp32")
    assert [h["steps"] for h in short] == [2, 3]


def kill_and_resume(cfg, data, clf, tmp_path, monkeypatch, *, epoch: int):
    """Fit `cfg` unbroken into tmp_path/a, then into tmp_path/b killed right after the
    checkpoint of `epoch` is saved, and resume that. Returns the (model, stopper, history) of
    the unbroken and of the resumed run, and the killed run's config."""
    unbroken, stop_a, hist_a, _ = classifier_fit.fit(
        replace(cfg, out=tmp_path / "a"), data, clf, "fp32"
    )
    real_save = classifier_fit.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == epoch:
            raise Killed

    monkeypatch.setattr(classifier_fit, "save_checkpoint", save_then_die)
    b = replace(cfg, out=tmp_path / "b")
    with pytest.raises(Killed):
        classifier_fit.fit(b, data, clf, "fp32")
    monkeypatch.setattr(classifier_fit, "save_checkpoint", real_save)
    resumed, stop_b, hist_b, _ = classifier_fit.fit(replace(b, resume=True), data, clf, "fp32")
    return (unbroken, stop_a, hist_a), (resumed, stop_b, hist_b), b


def assert_same_fit(a, b) -> None:
    """Two (model, stopper, history) of `fit`: the same weights, best epoch and history (but
    for the timings)."""
    (model_a, stop_a, hist_a), (model_b, stop_b, hist_b) = a, b
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    assert stop_a.best_epoch == stop_b.best_epoch and _strip(hist_a) == _strip(hist_b)


def test_killed_and_resumed_fit_equals_the_unbroken_one(tmp_path, monkeypatch):
    data = crop_data(SPLIT16, sources=["a", "b"] * 8)
    cfg = fit_config(tmp_path / "a", context_swap=0.5)
    unbroken, resumed, _ = kill_and_resume(cfg, data, CLF, tmp_path, monkeypatch, epoch=1)
    assert_same_fit(unbroken, resumed)


def test_two_view_loss_is_both_views_bce_plus_the_weighted_logit_gap():
    import torch.nn.functional as F

    logit = torch.tensor([2.0, -1.0, 1.0, 0.0])  # crops a, b, then their second views
    y = torch.tensor([1.0, 0.0])
    bce = F.binary_cross_entropy_with_logits(logit, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    got = classifier_fit.two_view_loss(logit, y, 0.5)
    assert got.item() == pytest.approx(bce.item() + 0.5 * (1.0**2 + 1.0**2) / 2)
    same = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert classifier_fit.two_view_loss(same, y, 3.0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(same, torch.tensor([1.0, 0.0, 1.0, 0.0])).item()
    )


def test_a_two_view_fit_runs_resumes_exactly_and_keeps_older_fingerprints(tmp_path, monkeypatch):
    import hashlib
    import json
    from dataclasses import asdict

    cfg = fit_config(tmp_path / "a")
    old = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "resume", "consistency")}
    old["train_images"] = 10  # the fingerprint before the option existed
    want = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()
    assert classifier_fit._fingerprint(cfg, 10) == want  # off: older checkpoints resume
    assert classifier_fit._fingerprint(replace(cfg, consistency=0.5), 10) != want
    with pytest.raises(ConfigError, match=r"--consistency must be in \[0, 100\], not -1"):
        replace(cfg, consistency=-1.0)
    data = crop_data(SPLIT16, sources=["a", "b"] * 8)
    two = replace(cfg, consistency=0.5)
    unbroken, resumed, _ = kill_and_resume(two, data, CLF, tmp_path, monkeypatch, epoch=1)
    assert_same_fit(unbroken, resumed)
    one, _, _, _ = classifier_fit.fit(replace(cfg, out=tmp_path / "c"), data, CLF, "fp32")
    differ = [
        k for k, v in one.state_dict().items() if not torch.equal(v, unbroken[0].state_dict()[k])
    ]
    assert differ  # the second view and its term change the training
