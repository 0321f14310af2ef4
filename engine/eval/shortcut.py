"""Shortcut-learning check: does the classifier look at the lungs, or at everything else?

DeGrave, Janizek & Lee (Nat. Mach. Intell. 2021) showed that COVID-19 CXR classifiers often
recognise the source hospital, text markers and borders instead of lung findings. This check
runs every labelled image through the engine's own pipeline three ways:

    as_is         Screener.preprocess -> Screener.infer (segment, lung box, crop, classify)
    lungs_masked  work image with the pixels inside the lung mask replaced by the image's median
                  outside it, cut with the SAME box as as_is, classified
    lungs_only    work image with the pixels outside the lung mask replaced by the median inside

and scores each with ROC AUC, overall and per source. A model that still separates the classes
with the lungs masked out has learnt something other than the lungs. It also scores a trivial
source detector: every image gets the share of the classifier's positives in its source.

The lung mask is Screener.infer's own `lung_mask` (segmenter logits >= logit_threshold of the
segmenter manifest's threshold, at the segmenter's resolution), upsampled to the work image
with nearest neighbour (pixel centres); crops use engine.stages.crop.classifier_crops (the
served crops, test-time ones included).

    python -m engine.eval.shortcut --models DIR --labels CSV [--images ROOT]
        [--splits CSV] [--split test] [--json]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import polars as pl
import typer

from engine import runtime
from engine.config import default_threads
from engine.console import fatal_errors, out_console, run_script
from engine.errors import ConfigError, EngineError
from engine.eval.bootstrap import METHOD, Interval, cluster_bootstrap, patient_codes
from engine.eval.labels import read_labels
from engine.eval.metrics import roc_auc
from engine.io.archive import ImageRef, Item, image_key
from engine.io.probe import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from engine.io.reader import prepare
from engine.models import load_models
from engine.pipeline import Preprocessed
from engine.screener import Screener
from engine.stages.base import Predictions
from engine.stages.classify import classify
from engine.stages.crop import classifier_crops
from engine.stages.segment import upsample_nearest

VARIANTS = ("as_is", "lungs_masked", "lungs_only")
SOURCE_SCORES = ("source_detector", "source_prior")
MASKING = (
    "lung mask = Screener.infer's lung_mask (segmenter logit >= logit_threshold(segmenter "
    "threshold)), upsampled to the work image by nearest neighbour at pixel centres; "
    "lungs_masked: pixels inside the mask := median of the work image outside it; lungs_only: "
    "pixels outside := median inside (an empty side uses the median of the whole image); both "
    "cut with the as_is lung box"
)
SOURCE_RULE = (
    "a source with both classes is scored within itself ('within source'); a source with one "
    "class ('vs positives elsewhere' / 'vs negatives elsewhere') is scored as its images against "
    "the images of the other class from all other sources"
)
DETECTOR = (
    "source_detector: each image scored by the share of classifier positives (as_is decision) "
    "in its source; source_prior: by the share of labelled positives in its source (the AUC "
    "a model that only recognises the source could reach)"
)


@dataclass(frozen=True, kw_only=True)
class ShortcutConfig:
    models: Path | None
    labels: Path
    images: Path | None = None  # default: the labels CSV's folder
    splits: Path | None = None  # default with split: MODELS/splits.csv (written by cxr train)
    split: str | None = None
    backend: str = "auto"
    decoder: str = "auto"
    precision: str = "auto"
    threshold: float | None = None
    batch_size: int = 16
    threads: int = field(default_factory=default_threads)
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.splits is not None and self.split is None:
            raise ConfigError("--splits needs --split NAME (e.g. --split test)")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be 0 (no intervals) or more, not {self.bootstrap}")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"--batch-size must be between 1 and 4096, not {self.batch_size}")


# ---------------------------------------------------------------------------------------------
# masking


def fill_region(work: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Copy of `work` (N, S, S) whose pixels in `region` take the median of those outside it."""
    out = work.copy()
    for img, reg, dst in zip(work, region, out, strict=True):
        rest = img[~reg]
        dst[reg] = np.median(rest if rest.size else img)
    return out


