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


class ByRow:
    """A backend whose logit is the crop's first pixel and whose embedding is (1, pixel)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def infer(self, feeds):
        x = next(iter(feeds.values()))
        self.batches.append(len(x))
        v = x[:, 0, 0, 0].astype(np.float64)
        return {"logit": v[:, None], "embedding": np.stack([np.ones_like(v), v], axis=1)}


def test_test_time_crops_average_the_logits_and_embeddings_of_each_image(tiny_models):
    from dataclasses import replace

    from engine.stages.classify import crop_mean

    clf = replace(tiny_models.classifier, tta=((1.0, 1.0, 0.0, 0.0),) * 3)
    # 2 images x 3 crops, transform-major: image 0 gets logits 1, 2, 6; image 1 gets -2, 0, -4
    logits = np.array([1.0, -2.0, 2.0, 0.0, 6.0, -4.0], np.float32)
    x = np.broadcast_to(logits[:, None, None, None], (6, 1, 4, 4)).copy()
    backend = ByRow()
    prob, emb = classify(backend, clf, x)
    assert backend.batches == [6]  # every crop in one call
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-np.array([3.0, -2.0]))), rtol=1e-6)
    # the mean logit, not the mean probability: 1/(1+e^-3) differs from mean(sigmoid(1, 2, 6))
    assert abs(prob[0] - np.mean(1 / (1 + np.exp(-np.array([1.0, 2.0, 6.0]))))) > 0.01
    np.testing.assert_allclose(emb, [[1.0, 3.0], [1.0, -2.0]], rtol=1e-6)
    assert emb.dtype == np.float32 and emb.flags.c_contiguous
    mean_logit, _ = crop_mean(logits, np.zeros((6, 2)), 3)
    assert mean_logit.dtype == np.float64
    np.testing.assert_allclose(mean_logit, [3.0, -2.0])
    # one crop an image without tta: the backend's own rows
    prob1, emb1 = classify(ByRow(), tiny_models.classifier, x[:2])
    np.testing.assert_allclose(prob1, 1 / (1 + np.exp(-logits[:2].astype(np.float64))), rtol=1e-6)
    assert emb1.shape == (2, 2)
