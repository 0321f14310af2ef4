"""engine.eval.resolution: downscaling (long side, never up, grey kept 8- or 16-bit), the
probabilities of a list of files in batches (nan where an image fails), and the downscale
agreement of the tiny models on synthetic images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine.errors import ConfigError
from engine.eval import resolution
from engine.eval.resolution import downscale, downscale_agreement, screen_probs


def image(path: Path, size: tuple[int, int], mode: str = "L", seed: int = 0) -> Path:
    """A synthetic image of `size` (width, height): a gradient with noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, w)[None, :] * np.linspace(0.3, 1, h)[:, None]
    grey = np.clip(base + rng.normal(0, 0.05, (h, w)), 0, 1)
    if mode == "I;16":
        Image.fromarray((grey * 65535).astype(np.uint16)).save(path)
    elif mode == "RGB":
        Image.fromarray((np.dstack([grey] * 3) * 255).astype(np.uint8), "RGB").save(path)
    else:
        Image.fromarray((grey * 255).astype(np.uint8), "L").save(path)
    return path


# ---------------------------------------------------------------------------------------------
# downscale


@pytest.mark.parametrize(
    ("size", "side", "want"),
    [((400, 300), 200, (200, 150)), ((300, 600), 224, (112, 224)), ((1000, 3), 100, (100, 1))],
)
def test_downscale_sets_the_long_side(tmp_path, size, side, want):
    src = image(tmp_path / "a.png", size)
    downscale(src, tmp_path / "b.png", side)
    with Image.open(tmp_path / "b.png") as im:
        assert im.format == "PNG" and im.size == want and im.mode == "L"


def test_downscale_never_upscales_and_keeps_the_pixels(tmp_path):
    src = image(tmp_path / "a.png", (120, 90))
    downscale(src, tmp_path / "b.png", 224)
    with Image.open(src) as a, Image.open(tmp_path / "b.png") as b:
        assert b.size == (120, 90)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_downscale_keeps_16_bit_and_greys_colour(tmp_path):
    deep = image(tmp_path / "deep.png", (300, 200), "I;16")
    downscale(deep, tmp_path / "deep_small.png", 150)
    with Image.open(tmp_path / "deep_small.png") as im:
        assert im.size == (150, 100)
        assert im.mode.startswith("I")  # still more than 8 bits per pixel
        assert int(np.asarray(im).max()) > 255
    colour = image(tmp_path / "c.jpg", (300, 200), "RGB")
    downscale(colour, tmp_path / "c_small.png", 150)
    with Image.open(tmp_path / "c_small.png") as im:
        assert im.mode == "L" and im.size == (150, 100)


# ---------------------------------------------------------------------------------------------
# screen_probs, on a stand-in Screener


class FakeScreener:
    """Records the batch sizes; every sample preprocesses, prob = its place in the batch / 10."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def preprocess(self, samples):
        self.batches.append(len(samples))
        ok = [i for i, _ in enumerate(samples)]
        return SimpleNamespace(ok=ok, n=len(samples))

    def infer(self, pre):
        return SimpleNamespace(prob=np.arange(pre.n) / 10)


def test_screen_probs_batches_and_leaves_unreadable_files_nan(tmp_path):
    paths = [image(tmp_path / f"{i}.png", (64, 64), seed=i) for i in range(5)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths.insert(2, bad)
    fake = FakeScreener()
    probs = screen_probs(fake, paths, batch_size=4)  # type: ignore[arg-type]
    # batch 1: files 0, 1, (bad), 3 -> three samples; batch 2: files 4, 5
    assert fake.batches == [3, 2]
    np.testing.assert_array_equal(probs[[0, 1, 3]], [0.0, 0.1, 0.2])
    assert np.isnan(probs[2])
    np.testing.assert_array_equal(probs[[4, 5]], [0.0, 0.1])


def test_screen_probs_with_nothing_readable_calls_nothing(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no")
    fake = FakeScreener()
    assert np.isnan(screen_probs(fake, [bad, bad], batch_size=2)).all()  # type: ignore[arg-type]
    assert fake.batches == []


# ---------------------------------------------------------------------------------------------
# downscale_agreement with the tiny models


def test_downscale_agreement_of_the_tiny_models(tiny_models_dir, tmp_path):
    big = [image(tmp_path / f"big{i}.png", (400, 360), seed=i) for i in range(4)]
    r = downscale_agreement(
        tiny_models_dir, big, np.array([1, 0, 1, 0]), side=96, threads=1, batch_size=3
    )
    assert r["side"] == 96 and r["images"] == 4 and r["failed"] == 0
    assert r["threshold"] == 0.5  # the untrained classifier's
    assert 0.0 <= r["same_decision"] <= 1.0 and r["mean_abs_prob_diff"] >= 0.0
    assert r["roc_auc_full"] is not None and r["roc_auc_downscaled"] is not None
    assert r["model_id"].startswith("tiny")


def test_an_image_pillow_cannot_open_counts_as_failed(tiny_models_dir, tmp_path):
    """It failed to screen at full size too: one `failed`, not a crash of the whole measure."""
    good = [image(tmp_path / f"g{i}.png", (200, 160), seed=i) for i in range(2)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = downscale_agreement(tiny_models_dir, [good[0], bad, good[1]], np.array([1, 0, 0]), side=96)
    assert r["images"] == 2 and r["failed"] == 1


def test_images_already_small_agree_with_themselves(tiny_models_dir, tmp_path):
    small = [image(tmp_path / f"s{i}.png", (90, 80), seed=i) for i in range(2)]
    r = downscale_agreement(tiny_models_dir, small, np.array([0, 0]), side=224, threads=1)
    assert r["same_decision"] == 1.0 and r["mean_abs_prob_diff"] == 0.0
    assert r["roc_auc_full"] is None and r["roc_auc_downscaled"] is None  # one class only


def test_downscale_agreement_needs_images(monkeypatch):
    monkeypatch.setattr(resolution, "load_models", lambda *_: pytest.fail("loaded models"))
    with pytest.raises(ConfigError, match="no images to measure the downscale agreement on"):
        downscale_agreement(None, [], np.array([]))
