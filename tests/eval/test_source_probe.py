"""engine.eval.source_probe: a probe of the classifier's embeddings for the image's source finds
a source planted in them and not one that is absent."""

from __future__ import annotations

import numpy as np


def test_source_probe_finds_a_planted_source_and_not_a_random_one():
    from engine.eval.source_probe import source_probe

    rng = np.random.default_rng(0)
    n = 240
    latent = rng.normal(size=(n, 8))
    sources = np.array(["a", "b"])[np.arange(n) % 2]
    labels = (np.arange(n) // 2) % 2
    mix = rng.normal(size=(8, 256))
    clean = latent @ mix + 0.1 * rng.normal(size=(n, 256))
    planted = latent.copy()
    planted[sources == "a", 0] += 2.5  # source a is shifted along one latent direction
    leaky = planted @ mix + 0.1 * rng.normal(size=(n, 256))
    none = source_probe(clean, sources, labels, seed=0)
    some = source_probe(leaky, sources, labels, seed=0)
    for y in (0, 1):
        assert abs(none[f"label={y}"]["roc_auc"] - 0.5) < 0.15
        assert some[f"label={y}"]["roc_auc"] > 0.9
        assert some[f"label={y}"]["images"] == {"a": 60, "b": 60}
    # a class from one source only is not probed
    one = source_probe(leaky, np.where(labels == 1, "a", sources), labels)
    assert "label=1" not in one and "label=0" in one
