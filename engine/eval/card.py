"""Render a model card (Markdown) from the manifests, `cxr evaluate --json` and the shortcut check.

    python -m engine.eval.card --models DIR --eval EVAL.json [--eval-int8 EVAL.json]
        [--shortcut SHORTCUT.json] --out MODEL_CARD.md
    python -m engine.eval.card --models DIR --segmenter-only --out MODEL_CARD.md

Every number comes from those files; nothing is typed in by hand. --segmenter-only re-renders
just the "## Segmenter" section of an existing card of the same models (after
`python -m engine.eval.segmentation --write`), leaving the rest as it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.models import load_models

PAPER = {"accuracy": 0.897, "sensitivity": 0.871, "roc_auc": 0.95, "pr_auc": 0.94}
METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc")


def _fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "undefined"
    ci = m.get("ci95") or {}
    if ci.get("low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def metrics_table(ev: dict[str, Any]) -> list[str]:
    groups = {"all": ev["overall"], **ev.get("groups", {})}
    head = "| metric | " + " | ".join(groups) + " | paper (4 hospitals) |"
    lines = [head, "|---" * (len(groups) + 2) + "|"]
    for name in METRICS:
        cells = [_fmt(g["metrics"].get(name)) for g in groups.values()]
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
            lines.append(f"| {label} | {_fmt(auc[key])} |")
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
                f"| {split} | {d['images']} ({patients}) | {_fmt({'value': d['mean'], 'ci95': ci})}"
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
    seg = load_models(models_dir, precision="auto").segmenter
    return ["## Segmenter", "", *_dice_lines(seg.card)]


def replace_segmenter_section(text: str, models_dir: Path) -> str:
    """The card text with its "## Segmenter" section re-rendered; the rest unchanged. The card
    must be of the same models (its model id line), or ConfigError."""
    model_id = load_models(models_dir, precision="auto").model_id
    if f"Model id `{model_id}`" not in text:
        raise ConfigError(
            f"the card is not of the models in {models_dir} (model id {model_id}): render it "
            "whole with --eval"
        )
    lines = text.split("\n")
    try:
        start = lines.index("## Segmenter")
    except ValueError:
        raise ConfigError("the card has no '## Segmenter' section to replace") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = lines[end:]
    return "\n".join(
        [*lines[:start], *segmenter_section(models_dir), *([""] if tail else []), *tail]
    )


def render(models_dir: Path, ev: dict, ev_int8: dict | None, sc: dict | None) -> str:
    ms = load_models(models_dir, precision="auto")
    seg, clf = ms.segmenter, ms.classifier
    card = clf.card
    out = [
        "# Model card: cxr-engine default models",
        "",
        f"Model id `{ms.model_id}`. Classifier: {clf.architecture} ({clf.precision}), trained from "
        "scratch (no pretrained weights); segmenter: "
        f"{seg.architecture} ({seg.precision}). Decision threshold {clf.threshold:.4f}, chosen on "
        "the validation patients by maximising Youden's J (ties to the lower threshold).",
        "",
        "**Intended use:** research and retrospective screening of frontal chest X-rays for "
        "COVID-19 vs other findings, with a radiologist in the loop. **Not** a diagnostic device.",
        "",
        "## Data and splits",
        "",
        "Public, de-identified CXRs from `../shared/data` (see its README): 288 images, 192 "
        "patients; COVID-19 positives all from the ieee8023 collection, negatives from ieee8023 "
        "(other pneumonias) and NIH ChestX-ray14 (no finding / pneumonia). Split by patient "
        "70/15/15, stratified by label and source (`splits.csv`), shared by both models.",
        "",
        "```json",
        json.dumps(card.get("data", {}) | {"splits": card.get("splits")}, indent=1)[:3000],
        "```",
        "",
        *segmenter_section(models_dir),
        "",
        "## Classifier on the held-out test patients (FP32 reference)",
        "",
        "95% bootstrap intervals resample patients. The paper's numbers are from 2362 CXRs of four",
        "hospitals; ours from 43 test images of one public collection: not comparable in kind.",
        "",
        *metrics_table(ev),
    ]
    if ev_int8 is not None:
        out += [
            "",
            f"## The same with the shipped {clf.precision} classifier",
            "",
            *metrics_table(ev_int8),
        ]
    if "fp16" in card:
        par = card["fp16"]["parity"]
        out += [
            "",
            "The shipped classifier stores its weights as float16 and computes in float32. "
            f"Against the FP32 export on the 288 dev images: same decision {par['same_decision']:.3f}, "
            f"max |prob diff| {par['prob_max_abs_diff']:.1e}, ROC AUC diff {par['roc_auc_diff']:.1e}, "
            f"embedding cosine min {par['embedding_cosine_min']:.6f}.",
        ]
    if "int8" in card:
        out += [
            "",
            "INT8 parity with FP32 (all labelled images): `"
            + json.dumps(
                {
                    k: v
                    for k, v in card["int8"]["parity"].items()
                    if k
                    in (
                        "same_decision",
                        "roc_auc_diff",
                        "embedding_cosine_mean",
                        "embedding_cosine_min",
                        "max_abs_prob_diff",
                    )
                }
            )
            + "`",
        ]
    ret = ev.get("retrieval", {}).get("overall")
    if ret:
        out += [
            "",
            "## Similar cases (embedding index)",
            "",
            f"precision@{ev['retrieval']['k']} of label agreement {ret['precision_at_k']:.3f} "
            f"(chance {ret['chance_precision_at_k']:.3f}); another image of the same patient in "
            f"the top {ev['retrieval']['k']}: {ret['same_patient_hit_rate']:.3f} of "
            f"{ret['same_patient_queries']} queries (test patients only).",
        ]
    if sc is not None:
        out += [
            "",
            "## Does it look at the lungs? (shortcut check, test patients)",
            "",
            *shortcut_lines(sc),
        ]
    out += [
        "",
        "## Known limits",
        "",
        "- Labels are confounded with source: every positive is from ieee8023 and half the "
        "negatives from NIH. Per-source metrics above; NIH has no positives, so its sensitivity "
        "is undefined.",
        "- Tiny test set (43 images): intervals are wide; expect lower performance on other "
        "hospitals' data.",
        "- ieee8023 images are often figures from papers (crops, arrows, letters, low "
        "resolution); negatives are other pneumonias, not healthy lungs.",
        "- Trained on 2 CPU cores in minutes, from scratch: far from the paper's ImageNet-"
        "pretrained ResNet50 on 2362 images.",
        "",
        "Caveats printed by `cxr evaluate`:",
        "",
        *[f"- {c}" for c in ev.get("caveats", [])],
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--eval", type=Path)
    p.add_argument("--eval-int8", type=Path)
    p.add_argument("--shortcut", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--segmenter-only",
        action="store_true",
        help="re-render only the segmenter section of the existing card at --out",
    )
    a = p.parse_args()
    if a.segmenter_only:
        if a.eval or a.eval_int8 or a.shortcut:
            p.error("--segmenter-only takes no --eval, --eval-int8 or --shortcut")
        try:
            a.out.write_text(replace_segmenter_section(a.out.read_text(), a.models))
        except (OSError, ConfigError) as exc:
            p.error(str(exc))
        print(f"updated the segmenter section of {a.out}")
        return
    if a.eval is None:
        p.error("--eval is required (or --segmenter-only)")
    ev = json.loads(a.eval.read_text())
    ev8 = json.loads(a.eval_int8.read_text()) if a.eval_int8 else None
    sc = json.loads(a.shortcut.read_text()) if a.shortcut else None
    a.out.write_text(render(a.models, ev, ev8, sc))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
