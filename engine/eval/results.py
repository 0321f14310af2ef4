"""What `cxr evaluate` is asked (EvalConfig) and what it finds (Evaluation, GroupScore).

A floor below evaluate.py, which computes them, and caveats.py, report.py and cli.py, which read
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.errors import ConfigError
from engine.eval import metrics as m
from engine.eval.bootstrap import METHOD, Interval
from engine.eval.labels import MatchCounts
from engine.eval.retrieval import Retrieval


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

    def shown(self, name: str) -> tuple[str, Interval | None]:
        """A metric as the terminal and the report show it: its value to 3 decimals (or
        "undefined") and its interval where one was drawn."""
        value = self.values[name]
        if value != value:  # nan
            return "undefined", None
        ci = self.intervals.get(name)
        return f"{value:.3f}", (ci if ci is not None and ci.valid else None)

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
