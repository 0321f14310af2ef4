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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.console import command_line, run_script
from engine.errors import ConfigError
from engine.models import AUTO_MAX_AUC_DIFF, AUTO_MIN_SAME_DECISION, load_models, meets_parity_bar

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


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Another trained classifier scored the same way as the shipped one's FP32 reference."""

    name: str
    architecture: str
    initialisation: str
    eval: dict[str, Any]  # `cxr evaluate --json` (test patients, --by source)
    shortcut: dict[str, Any] | None = None  # `python -m engine.eval.shortcut --json`
    note: str | None = None  # e.g. that its test split differs from the shipped model's


def initialisation(card: dict[str, Any]) -> str:
    """How the classifier's weights started, as its training card says."""
    return str((card.get("training") or {}).get("initialisation") or "initialisation not recorded")


def comparison_from_models(
    name: str,
    models_dir: Path,
    ev: dict[str, Any],
    sc: dict[str, Any] | None = None,
    *,
    note: str | None = None,
) -> Comparison:
    """A Comparison whose architecture and initialisation come from its models' classifier."""
    clf = load_models(models_dir, precision="fp32").classifier
    return Comparison(
        name=name,
        architecture=clf.architecture,
        initialisation=initialisation(clf.card),
        eval=ev,
        shortcut=sc,
        note=note,
    )


def comparison_from_eval(name: str, ev: dict[str, Any], sc: dict[str, Any] | None) -> Comparison:
    """A Comparison without its models: architecture from the run's model id."""
    model_id = str((ev.get("run") or {}).get("model_id") or "")
    arch = model_id.split("@", 1)[0].rsplit("-", 1)[0] if "@" in model_id else "unknown"
    init = "initialisation not recorded"
    return Comparison(name=name, architecture=arch, initialisation=init, eval=ev, shortcut=sc)


COMPARED = (
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC"),
)
SHORTCUT_COMPARED = (
    ("as_is", "as is"),
    ("lungs_masked", "lungs masked"),
    ("source_prior", "source prior"),
)


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
    for group in [*groups, *(g for g in other if g not in groups)]:
        a, b = groups.get(group), other.get(group)
        suffix = "" if group == "all" else f" ({group})"
        for key, label in COMPARED:
            ca = _fmt(a["metrics"].get(key)) if a else "n/a"
            cb = _fmt(b["metrics"].get(key)) if b else "n/a"
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
        for key, label in SHORTCUT_COMPARED:
            ca = _fmt(sc["overall"]["auc"].get(key)) if sc else "n/a"
            cb = _fmt(c.shortcut["overall"]["auc"].get(key)) if c.shortcut else "n/a"
            lines.append(f"| shortcut ROC AUC, {label} | {ca} | {cb} |  |")
    out = [
        f"## Comparison: {c.name}",
        "",
        f"{c.name}: {c.architecture}, {c.initialisation}; model id "
        f"`{(c.eval.get('run') or {}).get('model_id')}`. Scored like the shipped model's FP32 "
        "reference: its FP32 export on the held-out test patients, by source; 95% patient "
        "bootstrap intervals.",
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


def render(
    models_dir: Path,
    ev: dict,
    ev_shipped: dict | None,
    sc: dict | None,
    comparisons: Sequence[Comparison] = (),
    *,
    command: str | None = None,
    evidence: str | None = None,
) -> str:
    """The card. ev: evaluation of the FP32 reference on the test patients; ev_shipped: the
    same of the shipped export; sc: shortcut check of the FP32 reference; comparisons: other
    classifiers scored the same way; command: the command line that reproduces the card;
    evidence: where the repository keeps the JSON inputs."""
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
        f"Public, de-identified CXRs from `../shared/data` (see its README): {n_images} images, "
        f"{n_patients} patients; COVID-19 positives all from the ieee8023 collection, negatives "
        "from ieee8023 (other pneumonias) and NIH ChestX-ray14 (no finding / pneumonia). Split by "
        "patient 70/15/15, stratified by label and source (`splits.csv`), shared by both models.",
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


def parse_compare(spec: str) -> Comparison:
    """NAME=EVAL.json[,SHORTCUT.json][,MODELS_DIR] (MODELS_DIR: for the architecture and
    initialisation of its classifier)."""
    name, sep, rest = spec.partition("=")
    parts = [Path(x) for x in rest.split(",") if x.strip()]
    if not sep or not name.strip() or not parts:
        raise ConfigError(
            f"--compare {spec!r}: expected NAME=EVAL.json[,SHORTCUT.json][,MODELS_DIR]"
        )
    dirs = [x for x in parts[1:] if x.is_dir()]
    files = [x for x in parts[1:] if not x.is_dir()]
    if len(dirs) > 1 or len(files) > 1:
        raise ConfigError(f"--compare {spec!r}: at most one SHORTCUT.json and one MODELS_DIR")
    try:
        ev = json.loads(parts[0].read_text())
        sc = json.loads(files[0].read_text()) if files else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--compare {spec!r}: {exc}") from None
    if dirs:
        return comparison_from_models(name.strip(), dirs[0], ev, sc)
    return comparison_from_eval(name.strip(), ev, sc)


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
    except (OSError, ValueError, ConfigError) as exc:
        raise typer.BadParameter(str(exc)) from None
    text = render(
        models,
        ev,
        ev_shipped,
        sc,
        comparisons,
        command=command_line(ctx),
        evidence=evidence,
    )
    out.write_text(text)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.eval.card ARGS`: the exit code of `cxr eval card ARGS`."""
    return run_script(card_command, argv, prog="python -m engine.eval.card")


if __name__ == "__main__":
    sys.exit(main())
