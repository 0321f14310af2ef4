"""Several labelled sets in one classifier run: which images, from where, in which part.

The first set is the primary one: its patient split (engine.train.splits, shared with the
segmenter) gives the validation patients that choose the epoch and the threshold, and the test
patients of the card. Every further set is training data, except a seeded slice of each of its
sources held out as a second validation signal ("holdout"). Images of a (source, label) group
excluded from training (the leave-one-source-out checks) are never trained on; they are scored
at the end as "unseen" images, wherever they came from, except the primary set's validation and
test images, which stay where the split put them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from engine.train.data import LabelledImage, labels_split, read_labels
from engine.train.splits import fallback_split, hash_unit

HOLDOUT = "holdout"
UNSEEN = "unseen"


@dataclass(frozen=True, slots=True)
class LabelSet:
    """One labels CSV and the folder its 'path' column is relative to."""

    labels: Path
    images: Path

    @property
    def name(self) -> str:
        """The folder the CSV lives in (cxr-dev, cxr-train, ...), else the CSV's stem."""
        parent = Path(self.labels).resolve().parent.name
        return parent or Path(self.labels).stem


def pair_sets(labels: Sequence[Path], images: Sequence[Path]) -> tuple[LabelSet, ...]:
    """--labels given n times with --images given n times (in order), or not at all (each
    CSV's own folder)."""
    if not labels:
        raise ConfigError("--labels is required (a labels CSV; give it again for more sets)")
    if images and len(images) != len(labels):
        raise ConfigError(
            f"--images given {len(images)} time(s) for {len(labels)} --labels: give one "
            "--images per --labels, in the same order, or none (each CSV's own folder)"
        )
    roots = list(images) if images else [Path(p).parent for p in labels]
    return tuple(LabelSet(Path(lab), Path(root)) for lab, root in zip(labels, roots, strict=True))


def parse_group(text: str) -> tuple[str, int]:
    """'SOURCE:LABEL' (e.g. nih-chestxray14:0) -> (source, label)."""
    source, sep, label = text.rpartition(":")
    if not sep or not source or label not in ("0", "1"):
        raise ConfigError(
            f"--exclude-from-training {text!r}: expected SOURCE:LABEL, e.g. nih-chestxray14:0"
        )
    return source, int(label)


@dataclass(frozen=True, slots=True)
class Selection:
    images: list[LabelledImage]
    dataset: np.ndarray  # (n,) index of the LabelSet each image came from
    split: np.ndarray  # (n,) train | val | test | holdout | unseen


def load_sets(
    sets: Sequence[LabelSet],
    seed: int,
    *,
    holdout: float = 0.05,
    exclude: Sequence[tuple[str, int]] = (),
) -> Selection:
    """Every image of every set, with its part; duplicate image files are refused."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout must be in [0, 1), not {holdout}")
    images: list[LabelledImage] = []
    dataset: list[int] = []
    split: list[str] = []
    read = [read_labels(s.labels, s.images) for s in sets]  # column errors before the split
    primary = labels_split(sets[0].labels, seed)
    for k, s in enumerate(sets):
        for im in read[k]:
            if not im.source:
                im = LabelledImage(im.path, im.rel, im.label, im.patient_id, s.name)
            if k == 0:
                part = primary.get(im.patient_id) or fallback_split(im.patient_id, seed)
            else:
                held = hash_unit(f"{im.source}|{im.patient_id}", seed) < holdout
                part = HOLDOUT if held else "train"
            if (im.source, im.label) in exclude and part in ("train", HOLDOUT):
                part = UNSEEN
            images.append(im)
            dataset.append(k)
            split.append(part)
    _refuse_duplicates(images, dataset, sets)
    unknown = set(exclude) - {(im.source, im.label) for im in images}
    if unknown:
        src, lab = sorted(unknown)[0]
        raise ConfigError(
            f"--exclude-from-training {src}:{lab}: no image has source {src!r} and label {lab}"
        )
    return Selection(images, np.array(dataset), np.array(split))


def _refuse_duplicates(
    images: Sequence[LabelledImage], dataset: Sequence[int], sets: Sequence[LabelSet]
) -> None:
    seen: dict[Path, int] = {}
    for im, k in zip(images, dataset, strict=True):
        key = im.path.resolve()
        if key in seen:
            first = sets[seen[key]].labels
            raise ConfigError(
                f"{im.path}: listed twice ({first} and {sets[k].labels}); an image must be in "
                "one labelled set once, or it is trained on twice and may sit in train and test"
            )
        seen[key] = k
