"""Segmenters side by side: ONNX Runtime FP32 images/s on the CPU, and what each costs and gives.

Issue 17: the shipped U-Net costs as much as the ResNet50 only to produce a lung box (and the
mask the review page shows). Each segmenter given (the reference first: --models, by default
the shipped one; then every --candidate) runs under ONNX Runtime FP32 on the CPU with the same
batch size and intra-op threads, in turns over --rounds so that a machine whose load drifts
affects them alike. Per segmenter, one JSON line in results/segmenters.jsonl:

- images/s (median over the rounds) and `speed_ratio`: the median of each round's rate / the
  reference's rate in the same round (meaningful on a busy machine, unlike the absolute rates);
- MACs per image (multiply-accumulates of every Conv and ConvTranspose, from the graph's
  inferred shapes) and parameters;
- the card's test Dice (mean and patient-bootstrap 95% interval) and training time;
- with --masks: test Dice with every mask enlarged to the reference's size (nearest, as the
  review page shows it), against the human masks at that size: comparable across input sizes;
- with --labels: box IoU against the reference's lung boxes on every labelled image (each
  segmenter fed by the engine's own Preprocessor from the same work image, boxes found as
  `cxr screen` finds them: engine.train.segmenter_int8.lung_boxes), mean, min and how many fall
  below the bar (engine.models.SEG_MIN_BOX_IOU). Needs the train extra (torch);
- with --labels and a classifier (--classifier, by default the reference's folder when it holds
  one): what the box change does to the screening decisions. Every labelled image's work image
  is cropped at each segmenter's box and scored by that one classifier (its own export, the
  crop `cxr screen` cuts: engine.train.data.classifier_inputs); per segmenter, the share of
  images with the reference's decision, ROC AUC against the labels beside the reference's, and
  the largest change of the probability (`decisions_vs_reference`).

    python -m benchmarks.bench_segmenters --candidate /work/train/seg-unet-s8-128 \\
        --labels ../shared/data/cxr-dev/labels.csv --batch-size 16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/bench_segmenters.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, append_jsonl, header

DEFAULT_RESULTS = RESULTS / "segmenters.jsonl"


@dataclass(frozen=True, slots=True)
class Segmenter:
    directory: Path
    manifest: Any  # engine.models.Manifest

    @property
    def name(self) -> str:
        return f"{self.manifest.architecture} ({self.directory.name})"


def load_segmenter(directory: Path) -> Segmenter:
    from engine.models import load_manifest, manifest_path

    directory = Path(directory)
    return Segmenter(directory, load_manifest(manifest_path(directory, "segmenter")))


def conv_macs(model: Any) -> int:
    """Multiply-accumulates per image of the Conv and ConvTranspose nodes (batch dim ignored)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        # Conv: w [c_out, c_in / group, kh, kw], all of it per output pixel; ConvTranspose:
        # w [c_in, c_out / group, kh, kw], all of it per input pixel
        pixels_of = node.output[0] if node.op_type == "Conv" else node.input[0]
        total += int(np.prod(shapes[pixels_of][2:])) * int(np.prod(weights[node.input[1]]))
    return total


def _session(path: Path, threads: int) -> Any:
    from engine.train.export import ort_session

    return ort_session(path, threads)


def _rate(session: Any, x: np.ndarray, batches: int) -> float:
    t = time.perf_counter()
    for _ in range(batches):
        session.run(None, {"image": x})
    return batches * len(x) / (time.perf_counter() - t)


def throughput(
    segmenters: Sequence[Segmenter], *, batch_size: int, threads: int, rounds: int, batches: int
) -> list[dict[str, float]]:
    """Per segmenter: images/s (median over rounds) and speed_ratio vs segmenters[0]."""
    rng = np.random.default_rng(0)
    runs = []
    for seg in segmenters:
        h, w = seg.manifest.preprocess.size
        x = rng.standard_normal((batch_size, 1, h, w), dtype=np.float32)
        session = _session(seg.manifest.onnx_path, threads)
        session.run(None, {"image": x})  # warm-up: allocations, kernel choice
        runs.append((session, x))
    rates: list[list[float]] = [[] for _ in segmenters]
    for _ in range(rounds):
        for i, (session, x) in enumerate(runs):
            rates[i].append(_rate(session, x, batches))
    out = []
    for own in rates:
        ratios = [r / ref for r, ref in zip(own, rates[0], strict=True)]
        out.append(
            {
                "img_per_s": statistics.median(own),
                "img_per_s_rounds": own,
                "speed_ratio": statistics.median(ratios),
            }
        )
    return out


