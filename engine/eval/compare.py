"""Classifiers side by side: the model card's comparison sections, one table of every candidate,
the leave-one-source-out figures and the ship rule.

A column is a classifier scored the same way as the release: its FP32 export screened on the
held-out test patients (`cxr evaluate --json --by source`), its shortcut check, the
generalisation measurements its training recorded in its card (source probe, downscale
agreement) and, where a leave-one-source-out run of the same recipe exists, how that run
scored the source it never saw (`unseen`, `--exclude-from-training` of `cxr train classifier`).

The ship rule (issue 14) compares the release with a baseline column: better internal test ROC
AUC, better ROC AUC on the ieee8023 test images (COVID-19 against other pneumonias of one
collection), unseen-source specificity no worse, and a lungs-masked-out ROC AUC no better
(no further from 0.5). Every figure comes from the JSON files; nothing is typed in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.errors import ConfigError
from engine.models import load_models

PAPER = {"accuracy": 0.897, "sensitivity": 0.871, "roc_auc": 0.95, "pr_auc": 0.94}
SAME_SOURCE = "ieee8023"  # the one collection with both classes: COVID-19 vs other pneumonias


def fmt_metric(m: dict[str, Any] | None) -> str:
    """value [low, high] of a `cxr evaluate` metric; "undefined" when it has no value."""
    if not m or m.get("value") is None:
        return "undefined"
    ci = m.get("ci95") or {}
    if ci.get("low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Another trained classifier scored the same way as the shipped one's FP32 reference."""

    name: str
    architecture: str
    initialisation: str
    eval: dict[str, Any]  # `cxr evaluate --json` (test patients, --by source)
    shortcut: dict[str, Any] | None = None  # `python -m engine.eval.shortcut --json`
    note: str | None = None  # e.g. that its test split differs from the shipped model's
    card: dict[str, Any] | None = None  # its classifier's card (training, source probe, ...)
    unseen: tuple[dict[str, Any], ...] = field(default=())  # unseen_of() of its LOSO runs


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
    """A Comparison whose architecture, initialisation and card come from its classifier."""
    clf = load_models(models_dir, precision="auto").classifier
    return Comparison(
        name=name,
        architecture=clf.architecture,
        initialisation=initialisation(clf.card),
        eval=ev,
        shortcut=sc,
        note=note,
        card=dict(clf.card),
    )


def comparison_from_eval(name: str, ev: dict[str, Any], sc: dict[str, Any] | None) -> Comparison:
    """A Comparison without its models: architecture from the run's model id."""
    model_id = str((ev.get("run") or {}).get("model_id") or "")
    arch = model_id.split("@", 1)[0].rsplit("-", 1)[0] if "@" in model_id else "unknown"
    init = "initialisation not recorded"
    return Comparison(name=name, architecture=arch, initialisation=init, eval=ev, shortcut=sc)


def parse_compare(spec: str) -> Comparison:
    """NAME=EVAL.json[,SHORTCUT.json][,MODELS_DIR] (MODELS_DIR: for the architecture,
    initialisation and card of its classifier)."""
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


# --- leave one source out -------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score 95% interval of k successes in n (None for n = 0)."""
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def unseen_of(loso_dir: Path) -> dict[str, Any]:
    """What a leave-one-source-out run (`cxr train classifier --exclude-from-training ...`)
    recorded about the groups it never trained on: per excluded SOURCE:LABEL, the share called
    negative (label 0: specificity) or positive (label 1: sensitivity) at its own threshold.
    loso_dir may also be the JSON this function returned, as a release keeps it (unseen-*.json)."""
    if Path(loso_dir).is_file():
        try:
            kept = json.loads(Path(loso_dir).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{loso_dir}: {exc}") from None
        if not isinstance(kept, dict) or not {"run", "excluded", "groups"} <= set(kept):
            raise ConfigError(f"{loso_dir}: not an unseen-*.json of a release")
        return kept
    path = Path(loso_dir) / "classifier.json"
    try:
        card = json.loads(path.read_text())["card"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: not a trained classifier manifest ({exc})") from None
    excluded = list((card.get("data") or {}).get("excluded_from_training") or [])
    if not excluded:
        raise ConfigError(
            f"{path}: the run excluded no group from training (no --exclude-from-training)"
        )
    unseen = (card.get("metrics") or {}).get("unseen") or {}
    groups = []
    for g in excluded:
        source, _, label = g.rpartition(":")
        m = unseen.get(f"source={source}")
        if m is None:
            continue
        key, n = ("specificity", m["n_neg"]) if label == "0" else ("sensitivity", m["n_pos"])
        value = m.get(key)
        k = round(value * n) if value is not None else 0
        groups.append(
            {
                "group": g,
                "metric": key,
                "value": value,
                "images": n,
                "ci95": wilson(k, n) if value is not None else None,
                "roc_auc": m.get("roc_auc"),
            }
        )
    return {
        "run": str(loso_dir),
        "architecture": json.loads(path.read_text()).get("architecture"),
        "excluded": excluded,
        "threshold": card.get("threshold"),
        "groups": groups,
        "interval": "Wilson score 95% interval over images",
    }


# The options of `cxr eval release` and `cxr eval card` that feed the side-by-side table.
UnseenOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NAME=LOSO_DIR",
        help="A leave-one-source-out run (`cxr train classifier --exclude-from-training`) of "
        "the recipe of `release` (the card's own classifier) or of a --compare NAME; a release "
        "keeps it as unseen-NAME-i.json (repeatable).",
    ),
]
BaselineOption = Annotated[
    str | None,
    typer.Option(help="The --compare NAME the ship rule measures the card's classifier against."),
]


