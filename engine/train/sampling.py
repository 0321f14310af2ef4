"""Which training images an epoch sees, and in which order: seeded by (seed, epoch) alone.

Source-balanced sampling: the two classes get half of every epoch each; within a class, each
source's share grows with its size to the power 1 - `balance` (0: as in the data, 1: equal per
source), so a source with thousands of images cannot make its look the class's look, while a
small source is not repeated so often that it is memorised. Images are drawn with replacement.

Every epoch's draws come from a generator seeded by (seed, epoch), never from the state of an
earlier epoch, so a run resumed from its epoch checkpoint sees exactly the batches the unbroken
run would have seen.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


def sample_weights(labels: np.ndarray, sources: np.ndarray, balance: float) -> np.ndarray:
    """Probability of drawing each image (sums to 1)."""
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], not {balance}")
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (y, s) in enumerate(zip(labels.tolist(), sources.tolist(), strict=True)):
        groups[(int(y), str(s))].append(i)
    classes = sorted({y for y, _ in groups})
    w = np.zeros(len(labels), np.float64)
    for y in classes:
        members = {s: idx for (yy, s), idx in groups.items() if yy == y}
        mass = {s: len(idx) ** (1.0 - balance) for s, idx in members.items()}
        total = sum(mass.values())
        for s, idx in members.items():
            w[idx] = (1.0 / len(classes)) * (mass[s] / total) / len(idx)
    return w / w.sum()


def epoch_rngs(seed: int, epoch: int) -> tuple[np.random.Generator, torch.Generator]:
    """The epoch's NumPy and torch generators, from (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch])
    return rng, torch.Generator().manual_seed(int(rng.integers(0, 2**62)))


def epoch_batches(
    indices: np.ndarray,
    weights: np.ndarray,
    images: int,
    batch_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """`images` draws (with replacement, by weight) in batches; no batch of one (BatchNorm)."""
    drawn = rng.choice(indices, size=images, replace=True, p=weights)
    out = [drawn[s : s + batch_size] for s in range(0, images, batch_size)]
    return [b for b in out if len(b) > 1]
