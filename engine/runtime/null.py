"""A backend that does no inference: measures the harness alone (decode, crop, write).

Outputs have the manifest's shapes; the segmenter "sees" the whole image as lung, and every
embedding is the same unit vector, so a null run's index is useless for retrieval by design.
"""

from __future__ import annotations

import numpy as np

from engine.runtime.base import Backend, register


@register
class NullBackend(Backend):
    name = "null"
    rank = 90  # last: it measures the harness, it does not screen

    def load(self) -> None:
        self._shapes = {t.name: tuple(t.shape[1:]) for t in self.manifest.outputs}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(feeds.values())).shape[0]
        out = {}
        for name, shape in self._shapes.items():
            value = np.full((n, *shape), 1.0, np.float32)  # logits of 1: all foreground
            if name == "embedding":
                value /= np.sqrt(shape[-1])
            out[name] = value
        return out
