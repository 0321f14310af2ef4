"""`cxr evaluate`: score a `cxr screen` output directory against labels.

    labels CSV --join--> prediction rows (status ok) --> metrics + patient-bootstrap CIs
                                                     --> per --by group, the same
                                                     --> retrieval quality of the index
                                                     --> caveats the reader must know

The decision of each row is the run's own (`decision` = prob >= the row's `threshold`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.errors import ConfigError, EngineError
from engine.eval import metrics as m
from engine.eval.bootstrap import cluster_bootstrap, patient_codes
from engine.eval.caveats import caveats
from engine.eval.labels import MatchCounts, match_predictions, read_labels
from engine.eval.results import EvalConfig, Evaluation, GroupScore
from engine.eval.retrieval import retrieval_quality
from engine.io import parquet
from engine.io.outdir import read_run_json

PREDICTION_COLUMNS = ["key", "source", "member", "status", "prob", "decision", "threshold"]


def evaluate(config: EvalConfig) -> Evaluation:
    labels = read_labels(config.labels, images=config.images, by=config.by)
    preds = _read_predictions(config.out)
    joined, ambiguous = match_predictions(labels, preds)
    if joined.height == 0:
        raise _no_overlap(config, labels, preds)
    ok = joined.filter((pl.col("status") == "ok") & pl.col("prob").is_not_null())
    counts = MatchCounts(
        labelled=labels.height,
        found=joined.height,
        missing=labels.height - joined.height,
        ambiguous=ambiguous,
        errors=joined.height - ok.height,
        evaluated=ok.height,
        unlabelled=preds.height - joined.height,
    )
    if ok.height == 0:
        raise EngineError(
            f"{config.out}: all {joined.height} labelled images found have status 'error'; "
            "see their `error` column in predictions/ and fix or rescreen them"
        )
    seeds = np.random.SeedSequence(config.seed).spawn(
        1 + (ok["group"].n_unique() if config.by else 0)
    )
    overall = score_group(
        "all", ok, resamples=config.bootstrap, rng=np.random.default_rng(seeds[0])
    )
    groups = {}
    if config.by:
        names = sorted(ok["group"].unique().to_list())
        for name, seed in zip(names, seeds[1:], strict=True):
            part = ok.filter(pl.col("group") == name)
            groups[name] = score_group(
                name, part, resamples=config.bootstrap, rng=np.random.default_rng(seed)
            )
    retrieval = retrieval_quality(config.out, ok, k=config.k)
    run = _run_info(config.out, ok)
    notes = caveats(config, counts, overall, groups, retrieval, run, ok)
    result = Evaluation(config, run, counts, overall, groups, retrieval, notes, ok)
    if config.report is not None:
        from engine.eval.report import write_report  # matplotlib loads only for a report

        result.report_html = write_report(result, config.report)
    return result


def score_group(
    name: str, rows: pl.DataFrame, *, resamples: int, rng: np.random.Generator
) -> GroupScore:
    """Point metrics and patient-bootstrap intervals for `rows` (label, prob, decision, patient)."""
    y = rows["label"].to_numpy().astype(np.int64)
    prob = rows["prob"].to_numpy().astype(np.float64)
    decision = rows["decision"].to_numpy().astype(bool)
    codes = patient_codes(rows["patient"].to_list())
    intervals = cluster_bootstrap(
        lambda idx: m.all_metrics(y[idx], prob[idx], decision[idx]),
        codes,
        resamples=resamples,
        rng=rng,
    )
    return GroupScore(
        name=name,
        images=rows.height,
        patients=int(codes.max()) + 1,
        positives=int(y.sum()),
        negatives=int((1 - y).sum()),
        confusion=m.confusion(y, decision),
        values=m.all_metrics(y, prob, decision),
        intervals=intervals,
        calibration=m.reliability(y, prob),
    )


def _read_predictions(out: Path) -> pl.DataFrame:
    out = Path(out)
    if not parquet.list_parts(out):
        raise EngineError(
            f"{out}: no predictions/part-*.parquet; pass the --out directory of a finished "
            "`cxr screen` run"
        )
    try:
        return parquet.read_predictions(out, PREDICTION_COLUMNS)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise EngineError(f"{out}/predictions: cannot read ({exc}); rerun cxr screen") from None


def _no_overlap(config: EvalConfig, labels: pl.DataFrame, preds: pl.DataFrame) -> ConfigError:
    root = config.images or Path(config.labels).parent
    first_label = labels["_abs"][0]
    first_pred = preds["source"][0] if preds.height else "(none)"
    return ConfigError(
        f"none of the {labels.height} images in {config.labels} matches one of the "
        f"{preds.height} predictions in {config.out}: label paths are resolved against {root} "
        f"(e.g. {first_label}) but the run screened e.g. {first_pred}. Pass --images with "
        "the folder the CSV paths are relative to, or the labels of this run"
    )


def _run_info(out: Path, ok: pl.DataFrame) -> dict[str, Any]:
    record = read_run_json(out) or {}
    models = record.get("models", {})
    classifier = models.get("classifier", {})
    return {
        "run_id": record.get("run_id"),
        "model_id": models.get("model_id"),
        "trained": classifier.get("trained"),
        "thresholds": sorted({round(float(t), 6) for t in ok["threshold"].drop_nulls().to_list()}),
    }
