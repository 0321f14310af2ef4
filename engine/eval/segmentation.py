"""Segmenter Dice per split, with a patient-bootstrap 95% interval of the mean.

    python -m engine.eval.segmentation --models DIR --masks MASKS [--labels LABELS.csv]
        [--threads 2] [--resamples 2000] [--seed S] [--write [--replace]]

(the same command as `cxr eval segmentation ...`).

engine.eval.dice.dice_summary is what `cxr train segmenter` stores per split in the segmenter's
card. This recomputes it for an existing models directory: per-image hard Dice of DIR's segmenter
scored exactly as the trainer scores it (engine.train.segmenter.decode_pairs + served_dice: the
engine's Preprocessor, masks resized bilinear then >= 0.5, the exported ONNX under ONNX Runtime
FP32) on the pairs of each split of DIR/segmenter_splits.csv, and prints them beside the values
stored in the card. With --write it replaces the card's Dice metrics (adding the intervals) and
nothing else: the ONNX file and its sha256 stay as they are. It refuses to write over stored
values it does not reproduce (to 1e-6) unless --replace is given.

A models directory without segmenter_splits.csv gets its split rebuilt by the trainer's rule
(engine.train.segmenter.assign_splits) from --labels (the classifier's labels CSV the trainer
was given) and the card's seed; the rebuilt split must give the card's image and patient counts.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engine.console import fatal_errors, run_script
from engine.errors import ConfigError
from engine.eval.dice import BOOTSTRAP_RESAMPLES, dice_definition
from engine.train.splits import SPLITS

if TYPE_CHECKING:
    from engine.train.data import MaskPair

MATCH_TOL = 1e-6  # the same ONNX Runtime build reproduces the stored Dice to rounding


# ---------------------------------------------------------------------------------------------
# recomputing the card of an existing models directory


@dataclass(frozen=True, slots=True)
class SegmenterDice:
    dice: dict[str, dict[str, Any]]  # recomputed, per split
    stored: dict[str, dict[str, Any]]  # the card's, per split ({} if none)
    definition: str
    split_from: str  # where the split came from
    skipped: dict[str, str]  # image -> why it could not be decoded

    def differences(self, tol: float = MATCH_TOL) -> list[str]:
        """Where the recomputed values disagree with the stored ones (none stored: none)."""
        if not self.stored:
            return []
        out = []
        for name in sorted(set(self.stored) | set(self.dice), key=_split_order):
            old, new = self.stored.get(name), self.dice.get(name)
            if old is None or new is None:
                out.append(f"{name}: {'stored' if old else 'recomputed'} only")
                continue
            if old.get("images") != new["images"]:
                out.append(f"{name}: {new['images']} images, the card has {old.get('images')}")
            for key in ("mean", "median", "min"):
                if key in old and abs(float(old[key]) - new[key]) > tol:
                    out.append(f"{name}: {key} {new[key]:.6f}, the card has {float(old[key]):.6f}")
        return out


def _split_order(name: str) -> int:
    return SPLITS.index(name) if name in SPLITS else len(SPLITS)


def recompute(
    models_dir: Path,
    masks: Path,
    *,
    labels: Path | None = None,
    threads: int = 2,
    seed: int | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> SegmenterDice:
    """Dice per split of models_dir's segmenter, scored as `cxr train segmenter` scores it.

    seed: of the bootstrap; default the card's split seed (the trainer uses its --seed)."""
    # The trainer imports torch and this module; import it here, not at the top.
    from engine.models import load_manifest, manifest_path
    from engine.train.segmenter import decode_pairs, served_dice

    if resamples < 0:
        raise ConfigError(f"--resamples must be 0 (no intervals) or more, not {resamples}")
    seg = load_manifest(manifest_path(models_dir, "segmenter"))
    card = seg.card
    if seed is None:
        seed = int((card.get("splits") or {}).get("seed") or 0)
    if seed < 0:
        raise ConfigError(f"--seed must be 0 or more, not {seed}")
    pairs, split, split_from = load_split(models_dir, masks, card, labels)
    data, skipped = decode_pairs(pairs, split, seg, threads)
    dice = served_dice(seg.onnx_path, data, threads, seed=seed, resamples=resamples)
    stored = dict((card.get("metrics") or {}).get("dice") or {})
    return SegmenterDice(
        dice=dice,
        stored=stored,
        definition=dice_definition(seed=seed, resamples=resamples),
        split_from=split_from,
        skipped=skipped,
    )


def load_split(
    models_dir: Path, masks: Path, card: Mapping[str, Any], labels: Path | None
) -> tuple[list[MaskPair], list[str], str]:
    """The pairs of masks that the segmenter's split covers, their split, and its origin."""
    from engine.train.data import find_mask_pairs
    from engine.train.segmenter import SPLITS_FILE

    pairs = find_mask_pairs(masks)
    path = Path(models_dir) / SPLITS_FILE
    if path.is_file():
        chosen, split = _pairs_of_splits_file(path, pairs, masks)
        return chosen, split, str(path)
    return _rebuilt_split(path, pairs, card, labels)


