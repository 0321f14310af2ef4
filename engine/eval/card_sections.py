"""The sections of a model card, each rendered from its JSON: metrics tables, the shortcut
check, the segmenter's Dice, export parity, the data and splits, the generalisation figures and
the two-column comparison with another classifier. engine/eval/card.py puts them together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.eval.compare import PAPER, Comparison, fmt_metric
from engine.models import (
    AUTO_MAX_AUC_DIFF,
    AUTO_MIN_EMBEDDING_COSINE,
    AUTO_MIN_SAME_DECISION,
    SEG_MIN_BOX_IOU,
    Manifest,
    classifier_parity_ok,
    load_manifest,
    manifest_path,
    segmenter_parity_ok,
)

METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc")


def metrics_table(ev: dict[str, Any]) -> list[str]:
    groups = {"all": ev["overall"], **ev.get("groups", {})}
    head = "| metric | " + " | ".join(groups) + " | paper (4 hospitals) |"
    lines = [head, "|---" * (len(groups) + 2) + "|"]
    for name in METRICS:
        cells = [fmt_metric(g["metrics"].get(name)) for g in groups.values()]
        paper = f"{PAPER[name]:.3f}" if name in PAPER else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper} |")
    counts = ["{tp}/{fp}/{tn}/{fn}".format(**g["confusion"]) for g in groups.values()]
    lines.append("| TP/FP/TN/FN | " + " | ".join(counts) + " | 314 TP / 350 TN of 723 |")
    lines.append(
        "| images (patients) | "
        + " | ".join(f"{g['images']} ({g['patients']})" for g in groups.values())
        + " | 723 test images |"
    )
    return lines


def shortcut_lines(sc: dict[str, Any]) -> list[str]:
    auc = sc["overall"]["auc"]
    lines = [
        "| scored on | ROC AUC [95% CI] |",
        "|---|---|",
    ]
    for key, label in (
        ("as_is", "the lung crop as the engine sees it"),
        ("lungs_masked", "the same crop with the lungs masked out"),
        ("lungs_only", "the same crop with everything but the lungs masked out"),
        ("source_prior", "the image's source alone (share of positives per source)"),
    ):
        if key in auc:
            lines.append(f"| {label} | {fmt_metric(auc[key])} |")
    lines += ["", f"Verdict of the check: {sc.get('verdict', 'n/a')}"]
    return lines


def _dice_lines(card: dict[str, Any]) -> list[str]:
    dice = card.get("metrics", {}).get("dice", {})
    counts = card.get("splits", {}).get("counts", {})
    lines = [
        "| split | images (patients) | Dice mean [95% CI] | median | min |",
        "|---|---|---|---|---|",
    ]
    resamples = set()
    for split in ("train", "val", "test"):
        d, c = dice.get(split), counts.get(split, {})
        if d:
            ci = d.get("ci95")
            if ci and ci.get("low") is not None:
                resamples.add(ci["resamples"])
            patients = d.get("patients", c.get("patients", "?"))
            lines.append(
                f"| {split} | {d['images']} ({patients}) | {fmt_metric({'value': d['mean'], 'ci95': ci})}"
                f" | {d['median']:.3f} | {d['min']:.3f} |"
            )
    if resamples:
        n = "/".join(str(r) for r in sorted(resamples))
        interval = (
            f"95% intervals of the mean Dice: bootstrap resampling patients ({n} resamples), as "
            "for the classifier."
        )
    else:
        interval = "No interval."
    lines += [
        "",
        "Masks: V7 Labs polygons, which include the lung behind the heart. Test = held-out "
        f"patients (the same patient split as the classifier). {interval}",
    ]
    return lines


def segmenter_section(models_dir: Path) -> list[str]:
    seg = load_manifest(manifest_path(Path(models_dir), "segmenter"))
    return ["## Segmenter", "", *_dice_lines(seg.card), *_box_lines(seg)]


def _box_lines(seg: Manifest) -> list[str]:
    """The box rule, and the INT8 export's parity, where the manifest has them."""
    lines = []
    if seg.box_min_region:
        lines += [
            "",
            "Lung box: the bounding box of the mask grown by the crop margin, where a connected "
            f"mask region with fewer than {seg.box_min_region:g} of the mask's pixels does not "
            "count (a speck that rounding makes or removes cannot move a box edge; "
            "kernels.reference.lung_bbox).",
        ]
    par = seg.variants["int8"].parity if "int8" in seg.variants else {}
    if par:
        bar = "yes" if segmenter_parity_ok(par) else "no"
        lines += [
            "",
            "The INT8 QDQ export ships beside it: `--precision auto` runs it on CPUs with "
            "VNNI/AMX where it meets the parity bar, the shipped export elsewhere. Against the "
            f"FP32 export: lung-box IoU min {par['box_iou_min']:.4f}, mean "
            f"{par['box_iou_mean']:.4f} over {par['images']} labelled images "
            f"({par['box_iou_below_bar']} below {SEG_MIN_BOX_IOU}); Dice on "
            f"{par['mask_images']} held-out mask images {par['dice_fp32']:.4f} -> "
            f"{par['dice_int8']:.4f}. Meets the parity bar ({par['bar']}): {bar}.",
        ]
    return lines


