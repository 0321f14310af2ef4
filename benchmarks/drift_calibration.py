"""Calibrate the nightly drift thresholds (engine/drift.py) on the real data.

Five "nights" are screened, in this order, into one output directory, as a nightly job over a
growing folder would (each run names every folder so far; earlier images are skipped):

    dev              the 288 cxr-dev images: the first run, hence the reference
    dev-rescreen     the same 288 files copied to a new folder: an unshifted night (same images)
    radiography-db   a seeded sample of cxr-train's radiography-db images (other hospitals,
                     224 px, other processing): a new site / scanner
    nih-chestxray14  a seeded sample of cxr-train's NIH images (a source dev has 70 of, here
                     downsampled to 224 px): a partial shift
    dev-inverted     a seeded sample of dev images with inverted grey levels (a MONOCHROME1 file
                     read as MONOCHROME2): a new protocol, synthetic

Each run records its drift against the first (run.json); those records are one result line
each ("kind": "night"). Then, from the screened probabilities and index vectors, without
screening again:

    null             dev split by patient into two halves, one the reference and a sample of n
                     images of the other the night, over --draws seeded splits: how large each
                     measure gets when nothing changed (a conservative null: the reference has
                     half the images)
    shifted          the full dev as reference, seeded samples of n images of each shifted set

One line per (scenario, n): quantiles of every measure, and how often the engine's current
default thresholds flag it (PSI and the rate change also have to pass their noise limit, see
engine/drift.py). A last line ("kind": "null_max") gives the null's largest value of each
measure at n = min_images over all draws, rounded up: a threshold below it would have raised
a false alarm in this experiment.

    python -m benchmarks.drift_calibration [--data ../shared/data] [--work /tmp/cxr-drift]
        [--per-source 150] [--draws 200] [--models DIR] [--analyse-only]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, append_jsonl, default_data_dir, header

SIZES = (30, 50, 100, 200)
QUANTILES = (0.0, 0.01, 0.05, 0.5, 0.95, 0.99, 1.0)
MEASURES = ("psi", "positive_rate_change", "embedding_shift", "ood_share")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir().parent)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cxr-drift"))
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--per-source", type=int, default=150)
    ap.add_argument("--inverted", type=int, default=100)
    ap.add_argument("--dev-images", type=int, default=None, help="only the first N (for tests)")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "drift_calibration.jsonl")
    ap.add_argument(
        "--analyse-only", action="store_true", help="reuse --work's screened output as it is"
    )
    args = ap.parse_args(argv)
    run_id = uuid.uuid4().hex[:12]
    base = header("drift_calibration", run_id)
    out = args.work / "out"
    nights = prepare_nights(args) if not args.analyse_only else night_dirs(args.work)
    if not args.analyse_only:
        for name, folder in nights:
            record = screen_night(
                args, out, [f for _, f in nights[: nights.index((name, folder)) + 1]]
            )
            line = {**base, "kind": "night", "night": name, **record}
            append_jsonl(args.out, line)
            print(
                f"{name}: {record['images']} images, {record['images_per_s']:.1f} img/s, drift {record['drift'].get('status')} {record['drift'].get('flagged')}",
                file=sys.stderr,
            )
    analyse(args, out, nights, base)
    return 0


# ---------------------------------------------------------------------------------------------
# the nights


def night_dirs(work: Path) -> list[tuple[str, Path]]:
    names = ("dev-rescreen", "radiography-db", "nih-chestxray14", "dev-inverted")
    dev = Path((work / "dev-source").read_text().strip())
    return [("dev", dev)] + [(n, (work / "nights" / n).resolve()) for n in names]


def prepare_nights(args: argparse.Namespace) -> list[tuple[str, Path]]:
    from PIL import Image

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    nights = work / "nights"
    dev = (args.data / "cxr-dev" / "images").resolve()
    (work / "dev-source").parent.mkdir(parents=True, exist_ok=True)
    (work / "dev-source").write_text(str(dev) + "\n")
    dev_images = sorted(p for p in dev.iterdir() if p.suffix in (".png", ".jpg"))
    if args.dev_images:
        dev_images = dev_images[: args.dev_images]
        dev = work / "nights" / "dev"
        dev.mkdir(parents=True)
        for p in dev_images:
            shutil.copyfile(p, dev / p.name)
        (work / "dev-source").write_text(str(dev.resolve()) + "\n")
    copy = nights / "dev-rescreen"
    copy.mkdir(parents=True)
    for p in dev_images:
        shutil.copyfile(p, copy / p.name)
    with open(args.data / "cxr-train" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for source in ("radiography-db", "nih-chestxray14"):
        paths = sorted(r["path"] for r in rows if r["source"] == source)
        chosen = random.Random(f"{args.seed}:{source}").sample(paths, args.per_source)
        folder = nights / source
        folder.mkdir(parents=True)
        for rel in chosen:
            shutil.copyfile(args.data / "cxr-train" / rel, folder / Path(rel).name)
    inverted = nights / "dev-inverted"
    inverted.mkdir(parents=True)
    for p in random.Random(f"{args.seed}:inverted").sample(dev_images, args.inverted):
        with Image.open(p) as im:
            g = np.asarray(im.convert("L"))
        Image.fromarray(255 - g).save(inverted / f"{p.stem}-inverted.png")
    return night_dirs(work)


def screen_night(args: argparse.Namespace, out: Path, inputs: list[Path]) -> dict[str, Any]:
    from engine.config import ScreenConfig
    from engine.runner import screen

    config = ScreenConfig(
        inputs=tuple(inputs),
        out=out,
        models=args.models,
        batch_size=args.batch_size,
        progress=False,
    )
    s = screen(config)
    return {
        "images": s.processed,
        "skipped": s.skipped_existing,
        "errors": s.errors,
        "positives": s.positives,
        "wall_s": s.wall_s,
        "images_per_s": s.images_per_s,
        "model_id": s.model_id,
        "drift": s.drift,
        "changes": {k: s.changes.get(k) for k in ("checked", "changed", "vanished")},
    }


# ---------------------------------------------------------------------------------------------
# analysis


def load_sets(out: Path, nights: list[tuple[str, Path]]) -> tuple[dict[str, dict[str, Any]], float]:
    """Per night: names, probabilities and unit embeddings of its ok rows; the threshold."""
    import polars as pl

    from engine.io import parquet, vectors

    df = parquet.read_predictions(out, ["key", "source", "status", "prob", "threshold"])
    df = df.filter(pl.col("status") == "ok")
    index = vectors.load_index(out)
    sets: dict[str, dict[str, Any]] = {}
    for name, folder in nights:
        prefix = str(folder.resolve()) + "/"
        rows = df.filter(pl.col("source").str.starts_with(prefix)).sort("key")
        keys = rows["key"].to_numpy().astype(np.uint64)
        emb = np.asarray(index.get(keys, dtype=np.float32), np.float32).reshape(len(keys), -1)
        sets[name] = {
            "names": [Path(s).name for s in rows["source"].to_list()],
            "prob": rows["prob"].to_numpy().astype(np.float64),
            "emb": emb,
        }
    return sets, float(df["threshold"][0])


def analyse(
    args: argparse.Namespace, out: Path, nights: list[tuple[str, Path]], base: dict[str, Any]
) -> None:
    from engine import drift

    sets, threshold = load_sets(out, nights)
    defaults = drift.DriftThresholds()
    patients = dev_patients(args.data)
    dev = sets["dev"]
    pid = np.array([patients.get(n, n) for n in dev["names"]])
    unique = np.unique(pid)
    rng = np.random.default_rng(args.seed)
    null: dict[int, list[drift.DriftMetrics]] = {n: [] for n in SIZES}
    for _ in range(args.draws):
        half = set(rng.permutation(unique)[: len(unique) // 2].tolist())
        ref = np.array([p in half for p in pid])
        other = np.flatnonzero(~ref)
        for n in SIZES:
            pick = rng.choice(other, size=min(n, other.size), replace=False)
            null[n].append(
                drift.compare(
                    dev["prob"][ref],
                    dev["prob"][pick],
                    threshold,
                    dev["emb"][ref],
                    dev["emb"][pick],
                )
            )
    for n, ms in null.items():
        append_jsonl(args.out, summary_line(base, "null", "dev-half", n, ms, defaults))
    shifted: dict[str, dict[int, list[drift.DriftMetrics]]] = {}
    cutoff = drift.ood_cutoff(dev["emb"])  # the full dev reference's, computed once
    for name in ("dev-rescreen", "radiography-db", "nih-chestxray14", "dev-inverted"):
        new = sets[name]
        shifted[name] = {}
        for n in SIZES:
            if n > len(new["prob"]):
                continue
            ms = []
            for _ in range(args.draws if n < len(new["prob"]) else 1):
                pick = rng.choice(len(new["prob"]), size=n, replace=False)
                ms.append(
                    drift.compare(
                        dev["prob"],
                        new["prob"][pick],
                        threshold,
                        dev["emb"],
                        new["emb"][pick],
                        ood_cutoff=cutoff,
                    )
                )
            shifted[name][n] = ms
            append_jsonl(args.out, summary_line(base, "shifted", name, n, ms, defaults))
        if len(new["prob"]) in SIZES:
            continue
        whole = [drift.compare(dev["prob"], new["prob"], threshold, dev["emb"], new["emb"])]
        append_jsonl(
            args.out, summary_line(base, "shifted", name, len(new["prob"]), whole, defaults)
        )
    suggested = {
        m: ceil_to(
            max(abs(getattr(x, m)) for x in null[defaults.min_images]),
            0.01 if m != "embedding_shift" else 0.001,
        )
        for m in MEASURES
    }
    line = {
        **base,
        "kind": "null_max",
        "rule": f"largest null value at n = min_images ({defaults.min_images}) over {args.draws} draws, rounded up",
        "null_max": suggested,
        "defaults": defaults.to_json(),
        "threshold": threshold,
        "reference_images": len(dev["prob"]),
    }
    append_jsonl(args.out, line)
    print(
        f"suggested thresholds: {suggested}; engine defaults: {defaults.to_json()}", file=sys.stderr
    )


def summary_line(
    base: dict[str, Any], kind: str, name: str, n: int, ms: list[Any], t: Any
) -> dict[str, Any]:
    from engine import drift

    stats = {}
    for m in MEASURES:
        values = np.array(
            [abs(getattr(x, m)) if m == "positive_rate_change" else getattr(x, m) for x in ms],
            np.float64,
        )
        stats[m] = {f"q{int(q * 100)}": round(float(np.quantile(values, q)), 5) for q in QUANTILES}
    flags = [drift.flagged(x, t) for x in ms]
    rates = {m: sum(m.replace("_change", "") in f for f in flags) / len(ms) for m in MEASURES}
    line = {
        **base,
        "kind": kind,
        "set": name,
        "n_new": n,
        "n_reference": ms[0].n_reference,
        "draws": len(ms),
        "measures": stats,
        "flag_rate_at_defaults": {"any": sum(bool(f) for f in flags) / len(ms), **rates},
    }
    shown = "  ".join(
        f"{m.split('_')[0]} {'/'.join(format(stats[m][q], '.3f') for q in ('q0', 'q50', 'q99', 'q100'))}"
        f" ({rates[m]:.1%})"
        for m in MEASURES
    )
    print(
        f"{kind:7s} {name:15s} n={n:3d} x{len(ms):3d}  {shown}  any {line['flag_rate_at_defaults']['any']:.1%}",
        file=sys.stderr,
    )
    return line


def dev_patients(data: Path) -> dict[str, str]:
    with open(data / "cxr-dev" / "labels.csv", newline="") as f:
        return {Path(r["path"]).name: r["patient_id"] for r in csv.DictReader(f)}


def ceil_to(x: float, step: float) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 6)


if __name__ == "__main__":
    raise SystemExit(main())