def parse_unseen(spec: str) -> tuple[str, Path]:
    """NAME=LOSO_TRAINED_DIR; NAME is `release` (the card's own classifier) or a --compare NAME."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(f"--unseen {spec!r}: expected NAME=LOSO_TRAINED_DIR")
    return name.strip(), Path(rest.strip())


# --- one table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    eval: dict[str, Any]
    shortcut: dict[str, Any] | None
    card: dict[str, Any] | None
    unseen: tuple[dict[str, Any], ...]


def columns_of(
    release_name: str,
    ev: dict[str, Any],
    sc: dict[str, Any] | None,
    card: dict[str, Any],
    comparisons: Sequence[Comparison],
    unseen: dict[str, list[dict[str, Any]]],
) -> list[Column]:
    own = Column(release_name, ev, sc, card, tuple(unseen.get("release", ())))
    return [own] + [
        Column(c.name, c.eval, c.shortcut, c.card, c.unseen + tuple(unseen.get(c.name, ())))
        for c in comparisons
    ]


def _group(ev: dict[str, Any], group: str) -> dict[str, Any] | None:
    return ev["overall"] if group == "all" else (ev.get("groups") or {}).get(group)


def _metric(col: Column, group: str, key: str) -> dict[str, Any] | None:
    g = _group(col.eval, group)
    return None if g is None else g["metrics"].get(key)


def _value(m: dict[str, Any] | None) -> float | None:
    return None if not m else m.get("value")


def _num(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _probe(col: Column, label: int) -> str:
    p = ((col.card or {}).get("source_probe") or {}).get(f"label={label}")
    if not p or p.get("roc_auc") is None:
        return "n/a"
    return f"{p['roc_auc']:.3f} (max {p['roc_auc_max']:.3f}; {sum(p['images'].values())} images)"


def _unseen_cell(col: Column, group: str) -> str:
    for run in col.unseen:
        for g in run["groups"]:
            if g["group"] == group and g["value"] is not None:
                ci = g["ci95"]
                return f"{g['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] of {g['images']}"
    return "n/a"


def _held_cell(col: Column, group: str) -> str:
    g = ((col.card or {}).get("held_out_by_group") or {}).get(group)
    if not g:
        return "n/a"
    value = g.get("specificity", g.get("sensitivity"))
    return f"{value:.3f} of {g['images']}"


def _training_images(card: dict[str, Any]) -> int | None:
    """Images trained on: the sum over groups (several sets), else the split's train count."""
    counts = (card.get("data") or {}).get("train_counts")
    if counts:
        return int(sum(counts.values()))
    return ((card.get("splits") or {}).get("counts") or {}).get("train", {}).get("images")


