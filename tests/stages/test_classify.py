"""engine.stages.classify: the classifier's logit as a probability, and its embedding, as float32."""

from __future__ import annotations

import numpy as np

from engine.stages.classify import classify


class Fixed:
    """A backend answering fixed logits and float64 embeddings, Fortran-ordered."""

    def infer(self, feeds):
        n = next(iter(feeds.values())).shape[0]
        logit = np.array([[0.0], [40.0], [-40.0]][:n])
        return {"logit": logit, "embedding": np.asfortranarray(np.ones((n, 4)))}


def test_probabilities_and_embeddings_come_back_as_float32(tiny_models):
    x = np.zeros((3, 1, 64, 64), np.float32)
    prob, emb = classify(Fixed(), tiny_models.classifier, x)
    assert prob.dtype == np.float32 and prob.shape == (3,)
    np.testing.assert_allclose(prob, [0.5, 1.0, 0.0], atol=1e-7)  # no overflow warning either
    assert emb.dtype == np.float32 and emb.shape == (3, 4) and emb.flags.c_contiguous
