"""Start-up of a small run: `cxr screen` on a few images, whole command, side by side.

Nightly jobs over small folders and `cxr similar` as a command pay the start-up every time:
imports, reading the manifests, making the ONNX Runtime sessions. This runs the same command
in fresh processes, alternating the configurations so that drift on a shared machine hits all
of them alike, and reports the median wall time of each and its ratio to the baseline:

    baseline        CXR_CACHE_DIR=off: every session optimised from the model (before the cache)
    ort-cache       the saved optimised graphs (engine.runtime.ort_cache), already written once
    import-only     `python -c "import engine.cli"`: the floor set by imports alone

    python -m benchmarks.bench_startup [--images examples] [--repeats 7] [--models DIR]

One JSON line per configuration goes to benchmarks/results/startup.jsonl with the machine
(CPU model and flags), libraries and commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import REPO, RESULTS, append_jsonl, header

CONFIGS = ("baseline", "ort-cache", "import-only")


def _command(config: str, images: Path, out: Path, models: Path | None) -> list[str]:
    if config == "import-only":
        return [sys.executable, "-c", "import engine.cli"]
    cmd = [sys.executable, "-m", "engine.cli", "screen", str(images), "--out", str(out)]
    return cmd + (["--models", str(models)] if models else [])


def _env(config: str, cache: Path) -> dict[str, str]:
    return {**os.environ, "CXR_CACHE_DIR": "off" if config == "baseline" else str(cache)}


def run_once(config: str, images: Path, work: Path, models: Path | None, cache: Path) -> float:
    out = work / f"out-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    subprocess.run(
        _command(config, images, out, models),
        env=_env(config, cache),
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=REPO / "examples")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--results", type=Path, default=RESULTS / "startup.jsonl")
    args = ap.parse_args(argv)
    run_id = uuid.uuid4().hex[:12]
    with tempfile.TemporaryDirectory(prefix="cxr-startup-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        # warm-up: page cache, and the ort-cache configuration's graphs written once
        for config in CONFIGS:
            run_once(config, args.images, work, args.models, cache)
        times: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for _ in range(args.repeats):
            for config in CONFIGS:
                times[config].append(run_once(config, args.images, work, args.models, cache))
    base = statistics.median(times["baseline"])
    for config in CONFIGS:
        median = statistics.median(times[config])
        record = header("startup", run_id) | {
            "config": config,
            "images": str(args.images),
            "models": str(args.models or "shipped"),
            "repeats": args.repeats,
            "seconds_median": round(median, 3),
            "seconds": [round(t, 3) for t in times[config]],
            "x_baseline": round(median / base, 3),
        }
        append_jsonl(args.results, record)
        print(f"{config:12s} median {median:6.3f} s  x baseline {median / base:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
