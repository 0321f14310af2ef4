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
from engine.eval.card_sections import (
    comparison_section,
    data_counts,
    data_lines,
    data_summary,
    generalisation_lines,
    metrics_table,
    num,
    parity_line,
    segmenter_section,
    shortcut_lines,
)
from engine.eval.compare import (
    BaselineOption,
    Comparison,
    UnseenOption,
    columns_of,
    initialisation,
    parse_compare,
    parse_unseen,
    ship_rule_lines,
    side_by_side,
    unseen_of,
)
from engine.models import ModelSet, load_manifest, load_models, manifest_path


def as_shipped(models_dir: Path) -> ModelSet:
    """The models as their manifests name them (the classifier's own export, not the variant
    `--precision auto` would pick on the CPU rendering the card): the card is the same on
    every machine."""
    clf = load_manifest(manifest_path(models_dir, "classifier"), verify=False)
    return load_models(models_dir, precision=clf.precision)


def replace_segmenter_section(text: str, models_dir: Path) -> str:
    """The card text with its "## Segmenter" section re-rendered; the rest unchanged. The card
    must be of the same models (its model id line), or ConfigError."""
    model_id = as_shipped(models_dir).model_id
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
    ms = as_shipped(models_dir)
    seg, clf = ms.segmenter, ms.classifier
    card = clf.card
    init = initialisation(card)
    n_images, n_patients = data_counts(card)
    n_test = ev["overall"]["images"]
    training = card.get("training") or {}
    train_images = ((card.get("splits") or {}).get("counts") or {}).get("train", {}).get("images")
    out = [
        "# Model card: cxr-engine default models",
        "",
        f"Model id `{ms.model_id}`. Classifier: {clf.architecture} ({clf.precision}), "
        f"initialisation: {init}; segmenter: "
        f"{seg.architecture} ({seg.precision}). Decision threshold {clf.threshold:.4f}, chosen on "
        "the validation patients by maximising Youden's J (ties to the lower threshold)."
        + _crops_sentence(clf),
        "",
        "**Intended use:** research and retrospective screening of frontal chest X-rays for "
        "COVID-19 vs other findings, with a radiologist in the loop. **Not** a diagnostic device.",
        "",
        "## Data and splits",
        "",
        *data_lines(card, n_images, n_patients),
        "",
        "```json",
        json.dumps(data_summary(card), indent=1)[:4000],
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
        ran = (ev_shipped.get("run") or {}).get("model_id") or ms.model_id
        out += [
            "",
            f"## The same with the shipped {clf.precision} classifier",
            "",
            f"As `cxr screen --precision auto` ran it where the release was made: `{ran}`.",
            "",
            *metrics_table(ev_shipped),
        ]
    others = (p for p in ("fp16", "w8", "int8") if p != clf.precision)
    for precision in (clf.precision, *others):
        par = (card.get(precision) or {}).get("parity")
        if par:
            shipped, beside = precision == clf.precision, precision in clf.variants
            out += ["", parity_line(precision, par, shipped=shipped, beside=beside)]
    ret = ev.get("retrieval", {}).get("overall")
    if ret:
        out += [
            "",
            "## Similar cases (embedding index)",
            "",
            f"precision@{ev['retrieval']['k']} of label agreement "
            f"{num(ret.get('precision_at_k'), '.3f')} "
            f"(chance {num(ret.get('chance_precision_at_k'), '.3f')}); another image of the "
            f"same patient in the top {ev['retrieval']['k']}: "
            f"{num(ret.get('same_patient_hit_rate'), '.3f')} of "
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
    unseen: UnseenOption = None,
    baseline: BaselineOption = None,
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
        ev = _read_json("--eval", eval_json)
        ev_shipped = _read_json("--eval-shipped", eval_shipped) if eval_shipped else None
        sc = _read_json("--shortcut", shortcut) if shortcut else None
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


def _read_json(option: str, path: Path) -> Any:
    """The JSON document at `path`; a ValueError that names the option and file if it is none."""
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{option} {path}: not JSON ({exc})") from None


def _crops_sentence(clf: Any) -> str:
    """What the classifier is served: one crop an image, or the mean over its test-time crops."""
    if not clf.tta:
        return ""
    return (
        f" Each image is scored as the mean logit (and embedding) over {len(clf.tta)} crops, "
        "its lung box moved and scaled by fixed draws of the box jitter the classifier was "
        "trained with (test-time crops, manifest `tta`); the threshold and every figure below "
        "are of that mean."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.eval.card ARGS`: the exit code of `cxr eval card ARGS`."""
    return run_script(card_command, argv, prog="python -m engine.eval.card")


if __name__ == "__main__":
    sys.exit(main())
