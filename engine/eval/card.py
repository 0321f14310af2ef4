"""Render a model card (Markdown) from the manifests, `cxr evaluate --json` and the shortcut check.

    python -m engine.eval.card --models DIR --eval EVAL.json [--eval-shipped EVAL.json]
        [--shortcut SHORTCUT.json] [--compare NAME=EVAL.json[,SHORTCUT.json][,MODELS_DIR] ...]
        [--evidence DIR] --out MODEL_CARD.md
    python -m engine.eval.card --models DIR --segmenter-only --out MODEL_CARD.md

(the same command as `cxr eval card ...`). Every number comes from those files; nothing is typed
in by hand. `python -m engine.eval.release` makes those files and renders the card in one
command (see there). --eval-int8 is the old name of --eval-shipped. --segmenter-only re-renders
just the "## Segmenter" section of an existing card of the same models (after
`python -m engine.eval.segmentation --write`), leaving the rest as it is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.console import command_line, run_script
from engine.errors import ConfigError
from engine.eval.compare import (
    PAPER,
    Comparison,
    columns_of,
    comparison_section,
    fmt_metric,
    initialisation,
    parse_compare,
    parse_unseen,
    ship_rule_lines,
    side_by_side,
    unseen_of,
)
from engine.models import AUTO_MAX_AUC_DIFF, AUTO_MIN_SAME_DECISION, load_models, meets_parity_bar

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


def _num(v: Any, spec: str) -> str:
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


def parity_line(precision: str, par: dict[str, Any], *, shipped: bool) -> str:
    """One paragraph on an export's parity with the FP32 one (engine.train.parity's keys)."""
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
        bar = meets_parity_bar(par["same_decision"], par.get("roc_auc_diff"))
    verdict = (
        ""
        if bar is None
        else f" Meets the parity bar (same decision >= {AUTO_MIN_SAME_DECISION}, |ROC AUC diff| "
        f"<= {AUTO_MAX_AUC_DIFF}): {'yes' if bar else 'no'}."
    )
    return (
        f"{first} Against the FP32 export on {par.get('images', '?')} images, {where}: "
        f"same decision {_same(par, precision)}, "
        f"max |prob diff| {_num(par.get('prob_max_abs_diff'), '.1e')}, "
        f"ROC AUC diff {_num(par.get('roc_auc_diff'), '.1e')}, "
        f"embedding cosine mean {_num(par.get('embedding_cosine_mean'), '.6f')}, "
        f"min {_num(par.get('embedding_cosine_min'), '.6f')}.{verdict}"
    )


def _data_counts(card: dict[str, Any]) -> tuple[Any, Any]:
    counts = (card.get("splits") or {}).get("counts") or {}
    images = (card.get("data") or {}).get("used")
    if images is None and counts:
        images = sum(c.get("images", 0) for c in counts.values())
    patients = sum(c.get("patients", 0) for c in counts.values()) if counts else None
    return images if images is not None else "?", patients if patients is not None else "?"


def _data_lines(card: dict[str, Any], n_images: Any, n_patients: Any) -> list[str]:
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


def _data_summary(card: dict[str, Any]) -> dict[str, Any]:
    data = dict(card.get("data") or {})
    splits = dict(card.get("splits") or {})
    return data | {"splits": splits}


def generalisation_lines(card: dict[str, Any], unseen: Sequence[dict[str, Any]]) -> list[str]:
    """## Generalisation: the held-out slices per source, the source probe, the downscale
    agreement and the leave-one-source-out figures, where the training recorded them."""
    out: list[str] = []
    holdout = (card.get("metrics") or {}).get("holdout") or {}
    rows = [
        f"| {k.removeprefix('source=')} | {v['n']} | {_num(v.get('roc_auc'), '.3f')} | "
        f"{_num(v.get('specificity'), '.3f')} | {_num(v.get('sensitivity'), '.3f')} |"
        for k, v in holdout.items()
        if k.startswith("source=")
    ]
    if rows:
        out += [
            "Held-out slice of the further sets (patients never trained on; the threshold above):",
            "",
            "| source | images | ROC AUC | specificity | sensitivity |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    groups = card.get("held_out_by_group") or {}
    if groups:
        out += [
            "Every labelled image not trained on (validation, test, held-out slices, excluded "
            "groups), per source and label, at the threshold above:",
            "",
            "| source:label | images | share right (specificity / sensitivity) |",
            "|---|---|---|",
            *[
                f"| {g} | {v['images']} | {v.get('specificity', v.get('sensitivity')):.3f} |"
                for g, v in groups.items()
            ],
            "",
        ]
    probe = card.get("source_probe") or {}
    prows = [
        f"| {k.removeprefix('label=')} | {', '.join(f'{s} {n}' for s, n in v['images'].items())} | "
        f"{_num(v.get('roc_auc'), '.3f')} | {_num(v.get('roc_auc_max'), '.3f')} |"
        for k, v in probe.items()
        if k.startswith("label=")
    ]
    if prows:
        out += [
            "Source probe (can a linear model on the embedding tell the source within one class? "
            f"0.5: no, 1: yes; {probe.get('images', 'images not trained on')}; "
            f"{probe.get('method', '')}):",
            "",
            "| label | images per source | mean ROC AUC | max ROC AUC |",
            "|---|---|---|---|",
            *prows,
            "",
        ]
    da = card.get("downscale_agreement") or {}
    if da:
        out += [
            f"Resolution: the {da['images']} test images screened at full size and downscaled to "
            f"{da['side']} px (cxr-train's size) get the same decision in "
            f"{_num(da.get('same_decision'), '.3f')} of cases; ROC AUC "
            f"{_num(da.get('roc_auc_full'), '.3f')} at full size, "
            f"{_num(da.get('roc_auc_downscaled'), '.3f')} downscaled; mean |prob diff| "
            f"{_num(da.get('mean_abs_prob_diff'), '.3f')}.",
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
            f"(`{run['run']}`, its own threshold {_num(run.get('threshold'), '.4f')}) scored "
            f"those images, never seen: {figures or 'nothing scored'} ({run['interval']}).",
            "",
        ]
    if not out:
        return []
    return ["## Generalisation", "", *out[:-1]]


def render(
    models_dir: Path,
    ev: dict,
    ev_shipped: dict | None,
    sc: dict | None,
    comparisons: Sequence[Comparison] = (),
    *,
    command: str | None = None,
    evidence: str | None = None,
    unseen: dict[str, list[dict[str, Any]]] | None = None,
    baseline: str | None = None,
) -> str:
    """The card. ev: evaluation of the FP32 reference on the test patients; ev_shipped: the
    same of the shipped export; sc: shortcut check of the FP32 reference; comparisons: other
    classifiers scored the same way; command: the command line that reproduces the card;
    evidence: where the repository keeps the JSON inputs; unseen: {column: [unseen_of(LOSO
    run), ...]} with column `release` (this classifier) or a comparison's name; baseline: the
    comparison the ship rule measures this classifier against."""
    unseen = unseen or {}
    names = {c.name for c in comparisons}
    for key in unseen:
        if key != "release" and key not in names:
            raise ConfigError(f"--unseen {key}=...: no --compare named {key!r} (or `release`)")
    if baseline is not None and baseline not in names:
        raise ConfigError(f"--baseline {baseline!r}: no --compare of that name")
    ms = load_models(models_dir, precision="auto")
    seg, clf = ms.segmenter, ms.classifier
    card = clf.card
    init = initialisation(card)
    n_images, n_patients = _data_counts(card)
    n_test = ev["overall"]["images"]
    training = card.get("training") or {}
    train_images = ((card.get("splits") or {}).get("counts") or {}).get("train", {}).get("images")
    out = [
        "# Model card: cxr-engine default models",
        "",
        f"Model id `{ms.model_id}`. Classifier: {clf.architecture} ({clf.precision}), "
        f"initialisation: {init}; segmenter: "
        f"{seg.architecture} ({seg.precision}). Decision threshold {clf.threshold:.4f}, chosen on "
        "the validation patients by maximising Youden's J (ties to the lower threshold).",
        "",
        "**Intended use:** research and retrospective screening of frontal chest X-rays for "
        "COVID-19 vs other findings, with a radiologist in the loop. **Not** a diagnostic device.",
        "",
        "## Data and splits",
        "",
        *_data_lines(card, n_images, n_patients),
        "",
        "```json",
        json.dumps(_data_summary(card), indent=1)[:4000],
        "```",
        "",
        *segmenter_section(models_dir),
        "",
        "## Classifier on the held-out test patients (FP32 reference)",
        "",
        "95% bootstrap intervals resample patients. The paper's numbers are from 2362 CXRs of four",
        f"hospitals; ours from {n_test} test images of one public collection: not comparable in "
        "kind.",
        "",
        *metrics_table(ev),
    ]
    if ev_shipped is not None:
        out += [
            "",
            f"## The same with the shipped {clf.precision} classifier",
            "",
            *metrics_table(ev_shipped),
        ]
    others = (p for p in ("fp16", "w8", "int8") if p != clf.precision)
    for precision in (clf.precision, *others):
        par = (card.get(precision) or {}).get("parity")
        if par:
            out += ["", parity_line(precision, par, shipped=precision == clf.precision)]
    ret = ev.get("retrieval", {}).get("overall")
    if ret:
        out += [
            "",
            "## Similar cases (embedding index)",
            "",
            f"precision@{ev['retrieval']['k']} of label agreement "
            f"{_num(ret.get('precision_at_k'), '.3f')} "
            f"(chance {_num(ret.get('chance_precision_at_k'), '.3f')}); another image of the "
            f"same patient in the top {ev['retrieval']['k']}: "
            f"{_num(ret.get('same_patient_hit_rate'), '.3f')} of "
            f"{ret.get('same_patient_queries')} queries (test patients only).",
        ]
    if sc is not None:
        out += [
            "",
            "## Does it look at the lungs? (shortcut check, test patients)",
            "",
            *shortcut_lines(sc),
        ]
    out += ["", *generalisation_lines(card, unseen.get("release", []))]
    if comparisons:
        cols = columns_of(f"this release ({clf.architecture})", ev, sc, card, comparisons, unseen)
        out += [
            "",
            "## Side by side",
            "",
            "Every classifier scored the same way: its FP32 export on the held-out test "
            "patients (95% patient-bootstrap intervals), its shortcut check, the source probe and "
            "downscale agreement its training recorded, and the unseen-source figures of its "
            "leave-one-source-out run (same recipe, one group never trained on; Wilson 95% "
            "intervals over images). n/a: not measured for that classifier.",
            "",
            *side_by_side(cols),
        ]
        if baseline is not None:
            out += ["", *ship_rule_lines(cols[0], next(c for c in cols if c.name == baseline))]
    for c in comparisons:
        out += ["", *comparison_section(ev, sc, clf.architecture, c)]
    trained_on = f"{train_images} training images" if train_images else "the training patients"
    minutes = training.get("seconds")
    took = f" in {minutes / 60:.0f} min" if isinstance(minutes, int | float) else ""
    out += [
        "",
        "## Known limits",
        "",
        "- Labels are confounded with source: every positive is from ieee8023 and half the "
        "negatives from NIH. Per-source metrics above; NIH has no positives, so its sensitivity "
        "is undefined.",
        f"- Tiny test set ({n_test} images): intervals are wide; expect lower performance on "
        "other hospitals' data.",
        "- ieee8023 images are often figures from papers (crops, arrows, letters, low "
        "resolution); negatives are other pneumonias, not healthy lungs.",
        f"- Trained on {trained_on}{took}, initialisation: {init}; the paper's ResNet50 was "
        "ImageNet-pretrained and trained on 2362 images.",
        "",
        "Caveats printed by `cxr evaluate`:",
        "",
        *[f"- {c}" for c in ev.get("caveats", [])],
    ]
    if command:
        kept = (
            f" Its inputs (the evaluation and shortcut JSONs) are kept in `{evidence}`."
            if evidence
            else ""
        )
        out += [
            "",
            "---",
            "",
            f"Every number above comes from code; this card was made by the command below.{kept}",
            "",
            "```",
            command,
            "```",
        ]
    return "\n".join(out) + "\n"


def unseen_runs(specs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """{NAME: [unseen_of(dir), ...]} of --unseen NAME=LOSO_DIR options."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        name, directory = parse_unseen(spec)
        out.setdefault(name, []).append(unseen_of(directory))
    return out


