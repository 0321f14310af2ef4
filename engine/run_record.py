"""The record of a screening run: the summary the command prints, and run.json.

`RunSummary` is what a run counted and measured (the single-process runner and the Ray
executor fill the same one); `run_record` turns it into run.json (config, model sha256s,
library versions, timings, counts), written when the run starts and again when it ends.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.config import ScreenConfig
from engine.cpu import this_cpu
from engine.io import parquet, vectors
from engine.io.parquet import Row
from engine.models import ModelSet
from engine.nightly import runs

ERROR_SAMPLES = 20  # error messages a summary keeps


@dataclass
class RunSummary:
    run_id: str
    out: Path
    backend: str
    model_id: str
    trained: bool
    decoder: str = ""
    decode_workers: int = 0  # the threads that read and decoded images (ScreenConfig.workers)
    precision_why: dict[str, str] = field(default_factory=dict)  # role -> why that export runs
    # the images this run screened (`count`)
    processed: int = 0
    ok: int = 0
    errors: int = 0
    positives: int = 0
    error_samples: list[str] = field(default_factory=list)
    # what the walk of the inputs found besides
    skipped_existing: int = 0
    ignored_files: int = 0
    empty_inputs: list[str] = field(default_factory=list)  # INPUTs that held no image
    # the directory once the run is over (`count_output`)
    total_rows: int = 0
    total_errors: int = 0
    index_size: int = 0
    # timings
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    batch_latency_ms: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    changes: dict[str, Any] = field(default_factory=dict)  # run.json "changes" (engine/nightly)
    drift: dict[str, Any] = field(default_factory=dict)  # run.json "drift"

    @property
    def drift_flagged(self) -> list[str]:
        return list(self.drift.get("flagged") or [])

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def found_nothing(self) -> bool:
        """No INPUT held an image, not even one screened before (a finished run)."""
        return not self.interrupted and self.processed == 0 and self.skipped_existing == 0

    def count(self, row: Row) -> None:
        """One finished row."""
        self.processed += 1
        if row.status == "ok":
            self.ok += 1
            self.positives += bool(row.decision)
        else:
            self.errors += 1
            if len(self.error_samples) < ERROR_SAMPLES:
                self.error_samples.append(row.error or "")

    def set_latencies(self, seconds: Sequence[float]) -> None:
        """p50 and p99 of the batches' inference latencies, in milliseconds."""
        if seconds:
            ms = np.array(seconds) * 1000
            self.batch_latency_ms = {
                "p50": float(np.percentile(ms, 50)),
                "p99": float(np.percentile(ms, 99)),
            }

    def count_output(self, out: Path, dim: int) -> None:
        """What the directory holds once the run is over: its index (merged from the sidecars
        committed so far) and its current rows."""
        self.index_size = vectors.sync_index(out, dim).size
        totals = parquet.read_predictions(out, ["status"])["status"].value_counts()
        counts = dict(zip(totals["status"].to_list(), totals["count"].to_list(), strict=True))
        self.total_rows = sum(counts.values())
        self.total_errors = counts.get("error", 0)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "cxr-engine": __version__}
    for dist in (
        "numpy",
        "polars",
        "usearch",
        "onnxruntime",
        "onnx",
        "pydicom",
        "nvidia-dali-cuda130",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def run_record(
    config: ScreenConfig,
    models: ModelSet,
    s: RunSummary,
    previous: dict[str, Any] | None,
    started: datetime,
    status: str,
) -> dict[str, Any]:
    """run.json of the run `s` (`previous`: the directory's run.json before it, if any)."""
    history = list((previous or {}).get("history", []))
    if previous and previous.get("run_id") != s.run_id:
        history.append(runs.history_entry(previous))

    def model_info(m: Any) -> dict[str, Any]:
        return {
            "architecture": m.architecture,
            "precision": m.precision,
            "precision_why": models.precision_why.get(m.role),
            "onnx": str(m.onnx_path.resolve()),
            "sha256": m.sha256,
            "trained": m.trained,
        }

    return {
        "run_id": s.run_id,
        "status": status,
        "started_at": started.isoformat(),
        "updated_at": datetime.now(UTC).isoformat(),
        "engine_version": __version__,
        "host": platform.node(),
        "cpu": this_cpu().describe(),
        "config": config.to_json(),
        "backend": s.backend,
        "decoder": s.decoder,
        "decode_workers": s.decode_workers,
        "models": {
            "model_id": models.model_id,
            "directory": str(models.classifier.directory.resolve()),
            "threshold": models.classifier.threshold,
            "segmenter": model_info(models.segmenter),
            "classifier": model_info(models.classifier),
        },
        "libraries": library_versions(),
        "counts": {
            "processed": s.processed,
            "ok": s.ok,
            "error": s.errors,
            "positive": s.positives,
            "skipped_existing": s.skipped_existing,
            "ignored_files": s.ignored_files,
            "total_rows": s.total_rows,
            "total_errors": s.total_errors,
            "index_size": s.index_size,
        },
        "timings": {
            "wall_s": s.wall_s,
            "images_per_s": s.images_per_s,
            "stage_busy_s": s.stage_s,
            "batch_latency_ms": s.batch_latency_ms,
        },
        "changes": s.changes or None,
        "drift": s.drift or None,
        "history": history,
    }
