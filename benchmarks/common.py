"""What every benchmark records beside its numbers: machine, libraries, commit, resources."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = "cxr-bench/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic")


def default_data_dir() -> Path:
    """The real dev images: $CXR_DATA/cxr-dev, else ../shared/data/cxr-dev beside the checkout."""
    env = os.environ.get("CXR_DATA")
    base = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    return base / "cxr-dev"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """CPU model, usable cores, memory; enough to tell two result lines' machines apart."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    from engine.cpu import this_cpu

    cpu = this_cpu()
    return {
        "host": platform.node(),
        "cpu_model": model,
        # what decides which kernels run: INT8 and bf16 only pay with these (engine/cpu.py)
        "cpu_flags": cpu.notable(),
        "cpu_int8_fast": cpu.int8_fast,
        "cpu_bf16_fast": cpu.bf16_fast,
        "cores": cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def libraries() -> dict[str, str]:
    from importlib import metadata

    from engine.run_record import library_versions

    versions = library_versions()
    for dist in ("pillow", "psutil"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


@dataclass
class Meter:
    """Wall and CPU time over a block; `utilisation` is CPU time / wall / cores (0..1)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __enter__(self) -> Meter:
        self._t = time.perf_counter()
        self._c = cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t
        self.cpu_s = cpu_seconds() - self._c

    def elapsed(self) -> float:
        """Seconds since the block began (while inside it)."""
        return time.perf_counter() - self._t

    def utilisation(self, n_cores: int | None = None) -> float:
        n = n_cores or cores()
        return self.cpu_s / self.wall_s / n if self.wall_s > 0 else 0.0


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds, np.float64) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "n": len(ms),
    }


def list_images(root: Path, limit: int | None = None) -> list[Path]:
    """Image files under root (recursive, sorted by path) or root itself; the first `limit`."""
    root = Path(root)
    if root.is_file():
        return [root]
    found = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    return found[:limit] if limit else found


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default, sort_keys=False) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def header(bench: str, run_id: str) -> dict[str, Any]:
    """The provenance part of a result line."""
    return {
        "schema": SCHEMA,
        "bench": bench,
        "run_id": run_id,
        "timestamp": now_iso(),
        "git_commit": git_commit(),
        "machine": machine(),
        "libraries": libraries(),
    }
