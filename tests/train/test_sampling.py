"""engine.train.sampling: source-balanced sample weights (each class half the epoch), and epoch
draws that depend on the seed and the epoch only."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")


def test_source_balanced_weights():
    from engine.train.sampling import sample_weights

    labels = np.array([1] * 90 + [1] * 10 + [0] * 100)
    sources = np.array(["big"] * 90 + ["small"] * 10 + ["neg"] * 100)
    for balance in (0.0, 0.5, 1.0):
        w = sample_weights(labels, sources, balance)
        assert w.sum() == pytest.approx(1.0)
        assert w[labels == 1].sum() == pytest.approx(0.5)  # each class half the epoch
    natural, equal = sample_weights(labels, sources, 0.0), sample_weights(labels, sources, 1.0)
    assert natural[:90].sum() == pytest.approx(0.45)  # as in the data
    assert equal[:90].sum() == pytest.approx(0.25) == equal[90:100].sum()  # equal per source
    half = sample_weights(labels, sources, 0.5)[:90].sum()
    assert 0.25 < half < 0.45


def test_epoch_draws_depend_on_seed_and_epoch_only():
    from engine.train.sampling import epoch_batches, epoch_rngs, sample_weights

    idx = np.arange(50)
    w = sample_weights(np.arange(50) % 2, np.array(["a"] * 50), 0.5)
    a = epoch_batches(idx, w, 32, 8, epoch_rngs(0, 3)[0])
    b = epoch_batches(idx, w, 32, 8, epoch_rngs(0, 3)[0])
    c = epoch_batches(idx, w, 32, 8, epoch_rngs(0, 4)[0])
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != y).any() for x, y in zip(a, c, strict=True))