def side_by_side(columns: Sequence[Column]) -> list[str]:
    """One table: every column's internal test metrics (patient-bootstrap CIs), per source,
    the shortcut figures, the source probe, the downscale agreement, its scores on the labelled
    images it was not trained on per source and label (`held_out_by_group` of its card), and the
    unseen-source figures of its leave-one-source-out runs."""
    lines = [
        "| | " + " | ".join(c.name for c in columns) + " | paper |",
        "|---" * (len(columns) + 2) + "|",
    ]

    def row(label: str, cells: Sequence[str], paper: str = "") -> None:
        if any(c not in ("n/a", "undefined") for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper} |")

    for key, label in (
        ("roc_auc", "test ROC AUC"),
        ("pr_auc", "test PR AUC"),
        ("accuracy", "test accuracy"),
        ("sensitivity", "test sensitivity"),
        ("specificity", "test specificity"),
    ):
        paper = f"{PAPER[key]:.3f}" if key in PAPER else ""
        row(label, [fmt_metric(_metric(c, "all", key)) for c in columns], paper)
    groups: list[str] = []
    for c in columns:
        groups += [g for g in (c.eval.get("groups") or {}) if g not in groups]
    for g in groups:
        for key, label in (
            ("roc_auc", "ROC AUC"),
            ("sensitivity", "sens."),
            ("specificity", "spec."),
        ):
            row(f"{g}: {label}", [fmt_metric(_metric(c, g, key)) for c in columns])
    row(
        "test images (patients)",
        [f"{c.eval['overall']['images']} ({c.eval['overall']['patients']})" for c in columns],
        "723",
    )
    for key, label in (("lungs_masked", "lungs masked out"), ("source_prior", "source prior")):
        row(
            f"shortcut ROC AUC, {label}",
            [
                fmt_metric((c.shortcut or {}).get("overall", {}).get("auc", {}).get(key))
                for c in columns
            ],
        )
    row("source probe ROC AUC, negatives", [_probe(c, 0) for c in columns])
    row("source probe ROC AUC, positives", [_probe(c, 1) for c in columns])
    da = [(c.card or {}).get("downscale_agreement") or {} for c in columns]
    row("224 px vs full size: same decision", [_num(d.get("same_decision")) for d in da])
    row(
        "224 px vs full size: ROC AUC",
        [
            f"{_num(d.get('roc_auc_downscaled'))} vs {_num(d.get('roc_auc_full'))}" if d else "n/a"
            for d in da
        ],
    )
    held: list[str] = []
    for c in columns:
        held += [g for g in (c.card or {}).get("held_out_by_group") or {} if g not in held]
    for g in held:
        source, _, label = g.rpartition(":")
        what = "specificity" if label == "0" else "sensitivity"
        row(
            f"not trained on, {source} (label {label}): {what}", [_held_cell(c, g) for c in columns]
        )
    excluded: list[str] = []
    for c in columns:
        for run in c.unseen:
            excluded += [g["group"] for g in run["groups"] if g["group"] not in excluded]
    for g in excluded:
        source, _, label = g.rpartition(":")
        what = "specificity" if label == "0" else "sensitivity"
        row(f"unseen {source} (label {label}): {what}", [_unseen_cell(c, g) for c in columns])
    row("training images", [_num(_training_images(c.card or {}), "d") for c in columns])
    return lines


# --- the ship rule ----------------------------------------------------------------------------


def _unseen_values(col: Column) -> dict[str, float]:
    return {
        g["group"]: g["value"]
        for run in col.unseen
        for g in run["groups"]
        if g["metric"] == "specificity" and g["value"] is not None
    }


def ship_rule(release: Column, baseline: Column) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed (None: cannot tell), the figures) for each part of the ship rule."""
    out: list[tuple[str, bool | None, str]] = []

    def better(label: str, a: float | None, b: float | None) -> None:
        ok = None if a is None or b is None else a > b
        out.append((label, ok, f"{_num(a)} vs {_num(b)}"))

    better(
        "internal test ROC AUC higher",
        _value(_metric(release, "all", "roc_auc")),
        _value(_metric(baseline, "all", "roc_auc")),
    )
    better(
        f"{SAME_SOURCE} test ROC AUC higher",
        _value(_metric(release, SAME_SOURCE, "roc_auc")),
        _value(_metric(baseline, SAME_SOURCE, "roc_auc")),
    )
    mine, theirs = _unseen_values(release), _unseen_values(baseline)
    shared = sorted(set(mine) & set(theirs))
    if shared:
        same: bool | None = all(mine[g] >= theirs[g] for g in shared)
        figures = "; ".join(f"{g}: {mine[g]:.3f} vs {theirs[g]:.3f}" for g in shared)
        out.append(("unseen-source specificity no worse", same, figures))
    else:
        out.append(
            ("unseen-source specificity no worse", None, "no shared leave-one-source-out run")
        )

    def masked(col: Column) -> float | None:
        return _value(
            ((col.shortcut or {}).get("overall") or {}).get("auc", {}).get("lungs_masked")
        )

    a, b = masked(release), masked(baseline)
    closer = None if a is None or b is None else abs(a - 0.5) <= abs(b - 0.5)
    out.append(("lungs-masked-out ROC AUC no further from 0.5", closer, f"{_num(a)} vs {_num(b)}"))
    return out


def ship_rule_lines(release: Column, baseline: Column) -> list[str]:
    checks = ship_rule(release, baseline)
    verdict = all(ok is True for _, ok, _ in checks)
    mark = {True: "yes", False: "NO", None: "cannot tell"}
    return [
        f"Ship rule, {release.name} against {baseline.name}: "
        + ("**met**" if verdict else "**not met**"),
        "",
        "| criterion | met | figures (release vs baseline) |",
        "|---|---|---|",
        *[f"| {label} | {mark[ok]} | {figures} |" for label, ok, figures in checks],
    ]