def box_agreement(
    segmenters: Sequence[Segmenter],
    labels: Path,
    images: Path,
    threads: int,
    classifier: Path | None = None,
) -> list[dict[str, Any]]:
    """Per segmenter: box IoU against segmenters[0]'s boxes on every labelled image; with a
    classifier, also `decisions_vs_reference` (decision_agreement)."""
    from engine.train.data import read_labels
    from engine.train.segmenter_int8 import box_agreement as summary
    from engine.train.segmenter_int8 import box_iou, lung_boxes, segmenter_inputs

    labelled = read_labels(labels, images)
    paths = [im.path for im in labelled]
    inputs: dict[tuple[Any, ...], tuple[list[int], np.ndarray]] = {}
    boxes = []
    for seg in segmenters:
        pre = seg.manifest.preprocess
        key = (pre.size, pre.mean, pre.std, pre.intensity)
        if key not in inputs:  # one decode per distinct segmenter input
            inputs[key] = segmenter_inputs(paths, seg.manifest, threads)
        ok, x = inputs[key]
        full = np.full((len(paths), 4), np.nan, np.float32)
        full[ok] = lung_boxes(_session(seg.manifest.onnx_path, threads), seg.manifest, x)
        boxes.append(full)
    decoded = ~np.isnan(boxes[0]).any(axis=1)
    out = []
    for b in boxes:
        both = decoded & ~np.isnan(b).any(axis=1)
        iou = box_iou(boxes[0][both], b[both])
        out.append({**summary(iou), "worst": _worst(iou, [paths[i] for i in np.flatnonzero(both)])})
    if classifier is not None:
        y = np.array([im.label for im in labelled])
        decisions = decision_agreement(segmenters[0], boxes, paths, y, classifier, threads)
        for line, dec in zip(out, decisions, strict=True):
            line["decisions_vs_reference"] = dec
    return out


def decision_agreement(
    reference: Segmenter,
    boxes: Sequence[np.ndarray],
    paths: Sequence[Path],
    y: np.ndarray,
    classifier: Path,
    threads: int,
) -> list[dict[str, Any]]:
    """One classifier on each segmenter's crops of the same work images: per set of boxes, the
    share of images whose decision is the first set's, ROC AUC of both, max |prob change|."""
    from sklearn.metrics import roc_auc_score

    from engine.models import ModelSet, load_manifest, manifest_path
    from engine.train.data import classifier_inputs, decode_all
    from engine.train.export import ort_run

    clf = load_manifest(manifest_path(Path(classifier), "classifier"))
    dec = decode_all(
        list(paths), ModelSet(segmenter=reference.manifest, classifier=clf), threads=threads
    )
    session = _session(clf.onnx_path, threads)
    probs = []
    for b in boxes:
        ok = [i for i in dec.ok if not np.isnan(b[i]).any()]
        rows = [dec.ok.index(i) for i in ok]
        logit = ort_run(session, classifier_inputs(dec.work[rows], b[ok], clf), batch=16)
        prob = np.full(len(paths), np.nan)
        prob[ok] = 1.0 / (1.0 + np.exp(-logit[clf.outputs[0].name].reshape(-1)))
        probs.append(prob)
    out = []
    for prob in probs:
        both = ~np.isnan(prob) & ~np.isnan(probs[0])
        same = (prob[both] >= clf.threshold) == (probs[0][both] >= clf.threshold)
        out.append(
            {
                "classifier": str(classifier),
                "threshold": clf.threshold,
                "images": int(both.sum()),
                "same_decision": float(same.mean()),
                "decisions_changed": int((~same).sum()),
                "roc_auc": float(roc_auc_score(y[both], prob[both])),
                "roc_auc_reference": float(roc_auc_score(y[both], probs[0][both])),
                "max_abs_prob_change": float(np.abs(prob[both] - probs[0][both]).max()),
            }
        )
    return out


