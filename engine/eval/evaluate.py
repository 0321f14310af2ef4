"""`cxr evaluate`: score a `cxr screen` output directory against labels.

    labels CSV --join--> prediction rows (status ok) --> metrics + patient-bootstrap CIs
                                                     --> per --by group, the same
                                                     --> retrieval quality of the index
                                                     --> caveats the reader must know

The decision of each row is the run's own (`decision` = prob >= the row's `threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.errors import ConfigError, EngineError
from engine.eval import metrics as m
from engine.eval.bootstrap import METHOD, Interval, cluster_bootstrap, patient_codes
from engine.eval.caveats import caveats
from engine.eval.labels import MatchCounts, match_predictions, read_labels
from engine.eval.retrieval import Retrieval, retrieval_quality
from engine.io import parquet
from engine.io.outdir import read_run_json

PREDICTION_COLUMNS = ["key", "source", "member", "status", "prob", "decision", "threshold"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    out: Path
    labels: Path
    images: Path | None = None  # default: the labels CSV's folder
    by: str | None = None
    report: Path | None = None
    seed: int = 0
    bootstrap: int = 2000
    k: int = 5

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be 0 (no intervals) or more, not {self.bootstrap}")
        if self.k < 1:
            raise ConfigError(f"-k must be at least 1, not {self.k}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, not {self.seed}")
        if self.by in ("path", "label"):
            raise ConfigError(f"--by {self.by}: choose a column that groups images, e.g. source")


@dataclass(frozen=True, slots=True)
class GroupScore:
    """Metrics of one set of images: the whole evaluation or one --by group."""

    name: str
    images: int
    patients: int
    positives: int
    negatives: int
    confusion: m.Confusion
    values: dict[str, float]  # METRICS -> value, nan where undefined
    intervals: dict[str, Interval]  # empty with --bootstrap 0
    calibration: m.Reliability

    def to_json(self) -> dict[str, Any]:
        c = self.confusion
        return {
            "images": self.images,
            "patients": self.patients,
            "positives": self.positives,
            "negatives": self.negatives,
            "confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn},
            "metrics": {name: self._metric_json(name) for name in m.METRICS},
            "calibration": _calibration_json(self.calibration),
        }

    def _metric_json(self, name: str) -> dict[str, Any]:
        value = self.values[name]
        ci = self.intervals.get(name)
        return {"value": value if np.isfinite(value) else None} | (
            {"ci95": ci.to_json()} if ci else {"ci95": None}
        )


def _calibration_json(r: m.Reliability) -> dict[str, Any]:
    def clean(a: np.ndarray) -> list[float | None]:
        return [float(v) if np.isfinite(v) else None for v in a]

    return {
        "ece": r.ece if np.isfinite(r.ece) else None,
        "binning": m.ECE_BINNING,
        "bins": [
            {"low": lo, "high": hi, "images": int(n), "mean_prob": p, "observed": o}
            for lo, hi, n, p, o in zip(
                clean(r.edges[:-1]),
                clean(r.edges[1:]),
                r.count,
                clean(r.mean_prob),
                clean(r.observed),
                strict=True,
            )
        ],
    }


@dataclass(slots=True)
class Evaluation:
    config: EvalConfig
    run: dict[str, Any]  # model id, trained, thresholds
    counts: MatchCounts
    overall: GroupScore
    groups: dict[str, GroupScore]
    retrieval: Retrieval | None
    caveats: list[str]
    rows: pl.DataFrame = field(repr=False)  # the evaluated rows (for plots)
    report_html: Path | None = None  # written when config.report is set

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "out": str(c.out),
            "labels": str(c.labels),
            "images_root": str(c.images or Path(c.labels).parent),
            "run": self.run,
            "counts": self.counts.to_json(),
            "settings": {
                "seed": c.seed,
                "bootstrap_resamples": c.bootstrap,
                "confidence_interval": METHOD,
                "ece_binning": m.ECE_BINNING,
                "k": c.k,
                "by": c.by,
            },
            "overall": self.overall.to_json(),
            "groups": {name: g.to_json() for name, g in self.groups.items()},
            "retrieval": self.retrieval.to_json() if self.retrieval else None,
            "caveats": self.caveats,
        }


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