def num(v: Any, spec: str) -> str:
    return "undefined" if v is None else format(v, spec)


def _same(par: dict[str, Any], precision: str) -> str:
    """Same-decision rate with counts, 4 decimals (0.98958 must not read as 0.990), and the
    held-out images' count where recorded."""
    rate, n = par.get("same_decision"), par.get("images")
    if rate is None:
        return "undefined"
    parts = [f"{round(rate * n)} of {n}"] if isinstance(n, int) and n > 0 else []
    held, m = par.get("same_decision_held_out"), par.get("held_out_images")
    if held is not None and isinstance(m, int) and m > 0:
        unseen = ", which neither calibration nor tuning saw" if precision == "int8" else ""
        parts.append(f"on the validation and test images alone{unseen}: {round(held * m)} of {m}")
    return f"{rate:.4f}" + (f" ({'; '.join(parts)})" if parts else "")


def parity_line(precision: str, par: dict[str, Any], *, shipped: bool, beside: bool = False) -> str:
    """One paragraph on an export's parity with the FP32 one (engine.train.parity's keys);
    beside: the export ships as a variant of the shipped one."""
    what = {
        "fp16": "stores its weights as float16 and computes in float32",
        "int8": "is the INT8 QDQ export",
    }.get(precision, f"is the {precision} export")
    if shipped:
        first = f"The shipped classifier {what}."
    elif precision == "w8":
        first = (
            "The w8 export ships beside it (the FP32 weights stored as per-channel INT8, "
            "computed in float32): TensorRT's fp16/fp32 plans build from it."
        )
    elif precision == "int8" and beside:
        first = (
            "The INT8 QDQ export ships beside it: `--precision auto` runs it on CPUs with "
            "VNNI/AMX where it meets the parity bar below, the shipped export elsewhere."
        )
    elif precision == "int8":
        first = (
            "The int8 export is not shipped (the release's `--classifier int8` ships it, with "
            "the float weights stored as w8 instead of float16 to stay within the size budget; "
            "the README says why the default release does not)."
        )
    else:
        first = f"The {precision} export is not shipped."
    where = par.get("inputs") or "the labelled images"
    bar = par.get("meets_bar")
    if bar is None and par.get("same_decision") is not None:
        bar = classifier_parity_ok(par)
    verdict = (
        ""
        if bar is None
        else f" Meets the parity bar (same decision >= {AUTO_MIN_SAME_DECISION} and on every "
        f"held-out image, |ROC AUC diff| <= {AUTO_MAX_AUC_DIFF}, embedding cosine mean >= "
        f"{AUTO_MIN_EMBEDDING_COSINE}): {'yes' if bar else 'no'}."
    )
    return (
        f"{first} Against the FP32 export on {par.get('images', '?')} images, {where}: "
        f"same decision {_same(par, precision)}, "
        f"max |prob diff| {num(par.get('prob_max_abs_diff'), '.1e')}, "
        f"ROC AUC diff {num(par.get('roc_auc_diff'), '.1e')}, "
        f"embedding cosine mean {num(par.get('embedding_cosine_mean'), '.6f')}, "
        f"min {num(par.get('embedding_cosine_min'), '.6f')}.{verdict}"
    )


def data_counts(card: dict[str, Any]) -> tuple[Any, Any]:
    counts = (card.get("splits") or {}).get("counts") or {}
    images = (card.get("data") or {}).get("used")
    if images is None and counts:
        images = sum(c.get("images", 0) for c in counts.values())
    patients = sum(c.get("patients", 0) for c in counts.values()) if counts else None
    return images if images is not None else "?", patients if patients is not None else "?"