def dice_at_reference_size(
    segmenters: Sequence[Segmenter], masks: Path, labels: Path | None, threads: int
) -> list[dict[str, Any]]:
    """Per segmenter: test-split Dice with its masks brought to segmenters[0]'s size the way the
    review page enlarges them (engine.stages.segment.upsample_nearest), against the human masks
    at that size: one yardstick for segmenters of different input sizes. The card's Dice is at
    each segmenter's own size."""
    from engine.eval.dice import dice_summaries
    from engine.eval.segmentation import load_split
    from engine.stages.segment import logit_threshold, upsample_nearest
    from engine.train.data import load_mask
    from engine.train.metrics import dice_per_image
    from engine.train.segmenter import decode_pairs

    side = segmenters[0].manifest.preprocess.size
    out = []
    ref_test: set[str] | None = None
    for seg in segmenters:
        pairs, split, _ = load_split(seg.directory, masks, seg.manifest.card, labels)
        test = [i for i, s in enumerate(split) if s == "test"]
        data, _ = decode_pairs([pairs[i] for i in test], ["test"] * len(test), seg.manifest, 1)
        logits = ort_logits(seg, data.x, threads)
        pred = upsample_nearest(logits >= logit_threshold(seg.manifest.threshold), side[0])
        truth = np.stack([load_mask(p.mask, side) for p in data.pairs])
        names = {str(p.image.name) for p in data.pairs}
        ref_test = names if ref_test is None else ref_test
        # the trainer's bootstrap (seed 0, the test split's stream): at the reference's own size
        # this is its card's test Dice and interval
        per_image = dice_per_image(pred[:, None], truth[:, None])
        patients = [p.patient_id for p in data.pairs]
        summary = dice_summaries({"test": (per_image, patients)}, seed=0)["test"]
        out.append({**summary, "side": side[0], "same_test_images": names == ref_test})
    return out


def ort_logits(seg: Segmenter, x: np.ndarray, threads: int) -> np.ndarray:
    from engine.train.export import ort_run

    out = ort_run(_session(seg.manifest.onnx_path, threads), x, batch=16)
    return out[seg.manifest.outputs[0].name][:, 0]


def _worst(iou: np.ndarray, paths: list[Path], n: int = 3) -> list[dict[str, Any]]:
    return [{"image": paths[i].name, "box_iou": float(iou[i])} for i in np.argsort(iou)[:n]]


def card_summary(seg: Segmenter) -> dict[str, Any]:
    card = seg.manifest.card or {}
    test = card.get("metrics", {}).get("dice", {}).get("test", {})
    training = card.get("training", {})
    return {
        "test_dice": test.get("mean"),
        "test_dice_ci95": [test["ci95"]["low"], test["ci95"]["high"]] if "ci95" in test else None,
        "train_seconds": training.get("seconds"),
        "epochs_run": training.get("epochs_run"),
        "best_epoch": training.get("best_epoch"),
    }


