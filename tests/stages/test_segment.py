"""engine.stages.segment: the segmenter's output as (N, h, w) logits, the logit of a probability
threshold, and nearest-pixel upsampling of a mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.stages.segment import logit_threshold, segment, upsample_nearest


class Recorder:
    """A backend that answers (N, 1, h, w) logits and keeps what it was fed."""

    def __init__(self) -> None:
        self.feeds: dict[str, np.ndarray] = {}

    def infer(self, feeds):
        self.feeds = feeds
        x = next(iter(feeds.values()))
        return {"mask_logit": x * 2.0}


def test_segment_feeds_the_manifests_input_and_drops_the_channel(tiny_models):
    seg = tiny_models.segmenter
    x = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    backend = Recorder()
    logits = segment(backend, seg, x)
    assert list(backend.feeds) == [seg.input.name] and backend.feeds[seg.input.name] is x
    assert logits.shape == (3, 64, 64)
    np.testing.assert_array_equal(logits, x[:, 0] * 2.0)


def test_logit_threshold_is_the_logit_of_the_probability():
    assert logit_threshold(0.5) == 0.0
    assert logit_threshold(0.0) == -math.inf and logit_threshold(1.0) == math.inf
    for p in (0.1, 0.3, 0.9):
        assert 1.0 / (1.0 + math.exp(-logit_threshold(p))) == pytest.approx(p)


def test_upsample_nearest_maps_each_pixel_to_the_nearest_source_centre():
    mask = np.array([[[True, False], [False, True]]])
    up = upsample_nearest(mask, 4)
    assert up.shape == (1, 4, 4) and up.dtype == bool
    np.testing.assert_array_equal(up[0], np.kron(mask[0], np.ones((2, 2), bool)))
    odd = upsample_nearest(np.arange(3 * 5).reshape(1, 3, 5) % 2 == 0, 7)
    assert odd.shape == (1, 7, 7)
    assert odd[0, 0, 0] and odd[0, -1, -1]  # the corners come from the corners