def card_command(
    ctx: typer.Context,
    models: Annotated[Path, typer.Option(help="Models directory the card is about.")],
    out: Annotated[Path, typer.Option(help="The card to write (MODEL_CARD.md).")],
    eval_json: Annotated[
        Path | None,
        typer.Option("--eval", help="Evaluation of the FP32 reference (test patients)."),
    ] = None,
    eval_shipped: Annotated[
        Path | None,
        typer.Option(
            "--eval-shipped", "--eval-int8", help="The same evaluation of the shipped export."
        ),
    ] = None,
    shortcut: Annotated[Path | None, typer.Option(help="The shortcut check's JSON.")] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=EVAL.json[,SHORTCUT.json][,MODELS_DIR]",
            help="Another classifier scored the same way (repeatable).",
        ),
    ] = None,
    evidence: Annotated[
        str | None, typer.Option(help="Where the repository keeps the JSON inputs (footer).")
    ] = None,
    unseen: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=LOSO_DIR",
            help="A leave-one-source-out run (`cxr train classifier --exclude-from-training`) "
            "of the recipe of `release` (this card's classifier) or of a --compare NAME "
            "(repeatable).",
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="The --compare NAME the ship rule measures this classifier against."),
    ] = None,
    segmenter_only: Annotated[
        bool,
        typer.Option(help="Re-render only the segmenter section of the existing card at --out."),
    ] = False,
) -> None:
    """Render a model card from the manifests, `cxr evaluate --json` and the shortcut check."""
    if segmenter_only:
        if eval_json or eval_shipped or shortcut or compare:
            raise typer.BadParameter(
                "--segmenter-only takes no --eval, --eval-shipped, --shortcut or --compare"
            )
        try:
            out.write_text(replace_segmenter_section(out.read_text(), models))
        except (OSError, ConfigError) as exc:
            raise typer.BadParameter(str(exc)) from None
        print(f"updated the segmenter section of {out}")
        return
    if eval_json is None:
        raise typer.BadParameter("--eval is required (or --segmenter-only)")
    try:
        ev = json.loads(eval_json.read_text())
        ev_shipped = json.loads(eval_shipped.read_text()) if eval_shipped else None
        sc = json.loads(shortcut.read_text()) if shortcut else None
        comparisons = [parse_compare(spec) for spec in compare or ()]
        runs = unseen_runs(unseen or ())
        text = render(
            models,
            ev,
            ev_shipped,
            sc,
            comparisons,
            command=command_line(ctx),
            evidence=evidence,
            unseen=runs,
            baseline=baseline,
        )
    except (OSError, ValueError, ConfigError) as exc:
        raise typer.BadParameter(str(exc)) from None
    out.write_text(text)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.eval.card ARGS`: the exit code of `cxr eval card ARGS`."""
    return run_script(card_command, argv, prog="python -m engine.eval.card")


if __name__ == "__main__":
    sys.exit(main())