class MaskingScreener(Screener):
    """The engine's Screener, plus classifying an edited work image with a given lung box."""

    def classify_work(self, work: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        x = classifier_crops(work, boxes, self.models.classifier)  # its test-time crops too
        return classify(self._clf, self.models.classifier, x)[0]

    def variants(self, pre: Preprocessed) -> tuple[Predictions, dict[str, np.ndarray], np.ndarray]:
        """(as_is predictions, probability per variant, lung mask at the work resolution)."""
        preds = self.infer(pre)
        lung = upsample_nearest(preds.lung_mask, pre.work.shape[1])
        probs = {
            "as_is": preds.prob,
            "lungs_masked": self.classify_work(fill_region(pre.work, lung), preds.boxes),
            "lungs_only": self.classify_work(fill_region(pre.work, ~lung), preds.boxes),
        }
        return preds, probs, lung


# ---------------------------------------------------------------------------------------------
# images


def select_labels(cfg: ShortcutConfig) -> pl.DataFrame:
    """Label rows (read_labels with group = source), only those of --split when given."""
    labels = read_labels(cfg.labels, images=cfg.images, by="source")
    if cfg.split is None:
        return labels
    splits = cfg.splits or (Path(cfg.models) / "splits.csv" if cfg.models else None)
    if splits is None or not Path(splits).is_file():
        where = f"{splits} not found" if splits else "not given"
        raise ConfigError(
            f"--split {cfg.split}: splits CSV {where}; pass --splits CSV "
            "(columns path, split), e.g. the splits.csv `cxr train classifier` writes"
        )
    table = pl.read_csv(splits, infer_schema=False)
    if missing := {"path", "split"} - set(table.columns):
        raise ConfigError(f"{splits}: no column {', '.join(sorted(missing))}; need path, split")
    names = sorted(table["split"].drop_nulls().unique().to_list())
    if cfg.split not in names:
        raise ConfigError(f"{splits}: no split {cfg.split!r}; it has {', '.join(names)}")
    paths = table.filter(pl.col("split") == cfg.split)["path"].to_list()
    wanted = {os.path.normpath(p.strip().replace("\\", "/")) for p in paths}
    chosen = labels.filter(pl.col("_rel").is_in(list(wanted)))
    if chosen.height == 0:
        raise ConfigError(
            f"{splits}: none of its {len(wanted)} {cfg.split!r} paths is in {cfg.labels}; "
            "both must name images relative to the same folder"
        )
    return chosen


def read_items(paths: list[str]) -> Iterator[Item]:
    for p in paths:
        ref = ImageRef(key=image_key(p, None), source=p, member=None)
        try:
            yield Item(ref, Path(p).read_bytes(), None)
        except OSError as exc:
            yield Item(ref, None, f"cannot read: {exc.strerror or exc}")


@dataclass(slots=True)
class Scored:
    """Per labelled image that went through: row index, probabilities per variant, decision."""

    rows: list[int] = field(default_factory=list)
    probs: dict[str, list[np.ndarray]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    failed: dict[int, str] = field(default_factory=dict)  # row -> error
    empty_masks: int = 0


def score_images(screener: MaskingScreener, paths: list[str], batch_size: int) -> Scored:
    """Every path through the pipeline in batches; unreadable images land in `failed`."""
    out = Scored()
    for start in range(0, len(paths), batch_size):
        idx, samples = [], []
        for i, item in enumerate(read_items(paths[start : start + batch_size]), start):
            p = prepare(item, max_pixels=DEFAULT_MAX_PIXELS, min_side=DEFAULT_MIN_SIDE)
            if p.sample is None:
                out.failed[i] = p.row.error or ""
            else:
                idx.append(i)
                samples.append(p.sample)
        if not samples:
            continue
        pre = screener.preprocess(samples)
        out.failed.update({idx[j]: err for j, err in pre.errors.items()})
        if not pre.ok:
            continue
        preds, probs, _ = screener.variants(pre)
        out.rows.extend(idx[j] for j in pre.ok)
        out.empty_masks += int((~preds.lung_mask.any(axis=(1, 2))).sum())
        for v in VARIANTS:
            out.probs[v].append(probs[v])
    return out


# ---------------------------------------------------------------------------------------------
# scores


def source_share_scores(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each image's score: the mean of `values` over the images of its source (code)."""
    counts = np.bincount(codes)
    share = np.bincount(codes, weights=values.astype(np.float64)) / np.maximum(counts, 1)
    return share[codes]


def _aucs(
    y: np.ndarray, probs: dict[str, np.ndarray], decision: np.ndarray, src: np.ndarray
) -> dict[str, float]:
    out = {v: roc_auc(y, probs[v]) for v in VARIANTS}
    out["source_detector"] = roc_auc(y, source_share_scores(decision, src))
    out["source_prior"] = roc_auc(y, source_share_scores(y, src))
    return out


@dataclass(frozen=True, slots=True)
class GroupAUC:
    name: str
    comparison: str
    images: int
    patients: int
    positives: int
    values: dict[str, float]  # nan where undefined
    intervals: dict[str, Interval]

    def to_json(self) -> dict[str, Any]:
        def one(name: str) -> dict[str, Any]:
            value, ci = self.values[name], self.intervals.get(name)
            return {
                "value": value if np.isfinite(value) else None,
                "ci95": ci.to_json() if ci else None,
            }

        return {
            "comparison": self.comparison,
            "images": self.images,
            "patients": self.patients,
            "positives": self.positives,
            "negatives": self.images - self.positives,
            "auc": {name: one(name) for name in self.values},
        }


def group_auc(name: str, comparison: str, data: dict[str, np.ndarray], idx: np.ndarray,
              *, with_sources: bool, resamples: int, rng: np.random.Generator) -> GroupAUC:  # fmt: skip
    """AUCs (and patient-bootstrap CIs) of the images `idx` of `data`."""
    y, dec, src = data["label"][idx], data["decision"][idx], data["source"][idx]
    probs = {v: data[v][idx] for v in VARIANTS}

    def stat(i: np.ndarray) -> dict[str, float]:
        values = _aucs(y[i], {v: p[i] for v, p in probs.items()}, dec[i], src[i])
        return values if with_sources else {v: values[v] for v in VARIANTS}

    codes = patient_codes(data["patient"][idx].tolist())
    return GroupAUC(
        name=name,
        comparison=comparison,
        images=int(idx.size),
        patients=int(codes.max() + 1) if idx.size else 0,
        positives=int(y.sum()),
        values=stat(np.arange(idx.size)),
        intervals=cluster_bootstrap(stat, codes, resamples=resamples, rng=rng),
    )


def source_groups(y: np.ndarray, sources: np.ndarray) -> Iterator[tuple[str, str, np.ndarray]]:
    """(source, comparison, image indices) per source, by SOURCE_RULE."""
    for name in sorted(set(sources.tolist())):
        own = sources == name
        classes = set(y[own].tolist())
        if len(classes) == 2:
            yield name, "within source", np.flatnonzero(own)
            continue
        other = 1 - classes.pop()
        text = f"vs {('negatives', 'positives')[other]} elsewhere"
        yield name, text, np.flatnonzero(own | ((sources != name) & (y == other)))


# ---------------------------------------------------------------------------------------------
# the check


@dataclass(slots=True)
class ShortcutResult:
    config: ShortcutConfig
    run: dict[str, Any]
    counts: dict[str, int]
    overall: GroupAUC
    sources: list[GroupAUC]
    shares: dict[str, dict[str, float]]  # source -> images, positive_share, label_prevalence
    failed: list[dict[str, str]]
    rows: pl.DataFrame = field(repr=False)  # path, label, source, patient, prob per variant

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "labels": str(c.labels),
            "images_root": str(c.images or Path(c.labels).parent),
            "split": c.split,
            "run": self.run,
            "counts": self.counts,
            "settings": {
                "bootstrap_resamples": c.bootstrap,
                "seed": c.seed,
                "confidence_interval": METHOD,
                "masking": MASKING,
                "per_source": SOURCE_RULE,
                "source_scores": DETECTOR,
            },
            "overall": self.overall.to_json(),
            "sources": {g.name: g.to_json() for g in self.sources},
            "source_positive_share": self.shares,
            "verdict": verdict(self.overall),
            "failed": self.failed,
        }


def run_check(cfg: ShortcutConfig) -> ShortcutResult:
    labels = select_labels(cfg)
    models = load_models(cfg.models, precision=cfg.precision).with_threshold(cfg.threshold)
    screener = MaskingScreener(
        models,
        backend=cfg.backend,
        batch_size=cfg.batch_size,
        threads=cfg.threads,
        decoder=cfg.decoder,
    )
    try:
        scored = score_images(screener, labels["_abs"].to_list(), cfg.batch_size)
    finally:
        screener.close()
    if not scored.rows:
        raise EngineError(f"none of the {labels.height} selected images could be screened")
    kept = labels[scored.rows]
    probs = {v: np.concatenate(scored.probs[v]).astype(np.float64) for v in VARIANTS}
    data = {
        "label": kept["label"].to_numpy().astype(np.int64),
        "source": np.unique(kept["group"].to_numpy().astype(str), return_inverse=True)[1],
        "patient": kept["patient"].to_numpy().astype(str),
        "decision": probs["as_is"] >= models.classifier.threshold,
        **probs,
    }
    names = np.unique(kept["group"].to_numpy().astype(str))
    seeds = np.random.SeedSequence(cfg.seed).spawn(1 + len(names))
    everything = np.arange(kept.height)
    overall = group_auc("all", "all images", data, everything, with_sources=True,
                        resamples=cfg.bootstrap, rng=np.random.default_rng(seeds[0]))  # fmt: skip
    sources = [
        group_auc(
            name,
            text,
            data,
            idx,
            with_sources=False,
            resamples=cfg.bootstrap,
            rng=np.random.default_rng(seed),
        )  # fmt: skip
        for (name, text, idx), seed in zip(
            source_groups(data["label"], names[data["source"]]), seeds[1:], strict=True
        )
    ]
    shares = {
        str(name): {
            "images": int((data["source"] == k).sum()),
            "positive_share": float(data["decision"][data["source"] == k].mean()),
            "label_prevalence": float(data["label"][data["source"] == k].mean()),
        }
        for k, name in enumerate(names)
    }
    rows = kept.select("path", "label", pl.col("group").alias("source"), "patient").with_columns(
        *(pl.Series(v, probs[v]) for v in VARIANTS)
    )
    failed = [{"path": labels["path"][i], "error": e} for i, e in sorted(scored.failed.items())]
    counts = {
        "selected": labels.height,
        "scored": kept.height,
        "failed": len(failed),
        "empty_lung_masks": scored.empty_masks,
    }
    run = {
        "model_id": models.model_id,
        "trained": models.trained,
        "threshold": models.classifier.threshold,
        "backend": screener.backend_name,
    }
    return ShortcutResult(cfg, run, counts, overall, sources, shares, failed, rows)


def verdict(overall: GroupAUC) -> str:
    """One sentence on the lungs_masked AUC: a CI that excludes 0.5 means shortcuts."""
    value, ci = overall.values["lungs_masked"], overall.intervals.get("lungs_masked")
    if not np.isfinite(value):
        return "undefined: the selected images hold only one class"
    if ci is None or ci.valid == 0:
        return f"lungs-masked AUC {value:.3f} (no CI); far from 0.5 suggests shortcuts"
    where = f"AUC {value:.3f}, 95% CI {ci.low:.3f}-{ci.high:.3f}"
    if ci.low > 0.5 or ci.high < 0.5:
        return (
            f"SHORTCUTS: with the lungs masked out the model still separates the classes "
            f"({where}, excludes 0.5{'; inversely' if ci.high < 0.5 else ''})"
        )
    return f"no evidence of shortcuts from the lungs-masked AUC ({where} includes 0.5)"


# ---------------------------------------------------------------------------------------------
# command line


def _cell(g: GroupAUC, name: str) -> str:
    value, ci = g.values.get(name, float("nan")), g.intervals.get(name)
    if not np.isfinite(value):
        return "undefined"
    if ci is None or ci.valid == 0:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def print_tables(r: ShortcutResult) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="ROC AUC (95% CI, patient bootstrap)", title_justify="left")
    for col in ("group", "comparison", "images", "as is", "lungs masked", "lungs only"):
        t.add_column(col, justify="left" if col in ("group", "comparison") else "right")
    for g in (r.overall, *r.sources):
        t.add_row(
            escape(g.name), escape(g.comparison), str(g.images), *(_cell(g, v) for v in VARIANTS)
        )
    s = Table(title="source detectors (AUC) and positives per source", title_justify="left")
    for col in ("score / source", "value"):
        s.add_column(col)
    for name in SOURCE_SCORES:
        s.add_row(name, _cell(r.overall, name))
    for name, x in r.shares.items():
        s.add_row(
            escape(name),
            f"{x['images']} images, {x['positive_share']:.1%} called positive, "
            f"{x['label_prevalence']:.1%} labelled positive",
        )
    for table in (t, s):
        out_console.print(table)
    c = r.counts
    out_console.print(
        f"{c['scored']} of {c['selected']} images scored ({c['failed']} failed, "
        f"{c['empty_lung_masks']} with an empty lung mask); model {r.run['model_id']}"
        f"{'' if r.run['trained'] else ' (UNTRAINED)'}",
        highlight=False,
    )
    out_console.print(f"verdict: {escape(verdict(r.overall))}", highlight=False, soft_wrap=True)


def shortcut(
    labels: Annotated[Path, typer.Option(help="CSV: path, label, source[, patient_id].")],
    models: Annotated[
        Path | None, typer.Option(help="Models directory (default: shipped).")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="Root of the CSV's paths.")] = None,
    splits: Annotated[
        Path | None, typer.Option(help="CSV with path, split (default: MODELS/splits.csv).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only images of this split, e.g. test.")] = None,
    backend: Annotated[str, typer.Option(help=runtime.choices_text())] = "auto",
    decoder: Annotated[str, typer.Option(help="auto | dali | pillow | pillow-draft")] = "auto",
    threshold: Annotated[float | None, typer.Option(help="Decision threshold.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    bootstrap: Annotated[int, typer.Option(help="Patient resamples for CIs; 0: none.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Shortcut-learning check: AUC as is, with the lungs masked out, and lungs only."""
    with fatal_errors():
        cfg = ShortcutConfig(
            models=models, labels=labels, images=images, splits=splits, split=split,
            backend=backend, decoder=decoder, threshold=threshold, batch_size=batch_size,
            bootstrap=bootstrap, seed=seed,
        )  # fmt: skip
        result = run_check(cfg)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    else:
        print_tables(result)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.eval.shortcut ARGS`: the command's exit code."""
    return run_script(shortcut, argv, prog="python -m engine.eval.shortcut")


if __name__ == "__main__":
    sys.exit(main())