def run_segmenter_bench(
    reference: Path,
    candidates: Sequence[Path],
    *,
    batch_size: int = 16,
    threads: int = 2,
    rounds: int = 3,
    batches: int = 4,
    labels: Path | None = None,
    images: Path | None = None,
    masks: Path | None = None,
    classifier: Path | None = None,
    results: Path = DEFAULT_RESULTS,
    note: str = "",
) -> list[dict[str, Any]]:
    """Measure, append one line per segmenter to `results`, return the lines. classifier=None:
    the reference's folder when it holds a classifier.json."""
    import onnx

    segs = [load_segmenter(reference), *(load_segmenter(c) for c in candidates)]
    speed = throughput(segs, batch_size=batch_size, threads=threads, rounds=rounds, batches=batches)
    boxes: list[dict[str, Any] | None] = [None] * len(segs)
    if labels is not None:
        images = images or Path(labels).parent
        if classifier is None and (Path(reference) / "classifier.json").is_file():
            classifier = Path(reference)
        boxes = list(box_agreement(segs, Path(labels), Path(images), threads, classifier))
    dice: list[dict[str, Any] | None] = [None] * len(segs)
    if masks is not None:
        dice = list(dice_at_reference_size(segs, Path(masks), labels, threads))
    run_id = uuid.uuid4().hex[:12]
    head = header("segmenters", run_id)
    ref_macs = None
    lines = []
    for seg, sp, bx, dc in zip(segs, speed, boxes, dice, strict=True):
        model = onnx.load(str(seg.manifest.onnx_path))
        macs = conv_macs(model)
        ref_macs = ref_macs or macs
        line = {
            **head,
            "segmenter": str(seg.directory),
            "architecture": seg.manifest.architecture,
            "input": list(seg.manifest.preprocess.size),
            "reference": str(segs[0].directory),
            "config": {"batch_size": batch_size, "threads": threads, "rounds": rounds},
            "macs_per_image": macs,
            "macs_ratio": macs / ref_macs,
            "params": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
            **sp,
            **card_summary(seg),
            "boxes_vs_reference": bx,
            "test_dice_at_reference_size": dc,
            "note": note,
        }
        append_jsonl(results, line)
        lines.append(line)
    return lines


def format_table(lines: Sequence[dict[str, Any]]) -> str:
    rows = [
        "| segmenter | input | GMACs/img | MACs ratio | img/s | speed ratio | test Dice [95% CI] "
        "| test Dice at the reference's size | box IoU mean | min | #<bar "
        "| same decision | ROC AUC (reference's) | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ln in lines:
        ci = ln["test_dice_ci95"]
        dice = "-" if ln["test_dice"] is None else f"{ln['test_dice']:.4f}"
        if ci:
            dice += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
        bx = ln["boxes_vs_reference"]
        box = ["-", "-", "-"]
        if bx:
            box = [f"{bx['box_iou_mean']:.4f}", f"{bx['box_iou_min']:.4f}"]
            box.append(f"{bx['box_iou_below_bar']}/{bx['images']}")
        decided = ["-", "-"]
        dv = (bx or {}).get("decisions_vs_reference")
        if dv:
            decided = [
                f"{dv['same_decision']:.4f} ({dv['decisions_changed']} changed)",
                f"{dv['roc_auc']:.4f} ({dv['roc_auc_reference']:.4f})",
            ]
        dc = ln["test_dice_at_reference_size"]
        at_ref = "-"
        if dc:
            at_ref = f"{dc['mean']:.4f}"
            if dc.get("ci95"):
                at_ref += f" [{dc['ci95']['low']:.4f}, {dc['ci95']['high']:.4f}]"
        rows.append(
            f"| {ln['architecture']} | {ln['input'][0]} | {ln['macs_per_image'] / 1e9:.2f} "
            f"| {ln['macs_ratio']:.3f} | {ln['img_per_s']:.1f} | {ln['speed_ratio']:.2f} "
            f"| {dice} | {at_ref} | {' | '.join(box)} | {' | '.join(decided)} "
            f"| {ln['train_seconds'] or '-'} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from engine.models import PACKAGED_MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=PACKAGED_MODELS, help="reference segmenter")
    ap.add_argument("--candidate", type=Path, action="append", default=[], help="repeatable")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="batches per segmenter per round")
    ap.add_argument("--labels", type=Path, help="labelled images: box IoU vs the reference")
    ap.add_argument("--images", type=Path, help="root of the labels' paths (default: its folder)")
    ap.add_argument("--masks", type=Path, help="lung masks: test Dice at the reference's size")
    ap.add_argument(
        "--classifier", type=Path, help="models dir: decisions on each segmenter's crops"
    )
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    lines = run_segmenter_bench(
        args.models,
        args.candidate,
        batch_size=args.batch_size,
        threads=args.threads,
        rounds=args.rounds,
        batches=args.batches,
        labels=args.labels,
        images=args.images,
        masks=args.masks,
        classifier=args.classifier,
        results=args.results,
        note=args.note,
    )
    m = lines[0]["machine"]
    print(f"{m['cpu_model']} ({', '.join(m['cpu_flags'])}), load {m['load_avg_1m']}")
    print(format_table(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
