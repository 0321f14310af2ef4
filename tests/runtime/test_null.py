"""engine.runtime.null: the backend without a model (for measuring the rest of a run): outputs of
the manifest's shapes, the whole image as lung, unit embeddings."""

from __future__ import annotations

import numpy as np
from test_runtime import seg_batch

from engine.runtime.null import NullBackend


def test_null_backend_shapes(tiny_models):
    with NullBackend(tiny_models.segmenter) as seg:
        mask = seg.infer({"image": seg_batch(2)})["mask_logit"]
    assert mask.shape == (2, 1, 64, 64) and mask.dtype == np.float32
    assert (mask == 1.0).all()  # positive logits everywhere: the whole image is "lung"
    with NullBackend(tiny_models.classifier) as clf:
        out = clf.infer({"image": seg_batch(3)})
    assert out["logit"].shape == (3, 1) and out["embedding"].shape == (3, 64)
    assert out["logit"].dtype == np.float32 and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-6)
