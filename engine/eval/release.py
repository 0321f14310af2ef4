"""Ship a trained model in one command: pack, parity, test evaluation, shortcut check, card.

    python -m engine.eval.release --trained TRAINED_DIR --out engine/shipped_models \\
        --labels LABELS.csv --images ROOT --work WORKDIR [--classifier fp16|int8|fp16+int8] \\
        [--compare NAME=OTHER_TRAINED_DIR ...] [--evidence docs/model-eval]

(the same command as `cxr eval release ...`; `python -m` runs it through `main`.)

TRAINED_DIR is what `cxr train segmenter` + `cxr train classifier` wrote (FP32 exports, the INT8
variant, splits.csv). In WORKDIR, step by step:

    packed/                    engine.models.pack_models(TRAINED_DIR, classifier_precision=...),
                               with splits.csv (and segmenter_splits.csv) of TRAINED_DIR, and the
                               packed classifier's parity with the FP32 export recorded in its
                               card (engine.train.parity: every labelled image)
    parity-reference.json      the FP32 logit of every labelled image that parity was measured
                               against (tests re-measure the shipped export against it)
    test-labels.csv            the rows of LABELS.csv whose path splits.csv puts in "test"
    run-shipped/, run-fp32/    `cxr screen` of those images with the packed and the FP32 models
    eval-shipped.json,         `cxr evaluate --by source --json` of each run
    eval-fp32.json
    shortcut.json              the shortcut check of the FP32 models on the test split
    compare-NAME-*             per --compare: its test labels, run, eval and shortcut JSONs
    packed/MODEL_CARD.md       engine.eval.card.render of all of it, with this command line

Only when every step succeeded is packed/ installed into --out: the manifests, their ONNX files,
the splits and MODEL_CARD.md replace the old ones, and model files of the old release that the
new manifests do not name (e.g. classifier.int8.onnx after an fp16 release) are removed. Other
files in --out are left alone. --evidence DIR receives the eval, shortcut and parity-reference
JSONs (not the runs) so that the repository keeps the inputs of the card.

Needs the train extra (torch) for the parity step. `cxr` mounts the command, so this module
imports polars, the evaluation and the shortcut check only when a release runs.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from engine import runtime
from engine.config import ScreenConfig, default_threads
from engine.console import command_line, config_from_options, fatal_errors, run_script
from engine.errors import ConfigError
from engine.eval.card import render
from engine.eval.compare import (
    BaselineOption,
    Comparison,
    UnseenOption,
    comparison_from_models,
    parse_unseen,
    unseen_of,
)
from engine.models import (
    ROLES,
    load_manifest,
    load_models,
    manifest_path,
    pack_models,
    save_manifest,
)
from engine.train.data import log  # progress on stderr, one clock with engine.train.parity

MODULE = "engine.eval.release"
SPLITS_FILES = ("splits.csv", "segmenter_splits.csv")
CARD = "MODEL_CARD.md"
PARITY_REFERENCE = "parity-reference.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Model files of a release in --out: what the manifests do not name is stale and removed.
MODEL_FILES = ("classifier*.onnx", "segmenter*.onnx")
CLASSIFIER_PACKS = ("fp16", "int8", "fp16+int8")  # engine.models.pack_models
_C = TypeVar("_C", ScreenConfig, "ShortcutConfig")

if TYPE_CHECKING:
    from engine.eval.shortcut import ShortcutConfig


@dataclass(frozen=True, kw_only=True)
class ReleaseConfig:
    trained: Path
    out: Path
    labels: Path
    images: Path
    work: Path
    classifier: str = "fp16"  # fp16 | int8 | fp16+int8: the export(s) of the classifier that ship
    compare: tuple[tuple[str, Path], ...] = ()  # (name, another trained dir)
    # (release | a compare name, a leave-one-source-out run of that recipe)
    unseen: tuple[tuple[str, Path], ...] = ()
    baseline: str | None = None  # the compare name the ship rule measures the release against
    evidence: Path | None = None
    backend: str = "auto"
    decoder: str | None = None  # None: the default of `cxr screen` / the shortcut check
    threads: int = field(default_factory=default_threads)
    bootstrap: int = 2000
    seed: int = 0
    command: str | None = None  # the command line, for the card's footer

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIER_PACKS:
            raise ConfigError(
                f"--classifier must be {', '.join(CLASSIFIER_PACKS)}, not {self.classifier!r}"
            )
        for d in (self.trained, *(d for _, d in self.compare)):
            for name in ("classifier.json", "segmenter.json", "splits.csv"):
                if not (Path(d) / name).is_file():
                    raise ConfigError(
                        f"{d}: no {name}; pass a directory `cxr train classifier --out` wrote"
                    )
        names = [n for n, _ in self.compare]
        for n in names:
            if not NAME.match(n):
                raise ConfigError(
                    f"--compare {n!r}: the name must be letters, digits, '_', '.', '-' "
                    "(it names files)"
                )
        if len(set(names)) != len(names):
            raise ConfigError("--compare: each NAME once")
        for n, d in self.unseen:
            if n != "release" and n not in names:
                raise ConfigError(f"--unseen {n}={d}: no --compare named {n!r} (or `release`)")
            if not (Path(d) / "classifier.json").is_file() and not Path(d).is_file():
                raise ConfigError(
                    f"--unseen {n}={d}: neither a trained directory (classifier.json) nor the "
                    "unseen-*.json a release wrote"
                )
        if self.baseline is not None and self.baseline not in names:
            raise ConfigError(f"--baseline {self.baseline!r}: no --compare of that name")
        if not Path(self.labels).is_file():
            raise ConfigError(f"--labels {self.labels}: not a file")
        if not Path(self.images).is_dir():
            raise ConfigError(f"--images {self.images}: not a folder")
        work, out = Path(self.work).resolve(), Path(self.out).resolve()
        for d in (self.trained, *(d for _, d in self.compare)):
            if Path(d).resolve() in (work, out):
                raise ConfigError(f"{d}: --work and --out must differ from the trained dirs")
        if work == out or out.is_relative_to(work):
            raise ConfigError("--work must not be --out nor hold it")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be 0 or more, not {self.bootstrap}")


@dataclass(frozen=True, kw_only=True)
class ReleaseResult:
    out: Path
    card: Path
    model_id: str
    parity: dict[str, Any]
    files: dict[str, Path]  # evidence name -> path in WORKDIR
    removed: list[str]  # stale files removed from --out
    comparisons: list[Comparison]


# ---------------------------------------------------------------------------------------------
# steps


def pack(trained: Path, staging: Path, precision: str) -> None:
    """A fresh packed copy of `trained` in `staging`, with its splits files."""
    _fresh(staging)
    pack_models(trained, staging, classifier_precision=precision)
    for name in SPLITS_FILES:
        if (Path(trained) / name).is_file():
            shutil.copy2(Path(trained) / name, staging / name)


def data_paths_as_given(packed: Path, labels: Path, images: Path) -> list[str]:
    """The classifier card's data paths as the release command gave them, where they are the
    same files the trainer was given (its paths may be absolute ones of the training machine);
    returns the keys rewritten."""
    m = load_manifest(manifest_path(packed, "classifier"))
    data = dict(m.card.get("data") or {})
    changed = []
    for key, given in (("labels", labels), ("images", images)):
        recorded = data.get(key)
        if not isinstance(recorded, str) or recorded == str(given):
            continue
        try:
            same = os.path.samefile(recorded, given)
        except OSError:
            same = False
        if same:
            data[key] = str(given)
            changed.append(key)
    if changed:
        save_manifest(replace(m, card=dict(m.card) | {"data": data}), packed)
    return changed


def record_packed_parity(
    trained: Path,
    packed: Path,
    labels: Path,
    images: Path,
    threads: int,
    reference_json: Path | None = None,
) -> dict[str, Any]:
    """engine.train.parity on the packed classifier (and its variants), recorded in its card;
    returns the shipped export's. reference_json receives the FP32 logits per image."""
    from engine.train.parity import packed_parity, record_parity  # torch: the train extra

    pars = packed_parity(
        trained, packed, labels, images, threads=threads, reference_json=reference_json
    )
    m = record_parity(packed, pars)
    return pars[m.precision]


