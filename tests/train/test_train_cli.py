"""engine/train/cli.py: `cxr train segmenter|classifier` build their configs from their options by
name (the commands' runs are in test_train.py)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")


def test_train_commands_map_every_option_onto_their_config(monkeypatch, tmp_path):
    """`cxr train segmenter|classifier` build their configs from their options by name."""
    from conftest import run_cli

    import engine.train.classifier as classifier
    import engine.train.segmenter as segmenter
    from engine.train.classifier import ClassifierTrainConfig
    from engine.train.datasets import LabelSet
    from engine.train.segmenter import SegmenterTrainConfig

    seen: dict[str, Any] = {}
    monkeypatch.setattr(segmenter, "train_segmenter", lambda cfg: seen.setdefault("seg", cfg))
    monkeypatch.setattr(classifier, "train_classifier", lambda cfg: seen.setdefault("clf", cfg))
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "out"
    common = ["--out", out, "--epochs", "3", "--seed", "4", "--max-steps", "5", "--batch-size", "6"]
    common += ["--lr", "0.5", "--patience", "2", "--threads", "1", "--precision", "fp32"]
    seg_args = ["--masks", tmp_path, "--labels", a, "--arch", "tiny-unet"]
    assert run_cli(["train", "segmenter", *seg_args, *common])[0] == 0
    schedule = dict(
        out=out, epochs=3, seed=4, max_steps=5, batch_size=6, lr=0.5, patience=2, threads=1
    )
    assert seen["seg"] == SegmenterTrainConfig(
        masks=tmp_path, labels=a, arch="tiny-unet", precision="fp32", **schedule
    )
    clf_args = ["--labels", a, "--labels", b, "--images", tmp_path, "--images", out]
    clf_args += ["--segmenter", tmp_path, "--arch", "tiny-classifier", "--hflip"]
    clf_args += ["--epoch-images", "12", "--source-balance", "0.25", "--select-source", "s"]
    clf_args += ["--exclude-from-training", "s:0", "--holdout", "0.1", "--no-acquisition"]
    clf_args += ["--no-standardize", "--cache", tmp_path / "c", "--resume"]
    clf_args += ["--calibration-images", "7", "--int8-tune-epochs", "0"]
    assert run_cli(["train", "classifier", *clf_args, *common])[0] == 0
    assert seen["clf"] == ClassifierTrainConfig(
        labels=a,
        images=tmp_path,
        extra=(LabelSet(b, out),),
        segmenter=tmp_path,
        arch="tiny-classifier",
        hflip=True,
        epoch_images=12,
        source_balance=0.25,
        select_source="s",
        exclude=("s:0",),
        holdout=0.1,
        acquisition=False,
        standardize=False,
        cache=tmp_path / "c",
        resume=True,
        calibration_images=7,
        int8_tune_epochs=0,
        precision="fp32",
        **schedule,
    )
