"""What a reader of an evaluation must know before trusting its numbers.

Each check looks at the data actually evaluated and returns a sentence only when the problem is
there: untrained models, classes missing from a group, prevalence that differs between groups
(a model can then score by telling the groups apart), images left out, intervals that rest on
few patients or few valid resamples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from engine.eval.metrics import METRIC_LABELS, METRICS

if TYPE_CHECKING:
    from engine.eval.labels import MatchCounts
    from engine.eval.results import EvalConfig, GroupScore
    from engine.eval.retrieval import Retrieval

FEW_IMAGES = 30  # below this (or below FEW_PER_CLASS of a class) intervals are very wide
FEW_PER_CLASS = 10
PREVALENCE_GAP = 0.2  # groups whose positive share differs by more than this are confounded
VALID_SHARE = 0.9  # fewer valid resamples than this share: the interval is shaky


def caveats(
    config: EvalConfig,
    counts: MatchCounts,
    overall: GroupScore,
    groups: dict[str, GroupScore],
    retrieval: Retrieval | None,
    run: dict[str, Any],
    rows: pl.DataFrame,
) -> list[str]:
    notes: list[str] = []
    notes += _run_notes(run)
    notes += _coverage_notes(config, counts, rows)
    for score in (overall, *groups.values()):
        where = "overall" if score is overall else f"in {config.by} = {score.name}"
        notes += _class_notes(score, where)
        notes += _size_notes(score, where, config.bootstrap)
    notes += _confounding_notes(config.by, groups)
    notes += _retrieval_notes(retrieval, config.k)
    return notes


def _run_notes(run: dict[str, Any]) -> list[str]:
    notes = []
    if run.get("trained") is False:
        notes.append(
            "The classifier is UNTRAINED (random weights from `cxr models init`): its "
            "probabilities are meaningless and every metric here only tests the pipeline."
        )
    if len(run.get("thresholds", [])) > 1:
        notes.append(
            f"Rows were screened with different decision thresholds ({run['thresholds']}); "
            "each row's own decision is used, so the threshold metrics mix operating points."
        )
    return notes


def _coverage_notes(config: EvalConfig, counts: MatchCounts, rows: pl.DataFrame) -> list[str]:
    notes = []
    if counts.missing:
        notes.append(
            f"{counts.missing} of {counts.labelled} labelled images are not in the run "
            "(not screened, or their paths do not match): the metrics cover the others only."
        )
    if counts.errors:
        notes.append(
            f"{counts.errors} labelled images failed to screen (status 'error') and are "
            "excluded; if failures depend on the class, the metrics are biased."
        )
    if counts.ambiguous:
        notes.append(
            f"{counts.ambiguous} labelled images matched several prediction rows (the same "
            "image screened twice, or two label paths naming one image); one row each was used."
        )
    if not rows["patient_given"].all():
        missing = rows.height - int(rows["patient_given"].sum())
        notes.append(
            f"{missing} images have no patient_id and count as their own patient: if a patient "
            "contributes several images, the confidence intervals are too narrow."
        )
    if config.bootstrap == 0:
        notes.append("--bootstrap 0: no confidence intervals were computed.")
    return notes


def _class_notes(score: GroupScore, where: str) -> list[str]:
    undefined = [METRIC_LABELS[k] for k in METRICS if score.values[k] != score.values[k]]
    if score.positives and score.negatives:
        if not undefined:
            return []
        called = "positive" if score.confusion.tp + score.confusion.fp == 0 else "negative"
        return [f"Undefined {where}: {', '.join(undefined)}, because no image was called {called}."]
    present, absent = ("negative", "positive") if not score.positives else ("positive", "negative")
    return [
        f"All {score.images} images {where} are {present}: with no {absent} case, "
        f"{', '.join(undefined)} are undefined there, and nothing here measures how well "
        "the model tells the classes apart."
    ]


def _size_notes(score: GroupScore, where: str, resamples: int) -> list[str]:
    notes = []
    if score.images < FEW_IMAGES or 0 < min(score.positives, score.negatives) < FEW_PER_CLASS:
        notes.append(
            f"Only {score.images} images ({score.positives} positive, {score.negatives} "
            f"negative, {score.patients} patients) {where}: the intervals are wide."
        )
    shaky = [
        f"{name} ({score.intervals[name].valid}/{resamples})"
        for name in METRICS
        if name in score.intervals and 0 < score.intervals[name].valid < VALID_SHARE * resamples
    ]
    if shaky:
        notes.append(
            f"Many bootstrap resamples {where} drew one class only and were dropped for "
            f"{', '.join(shaky)}: those intervals rest on fewer resamples."
        )
    return notes


def _confounding_notes(by: str | None, groups: dict[str, GroupScore]) -> list[str]:
    if len(groups) < 2:
        return []
    share = {name: g.positives / g.images for name, g in groups.items() if g.images}
    if max(share.values()) - min(share.values()) <= PREVALENCE_GAP:
        return []
    listed = ", ".join(f"{name} {100 * p:.0f}%" for name, p in share.items())
    return [
        f"The share of positives differs between {by} groups ({listed}): a model can score "
        f"well overall just by telling the {by} groups apart. Read the per-group metrics."
    ]


def _retrieval_notes(retrieval: Retrieval | None, k: int) -> list[str]:
    if retrieval is None:
        return [
            "Retrieval quality was not measured: the run has no index.usearch holding at least "
            "two evaluated images (rerun `cxr screen` on the same --out to finish the index)."
        ]
    notes = []
    if retrieval.not_in_index:
        notes.append(
            f"{retrieval.not_in_index} evaluated images are missing from index.usearch and were "
            "left out of the retrieval figures."
        )
    if retrieval.neighbours < k:
        notes.append(
            f"Only {retrieval.overall.queries} images could be searched, so each query has "
            f"{retrieval.neighbours} neighbours, not k = {k}."
        )
    if retrieval.overall.same_patient_queries == 0:
        notes.append(
            "No patient has two or more evaluated images: the same-patient hit rate is undefined."
        )
    return notes