def _norm(p: str) -> str:
    return posixpath.normpath(p.strip().replace("\\", "/"))


def held_out_labels(labels: Path, splits: Path, dest: Path) -> Path:
    """The rows of `labels` whose path `splits` (path, split[, label]) puts in "test"."""
    import polars as pl

    table = pl.read_csv(labels, infer_schema=False)
    parts = pl.read_csv(splits, infer_schema=False)
    for csv, frame, need in (
        (labels, table, {"path", "label"}),
        (splits, parts, {"path", "split"}),
    ):
        if missing := need - set(frame.columns):
            raise ConfigError(f"{csv}: no column {', '.join(sorted(missing))}")
    test = parts.filter(pl.col("split") == "test").with_columns(
        pl.col("path").map_elements(_norm, return_dtype=pl.String).alias("_rel")
    )
    if test.height == 0:
        raise ConfigError(f"{splits}: no row with split 'test'")
    keys = test.select("_rel", *(["label"] if "label" in test.columns else []))
    rel = pl.col("path").map_elements(_norm, return_dtype=pl.String).alias("_rel")
    rows = table.with_columns(rel).join(keys, on="_rel", how="inner", suffix="_split")
    if rows.height != test.height:
        found = set(rows["_rel"].to_list())
        example = next(p for p in test["_rel"].to_list() if p not in found)
        raise ConfigError(
            f"{splits}: {test.height - rows.height} test path(s) are not in {labels} "
            f"(e.g. {example}); pass the labels CSV the models were trained on"
        )
    if "label_split" in rows.columns:
        bad = rows.filter(pl.col("label").str.strip_chars() != pl.col("label_split"))
        if bad.height:
            raise ConfigError(
                f"{splits} and {labels} disagree on the label of {bad.height} test image(s) "
                f"(e.g. {bad['path'][0]})"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows.select(table.columns).write_csv(dest)
    return dest


def screen_and_evaluate(
    cfg: ReleaseConfig, models: Path, precision: str, test_csv: Path, run: Path
) -> dict[str, Any]:
    """`cxr screen` the images of test_csv into a fresh `run`, then `cxr evaluate --by source`."""
    import polars as pl

    from engine.eval.evaluate import evaluate
    from engine.eval.results import EvalConfig
    from engine.runner import screen

    paths = pl.read_csv(test_csv, infer_schema=False)["path"].to_list()
    _fresh(run)
    log(f"screening {len(paths)} test images with {models} ({precision}) -> {run}")
    config = ScreenConfig(
        inputs=tuple(Path(cfg.images) / p for p in paths),
        out=run,
        models=models,
        precision=precision,
        backend=cfg.backend,
        threads=cfg.threads,
        progress=False,
    )
    summary = screen(_with_decoder(config, cfg.decoder))
    if summary.errors:
        log(f"warning: {summary.errors} of {len(paths)} images failed in {run}")
    result = evaluate(
        EvalConfig(
            out=run,
            labels=test_csv,
            images=cfg.images,
            by="source",
            bootstrap=cfg.bootstrap,
            seed=cfg.seed,
        )
    )
    return result.to_json()


def reference_precision(models: Path) -> str:
    """fp32 where the classifier has an FP32 export (a `cxr train` directory), else the one
    export it has (a packed release compared with a new one: its shipped export)."""
    m = load_manifest(manifest_path(models, "classifier"))
    return "fp32" if "fp32" in (m.precision, *m.variants) else m.precision


def shortcut_check(cfg: ReleaseConfig, models: Path) -> dict[str, Any]:
    """The shortcut check of the reference models (FP32 where there) of a dir on its test
    split."""
    from engine.eval.shortcut import ShortcutConfig, run_check

    precision = reference_precision(models)
    log(f"shortcut check of {models} ({precision}) on its test split")
    config = ShortcutConfig(
        models=models,
        labels=cfg.labels,
        images=cfg.images,
        splits=Path(models) / "splits.csv",
        split="test",
        precision=precision,
        backend=cfg.backend,
        threads=cfg.threads,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
    )
    return run_check(_with_decoder(config, cfg.decoder)).to_json()


def _with_decoder(config: _C, decoder: str | None) -> _C:
    """config with --decoder when given; else its own default (that of `cxr screen`)."""
    return config if decoder is None else replace(config, decoder=decoder)


def install(packed: Path, out: Path) -> list[str]:
    """Copy the packed release into `out`; remove the model files there that the new manifests
    do not name (and a segmenter_splits.csv the release lacks). Returns the removed names."""
    load_models(packed, precision="auto")  # refuse a broken staging copy before touching out
    out.mkdir(parents=True, exist_ok=True)
    keep: set[str] = set()
    for role in ROLES:
        m = load_manifest(manifest_path(packed, role), verify=False)
        keep |= {m.onnx, *(v.onnx for v in m.variants.values())}
    for name in sorted(keep):  # the ONNX files first, then the manifests that name them
        _copy(packed / name, out / name)
    for role in ROLES:
        _copy(manifest_path(packed, role), manifest_path(out, role))
    for name in (*SPLITS_FILES, CARD):
        if (packed / name).is_file():
            _copy(packed / name, out / name)
    removed = []
    stale = [p for pattern in MODEL_FILES for p in out.glob(pattern) if p.name not in keep]
    if not (packed / "segmenter_splits.csv").is_file():
        stale += [p for p in [out / "segmenter_splits.csv"] if p.is_file()]
    for p in sorted(set(stale)):
        p.unlink()
        removed.append(p.name)
    load_models(out, precision="auto")  # the installed release loads and verifies
    return removed


def copy_evidence(files: dict[str, Path], evidence: Path) -> None:
    """Copy the JSON inputs of the card to `evidence`; drop compare-* and unseen-* files of
    earlier releases that this one did not make."""
    evidence.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        _copy(path, evidence / name)
    for p in [*evidence.glob("compare-*.json"), *evidence.glob("unseen-*.json")]:
        if p.name not in files:
            log(f"removing {p}: not part of this release")
            p.unlink()


def release(cfg: ReleaseConfig) -> ReleaseResult:
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    packed = work / "packed"
    log(f"packing {cfg.trained} (classifier {cfg.classifier}) -> {packed}")
    pack(cfg.trained, packed, cfg.classifier)
    data_paths_as_given(packed, cfg.labels, cfg.images)
    log("parity of the packed classifier with the FP32 export")
    files: dict[str, Path] = {PARITY_REFERENCE: work / PARITY_REFERENCE}
    par = record_packed_parity(
        cfg.trained, packed, cfg.labels, cfg.images, cfg.threads, files[PARITY_REFERENCE]
    )
    log(
        f"parity: same decision {par['same_decision']:.4f}, ROC AUC diff {par['roc_auc_diff']}, "
        f"meets the bar: {par['meets_bar']}"
    )

    def save(name: str, data: dict[str, Any]) -> dict[str, Any]:
        path = work / name
        path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        files[name] = path
        return data

    test_csv = held_out_labels(
        cfg.labels, Path(cfg.trained) / "splits.csv", work / "test-labels.csv"
    )
    ev_shipped = save(
        "eval-shipped.json",
        screen_and_evaluate(cfg, packed, "auto", test_csv, work / "run-shipped"),
    )
    ev = save(
        "eval-fp32.json", screen_and_evaluate(cfg, cfg.trained, "fp32", test_csv, work / "run-fp32")
    )
    sc = save("shortcut.json", shortcut_check(cfg, cfg.trained))
    comparisons = []
    ref = load_models(cfg.trained, precision="fp32")
    for name, directory in cfg.compare:
        csv = work / f"compare-{name}-test-labels.csv"
        held_out_labels(cfg.labels, Path(directory) / "splits.csv", csv)
        c_ev = save(
            f"compare-{name}-eval.json",
            screen_and_evaluate(
                cfg, directory, reference_precision(directory), csv, work / f"run-compare-{name}"
            ),
        )
        c_sc = save(f"compare-{name}-shortcut.json", shortcut_check(cfg, directory))
        note = _differences(ref, directory, test_csv, csv)
        comparisons.append(comparison_from_models(name, directory, c_ev, c_sc, note=note))
    unseen: dict[str, list[dict[str, Any]]] = {}
    for i, (name, directory) in enumerate(cfg.unseen):
        unseen.setdefault(name, []).append(save(f"unseen-{name}-{i}.json", unseen_of(directory)))
    if cfg.evidence is not None:
        log(f"copying {len(files)} JSON files to {cfg.evidence}")
        copy_evidence(files, Path(cfg.evidence))
    card = packed / CARD
    card.write_text(
        render(
            packed,
            ev,
            ev_shipped,
            sc,
            comparisons,
            command=cfg.command,
            evidence=str(cfg.evidence) if cfg.evidence is not None else None,
            unseen=unseen,
            baseline=cfg.baseline,
        )
    )
    log(f"installing {packed} into {cfg.out}")
    removed = install(packed, Path(cfg.out))
    for name in removed:
        log(f"removed stale {Path(cfg.out) / name}")
    return ReleaseResult(
        out=Path(cfg.out),
        card=Path(cfg.out) / CARD,
        model_id=load_models(cfg.out, precision="auto").model_id,
        parity=par,
        files=files,
        removed=removed,
        comparisons=comparisons,
    )


def _differences(ref: Any, directory: Path, test_csv: Path, other_csv: Path) -> str | None:
    """A note when a comparison is not scored on the same test images or segmenter."""
    import polars as pl

    notes = []
    a = set(pl.read_csv(test_csv, infer_schema=False)["path"].to_list())
    b = set(pl.read_csv(other_csv, infer_schema=False)["path"].to_list())
    if a != b:
        notes.append(
            f"Its own splits.csv puts {len(b)} images in test ({len(a & b)} shared with the "
            f"shipped model's {len(a)}): the test sets differ."
        )
    seg = load_models(directory, precision="auto").segmenter
    if seg.sha256 != ref.segmenter.sha256:
        notes.append(
            f"It uses its own segmenter ({seg.architecture}@{seg.sha256[:8]}, the shipped one is "
            f"{ref.segmenter.architecture}@{ref.segmenter.sha256[:8]})."
        )
    return " ".join(notes) or None


def _fresh(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------
# command line


def _compare(spec: str) -> tuple[str, Path]:
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise typer.BadParameter(f"{spec!r}: expected NAME=TRAINED_DIR", param_hint="--compare")
    return name, Path(directory)


def release_command(
    ctx: typer.Context,
    trained: Annotated[Path, typer.Option(help="Trained models directory (FP32 exports).")],
    out: Annotated[Path, typer.Option(help="Where the release goes (e.g. engine/shipped_models).")],
    labels: Annotated[Path, typer.Option(help="Labels CSV of the training.")],
    images: Annotated[Path, typer.Option(help="Root of the CSV's paths.")],
    work: Annotated[Path, typer.Option(help="Scratch folder for the runs and JSONs.")],
    classifier: Annotated[
        str,
        typer.Option(
            help="fp16 | int8 | fp16+int8: the classifier export that ships (fp16+int8: the "
            "float16-stored one with the INT8 export beside it, for --precision auto)."
        ),
    ] = "fp16",
    compare: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=TRAINED_DIR",
            help="Another trained classifier to score the same way (repeatable).",
        ),
    ] = None,
    evidence: Annotated[
        Path | None, typer.Option(help="Copy the eval, shortcut and parity JSONs here.")
    ] = None,
    unseen: UnseenOption = None,
    baseline: BaselineOption = None,
    backend: Annotated[str, typer.Option(help=runtime.choices_text())] = "auto",
    decoder: Annotated[
        str | None, typer.Option(help="Preprocessing (default: that of `cxr screen`).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Patient bootstrap resamples for the CIs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Ship a trained model: pack, parity, test evaluation, shortcut check, model card."""
    try:
        cfg = config_from_options(
            ReleaseConfig,
            ctx,
            compare=tuple(_compare(spec) for spec in compare or ()),
            unseen=tuple(parse_unseen(spec) for spec in unseen or ()),
            threads=default_threads() if threads is None else threads,
            command=command_line(ctx),
        )
    except ConfigError as exc:  # a usage error (exit code 2), as the options are checked
        raise typer.BadParameter(str(exc)) from None
    with fatal_errors():
        result = release(cfg)
    text = result.card.read_text()
    sections = [s for s in text.split("\n## ") if s.startswith("Comparison: ")]
    for s in sections:
        print(f"## {s.rstrip()}\n")
    print(f"released {result.model_id} into {result.out} (card: {result.card})")
    par = result.parity
    print(
        f"parity with FP32: same decision {par['same_decision']:.4f}, ROC AUC diff "
        f"{par['roc_auc_diff']}, meets the bar: {par['meets_bar']}"
    )
    if result.removed:
        print(f"removed stale: {', '.join(result.removed)}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.eval.release ARGS`: the exit code of `cxr eval release ARGS`."""
    return run_script(release_command, argv, prog=f"python -m {MODULE}")


if __name__ == "__main__":
    sys.exit(main())