def data_lines(card: dict[str, Any], n_images: Any, n_patients: Any) -> list[str]:
    sets = (card.get("data") or {}).get("sets") or []
    if len(sets) <= 1:
        return [
            f"Public, de-identified CXRs from `../shared/data` (see its README): {n_images} "
            f"images, {n_patients} patients; COVID-19 positives all from the ieee8023 collection, "
            "negatives from ieee8023 (other pneumonias) and NIH ChestX-ray14 (no finding / "
            "pneumonia). Split by patient 70/15/15, stratified by label and source "
            "(`splits.csv`), shared by both models."
        ]
    first, rest = sets[0], sets[1:]
    held = (card.get("data") or {}).get("holdout") or {}
    return [
        f"Public, de-identified CXRs from `../shared/data` (see its README), {len(sets)} labelled "
        f"sets, {n_images} images. The first, `{first['name']}`, is split by patient 70/15/15, "
        "stratified by label and source (`splits.csv`): its validation patients choose the epoch "
        "and the threshold, its test patients are this card's test. "
        + ", ".join(f"`{s['name']}`" for s in rest)
        + f" are training data, except a held-out slice of {held.get('fraction', '?')} of each "
        "source's patients (`holdout`, scored every epoch as a second signal, and below). "
        "Training images per source and label are in `train_counts`.",
    ]


def data_summary(card: dict[str, Any]) -> dict[str, Any]:
    data = dict(card.get("data") or {})
    splits = dict(card.get("splits") or {})
    return data | {"splits": splits}


HOLDOUT_METRICS = ("roc_auc", "specificity", "sensitivity")


