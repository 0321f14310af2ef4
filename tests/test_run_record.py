"""engine/run_record.py: what a run counts (RunSummary) and what run.json records of it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import ScreenConfig
from engine.io import parquet, vectors
from engine.io.parquet import Row
from engine.run_record import ERROR_SAMPLES, RunSummary, library_versions, run_record


def summary(out: Path, **fields: Any) -> RunSummary:
    base: dict[str, Any] = dict(
        run_id="r2", out=out, backend="onnxruntime", model_id="m", trained=False
    )
    return RunSummary(**base | fields)


def row(key: int, status: str = "ok", decision: bool = False) -> Row:
    r = Row(key=key, source=f"img{key}.png", member=None)
    r.status, r.decision = status, decision
    r.error = "broken" if status == "error" else None
    return r


def test_count_adds_up_ok_errors_positives_and_keeps_a_few_error_messages(tmp_path):
    s = summary(tmp_path)
    assert s.found_nothing and s.images_per_s == 0.0
    s.count(row(1, decision=True))
    s.count(row(2))
    for k in range(ERROR_SAMPLES + 5):
        s.count(row(100 + k, "error"))
    assert (s.processed, s.ok, s.positives, s.errors) == (2 + ERROR_SAMPLES + 5, 2, 1, 25)
    assert s.error_samples == ["broken"] * ERROR_SAMPLES
    s.wall_s = 2.0
    assert s.images_per_s == pytest.approx(s.processed / 2.0) and not s.found_nothing
    assert not summary(tmp_path, skipped_existing=3).found_nothing  # screened before: found
    assert not summary(tmp_path, interrupted=True).found_nothing


def test_latencies_are_p50_and_p99_in_milliseconds(tmp_path):
    s = summary(tmp_path)
    s.set_latencies([])
    assert s.batch_latency_ms == {}
    s.set_latencies([0.01] * 99 + [1.0])
    assert s.batch_latency_ms["p50"] == pytest.approx(10.0)
    assert 10.0 < s.batch_latency_ms["p99"] <= 1000.0
    assert summary(tmp_path, drift={"flagged": ["psi"]}).drift_flagged == ["psi"]
    assert summary(tmp_path).drift_flagged == []


def test_count_output_reads_the_directory_once_the_run_is_over(tmp_path):
    rows = [row(1).columns(), row(2).columns(), row(3, "error").columns()]
    parquet.write_part(tmp_path, 0, parquet.rows_frame(rows))
    vectors.write_sidecar(tmp_path, 0, np.array([1, 2], np.uint64), np.eye(2, 4, dtype=np.float32))
    s = summary(tmp_path)
    s.count_output(tmp_path, 4)
    assert (s.total_rows, s.total_errors, s.index_size) == (3, 1, 2)


def test_library_versions_name_every_library_the_results_depend_on():
    versions = library_versions()
    assert {"python", "cxr-engine", "numpy", "polars", "usearch", "onnxruntime"} <= set(versions)
    assert all(isinstance(v, str) and v for v in versions.values())


def test_run_record_keeps_the_history_of_earlier_runs(tiny_models, tmp_path):
    config = ScreenConfig(inputs=(tmp_path / "in",), out=tmp_path / "out", threads=1)
    s = summary(tmp_path / "out", ok=3, processed=3, wall_s=1.5, decoder="pillow")
    started = datetime(2024, 1, 2, tzinfo=UTC)
    first = run_record(config, tiny_models, s, None, started, "running")
    assert first["run_id"] == "r2" and first["status"] == "running" and first["history"] == []
    assert first["started_at"] == started.isoformat() and first["decoder"] == "pillow"
    assert first["models"]["model_id"] == tiny_models.model_id
    assert first["models"]["classifier"]["sha256"] == tiny_models.classifier.sha256
    assert first["counts"]["ok"] == 3 and first["timings"]["images_per_s"] == 2.0
    assert first["config"] == config.to_json() and first["changes"] is None
    # the same run written again at its end keeps no entry of itself
    assert run_record(config, tiny_models, s, first, started, "finished")["history"] == []
    earlier = first | {"run_id": "r1"}
    later = run_record(config, tiny_models, s, earlier, started, "finished")
    assert [h["run_id"] for h in later["history"]] == ["r1"]