def _pairs_of_splits_file(
    path: Path, pairs: list[MaskPair], masks: Path
) -> tuple[list[MaskPair], list[str]]:
    from engine.train.data import read_table

    by_name: dict[str, list[MaskPair]] = {}
    for p in pairs:
        by_name.setdefault(p.image.name, []).append(p)
    chosen, split, absent = [], [], []
    for i, row in enumerate(read_table(path, ("image_path", "patient_id", "split")), start=2):
        if row["split"] not in SPLITS:
            raise ConfigError(f"{path}: line {i}: split {row['split']!r} is not one of {SPLITS}")
        name = Path(row["image_path"]).name
        found = by_name.get(name, [])
        if not found:
            absent.append(name)
            continue
        if len(found) > 1:
            raise ConfigError(f"{masks}: {len(found)} images named {name}; names must be unique")
        pair = found[0]
        if pair.patient_id != row["patient_id"]:
            raise ConfigError(
                f"{path}: line {i}: {name} belongs to patient {row['patient_id']!r}, but "
                f"{masks} says {pair.patient_id!r}: are these the masks the model was trained on?"
            )
        chosen.append(pair)
        split.append(row["split"])
    if absent:
        raise ConfigError(
            f"{path}: {len(absent)} image(s) are not in {masks} (e.g. {absent[0]}); pass the "
            "mask folder (or index CSV) the segmenter was trained on as --masks"
        )
    return chosen, split


def _rebuilt_split(
    path: Path, pairs: list[MaskPair], card: Mapping[str, Any], labels: Path | None
) -> tuple[list[MaskPair], list[str], str]:
    from engine.train.segmenter import assign_splits

    info = card.get("splits") or {}
    rule, counts = str(info.get("rule", "")), info.get("counts") or {}
    if not counts or "seed" not in info:
        raise ConfigError(
            f"{path} not found and the card records no split seed and counts to rebuild it from"
        )
    if labels is None and "patients of" in rule:
        raise ConfigError(
            f"{path} not found; to rebuild the split pass --labels, the labels CSV the segmenter "
            f"was split with (card: {rule!r})"
        )
    split, how = assign_splits(pairs, labels, int(info["seed"]))
    got = {
        name: {
            "images": sum(s == name for s in split),
            "patients": len({p.patient_id for p, s in zip(pairs, split, strict=True) if s == name}),
        }
        for name in SPLITS
    }
    want = {
        name: {k: counts.get(name, {}).get(k) for k in ("images", "patients")} for name in SPLITS
    }
    if got != want:
        raise ConfigError(
            f"{path} not found and the split rebuilt by {how!r} does not give the card's "
            f"counts (rebuilt {got}, card {want}): check --masks and --labels"
        )
    return pairs, split, f"rebuilt ({how}; counts match the card)"


def write_metrics(models_dir: Path, result: SegmenterDice) -> Path:
    """Put the recomputed Dice and its definition into the segmenter card; nothing else changes."""
    from engine.models import load_manifest, manifest_path, save_manifest

    path = manifest_path(models_dir, "segmenter")
    seg = load_manifest(path)
    metrics = dict(seg.card.get("metrics") or {})
    metrics |= {"dice": result.dice, "definition": result.definition}
    save_manifest(replace(seg, card=seg.card | {"metrics": metrics}), Path(models_dir))
    load_manifest(path)  # still a valid manifest whose ONNX has its sha256
    return path


def format_table(result: SegmenterDice) -> str:
    head = f"{'split':<6} {'images (patients)':>17}  {'Dice mean [95% CI]':<26} {'median':>7}"
    lines = [head + f" {'min':>7}  {'card mean':>9}  {'diff':>8}"]
    for name, d in result.dice.items():
        ci = d.get("ci95") or {}
        mean = f"{d['mean']:.4f}"
        if ci.get("low") is not None:
            mean += f" [{ci['low']:.4f}, {ci['high']:.4f}]"
        old = result.stored.get(name, {}).get("mean")
        stored = f"{old:9.4f}  {d['mean'] - old:8.1e}" if old is not None else f"{'-':>9}  {'-':>8}"
        count = f"{d['images']} ({d['patients']})"
        lines.append(
            f"{name:<6} {count:>17}  {mean:<26} {d['median']:7.4f} {d['min']:7.4f}  {stored}"
        )
    return "\n".join(lines)


def segmentation_command(
    models: Annotated[Path, typer.Option(help="Models directory.")],
    masks: Annotated[Path, typer.Option(help="Mask folder or index CSV.")],
    labels: Annotated[
        Path | None, typer.Option(help="Labels CSV, to rebuild a missing split file.")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 2,
    resamples: Annotated[int, typer.Option(help="Patient bootstrap resamples.")] = (
        BOOTSTRAP_RESAMPLES
    ),
    seed: Annotated[
        int | None, typer.Option(help="Bootstrap seed (default: the card's split seed).")
    ] = None,
    write: Annotated[bool, typer.Option(help="Store the result in the segmenter card.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--replace", help="With --write: also when the card's values differ."),
    ] = False,
) -> None:
    """Recompute the segmenter's Dice per split (as the trainer scores it) beside its card's."""
    with fatal_errors():
        result = recompute(
            models, masks, labels=labels, threads=threads, seed=seed, resamples=resamples
        )
        print(f"split: {result.split_from}")
        for image, why in result.skipped.items():
            print(f"skipped {image}: {why}")
        print(format_table(result))
        diffs = result.differences()
        if not result.stored:
            print("the card stores no Dice to compare with")
        elif diffs:
            print("recomputed Dice differs from the card:\n  " + "\n  ".join(diffs))
        else:
            print(f"recomputed Dice matches the card (to {MATCH_TOL:g})")
        if write:
            if diffs and not overwrite:
                raise ConfigError(
                    "not writing: the recomputed Dice does not reproduce the card's (above); "
                    "check --masks, or pass --replace to store the recomputed values"
                )
            print(f"wrote {write_metrics(models, result)}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.eval.segmentation ARGS`: the exit code of `cxr eval segmentation ARGS`."""
    return run_script(segmentation_command, argv, prog="python -m engine.eval.segmentation")


if __name__ == "__main__":
    sys.exit(main())