def _keyed_rows(
    figures: dict[str, Any], prefix: str, cells: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """A table row per `prefix...` key of figures: the key without its prefix, then cells."""
    return [
        "| " + " | ".join([k.removeprefix(prefix), *cells(v)]) + " |"
        for k, v in figures.items()
        if k.startswith(prefix)
    ]


def _table(title: str, head: Sequence[str], rows: list[str]) -> list[str]:
    """A titled Markdown table and a blank line after it; nothing without rows."""
    if not rows:
        return []
    return [title, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|", *rows, ""]


def generalisation_lines(card: dict[str, Any], unseen: Sequence[dict[str, Any]]) -> list[str]:
    """## Generalisation: the held-out slices per source, the source probe, the downscale
    agreement and the leave-one-source-out figures, where the training recorded them."""
    out: list[str] = []
    holdout = (card.get("metrics") or {}).get("holdout") or {}
    rows = _keyed_rows(
        holdout,
        "source=",
        lambda v: [str(v["n"]), *(num(v.get(m), ".3f") for m in HOLDOUT_METRICS)],
    )
    out += _table(
        "Held-out slice of the further sets (patients never trained on; the threshold above):",
        ("source", "images", "ROC AUC", "specificity", "sensitivity"),
        rows,
    )
    groups = card.get("held_out_by_group") or {}
    out += _table(
        "Every labelled image not trained on (validation, test, held-out slices, excluded "
        "groups), per source and label, at the threshold above:",
        ("source:label", "images", "share right (specificity / sensitivity)"),
        [
            f"| {g} | {v['images']} | {v.get('specificity', v.get('sensitivity')):.3f} |"
            for g, v in groups.items()
        ],
    )
    probe = card.get("source_probe") or {}
    prows = _keyed_rows(
        probe,
        "label=",
        lambda v: [
            ", ".join(f"{s} {n}" for s, n in v["images"].items()),
            *(num(v.get(m), ".3f") for m in ("roc_auc", "roc_auc_max")),
        ],
    )
    out += _table(
        (
            "Source probe (can a linear model on the embedding tell the source within one class? "
            f"0.5: no, 1: yes; {probe.get('images', 'images not trained on')}; "
            f"{probe.get('method', '')}):"
        ),
        ("label", "images per source", "mean ROC AUC", "max ROC AUC"),
        prows,
    )
    da = card.get("downscale_agreement") or {}
    if da:
        out += [
            f"Resolution: the {da['images']} test images screened at full size and downscaled to "
            f"{da['side']} px (cxr-train's size) get the same decision in "
            f"{num(da.get('same_decision'), '.3f')} of cases; ROC AUC "
            f"{num(da.get('roc_auc_full'), '.3f')} at full size, "
            f"{num(da.get('roc_auc_downscaled'), '.3f')} downscaled; mean |prob diff| "
            f"{num(da.get('mean_abs_prob_diff'), '.3f')}.",
            "",
        ]
    for run in unseen:
        figures = "; ".join(
            f"{g['group']} {g['metric']} {g['value']:.3f} [{g['ci95'][0]:.3f}, "
            f"{g['ci95'][1]:.3f}] of {g['images']} images"
            for g in run["groups"]
            if g["value"] is not None
        )
        out += [
            f"Leave one source out: the same recipe trained without {', '.join(run['excluded'])} "
            f"(`{run['run']}`, its own threshold {num(run.get('threshold'), '.4f')}) scored "
            f"those images, never seen: {figures or 'nothing scored'} ({run['interval']}).",
            "",
        ]
    if not out:
        return []
    return ["## Generalisation", "", *out[:-1]]


def training_summary(card: dict[str, Any] | None) -> list[str]:
    """One line on how a compared classifier was trained, from its card (none without one)."""
    if not card:
        return []
    data, training = card.get("data") or {}, card.get("training") or {}
    sets = [s.get("name", "?") for s in data.get("sets") or []] or [str(data.get("labels", "?"))]
    parts = [f"trained on {' + '.join(sets)}"]
    if isinstance(data.get("train_counts"), dict):
        parts[0] += f" ({sum(data['train_counts'].values())} training images)"
    for key in ("sampling", "selection", "optimizer"):
        if training.get(key):
            parts.append(f"{key} {training[key]}")
    if training.get("best_epoch") is not None:
        parts.append(f"best epoch {training['best_epoch']} of {training.get('epochs_run', '?')}")
    if data.get("excluded_from_training"):
        parts.append(f"never trained on {', '.join(data['excluded_from_training'])}")
    return ["", "Training: " + "; ".join(parts) + "."]


def comparison_section(
    ev: dict[str, Any], sc: dict[str, Any] | None, shipped: str, c: Comparison
) -> list[str]:
    """ "## Comparison: NAME": metric | shipped FP32 | NAME | paper, overall and per source,
    and the shortcut AUCs of both."""
    head = f"| metric | shipped FP32 ({shipped}) | {c.name} ({c.architecture}) | paper |"
    lines = [head, "|---|---|---|---|"]
    left_out = []
    groups = {"all": ev["overall"], **ev.get("groups", {})}
    other = {"all": c.eval["overall"], **c.eval.get("groups", {})}
    compared = (
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("roc_auc", "ROC AUC"),
        ("pr_auc", "PR AUC"),
    )
    for group in [*groups, *(g for g in other if g not in groups)]:
        a, b = groups.get(group), other.get(group)
        suffix = "" if group == "all" else f" ({group})"
        for key, label in compared:
            ca = fmt_metric(a["metrics"].get(key)) if a else "n/a"
            cb = fmt_metric(b["metrics"].get(key)) if b else "n/a"
            if ca in ("undefined", "n/a") and cb in ("undefined", "n/a"):
                left_out.append(f"{label}{suffix}")
                continue
            paper = f"{PAPER[key]:.3f}" if group == "all" and key in PAPER else ""
            lines.append(f"| {label}{suffix} | {ca} | {cb} | {paper} |")
        ia = f"{a['images']} ({a['patients']})" if a else "n/a"
        ib = f"{b['images']} ({b['patients']})" if b else "n/a"
        paper = "723" if group == "all" else ""
        label = "images (patients)" if group == "all" else f"images of {group} (patients)"
        lines.append(f"| {label} | {ia} | {ib} | {paper} |")
    if sc is not None or c.shortcut is not None:
        for key, label in (
            ("as_is", "as is"),
            ("lungs_masked", "lungs masked"),
            ("source_prior", "source prior"),
        ):
            ca = fmt_metric(sc["overall"]["auc"].get(key)) if sc else "n/a"
            cb = fmt_metric(c.shortcut["overall"]["auc"].get(key)) if c.shortcut else "n/a"
            lines.append(f"| shortcut ROC AUC, {label} | {ca} | {cb} |  |")
    out = [
        f"## Comparison: {c.name}",
        "",
        f"{c.name}: {c.architecture}, {c.initialisation}; model id "
        f"`{(c.eval.get('run') or {}).get('model_id')}`. Scored like the shipped model's FP32 "
        "reference: its FP32 export (a packed release: its shipped export) on the held-out "
        "test patients, by source; 95% patient bootstrap intervals." + _crops_note(c.card),
        *training_summary(c.card),
        "",
        *lines,
    ]
    if left_out:
        out += ["", f"Undefined for both models, left out: {', '.join(left_out)}."]
    if sc is not None or c.shortcut is not None:
        out += [
            "",
            f"Shortcut check verdicts: shipped FP32: {(sc or {}).get('verdict', 'n/a')}; "
            f"{c.name}: {(c.shortcut or {}).get('verdict', 'n/a')}.",
        ]
    if c.note:
        out += ["", c.note]
    return out


def _crops_note(card: dict[str, Any] | None) -> str:
    """A classifier served the mean over test-time crops says so (its card's test_time_crops)."""
    crops = ((card or {}).get("test_time_crops") or {}).get("crops")
    if not crops:
        return ""
    return (
        f" Served the mean logit over {crops} test-time crops (manifest `tta`); its threshold "
        "and training figures are of that mean."
    )
