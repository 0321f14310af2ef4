"""engine.runner.screen: one run on synthetic images with the tiny models (its summary, run.json
before and after, progress, what the walk found), a rerun that skips what is done, Ctrl-C
keeping every finished row, a write error not flushed twice, the lock, and --ray handed to the
executor. End to end through the command: test_screen_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from engine import runner
from engine.config import ScreenConfig
from engine.errors import OutputError, OutputLocked
from engine.io import parquet, vectors
from engine.io.outdir import OutputLock
from engine.io.writer import ShardWriter
from engine.run_record import RunSummary


def png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.linspace(0, 220, 120)[None, :] + rng.normal(0, 20, (100, 120))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(path)
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Five images, one broken file, one text file (ignored)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        png(folder / f"img{i}.png", i)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def config(inputs, out: Path, models: Path, **kw) -> ScreenConfig:
    base = {"threads": 1, "batch_size": 2, "shard_size": 4, "progress": False}
    return ScreenConfig(inputs=tuple(inputs), out=out, models=models, **(base | kw))


def rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "predictions")


def test_a_run_counts_records_and_indexes_every_image(inputs, tmp_path, tiny_models_dir):
    out = tmp_path / "out"
    progress: list[int] = []
    s = runner.screen(config([inputs], out, tiny_models_dir), on_progress=progress.append)
    assert isinstance(s, RunSummary) and len(s.run_id) == 12
    assert (s.processed, s.ok, s.errors) == (6, 5, 1)
    assert s.ignored_files == 1 and s.skipped_existing == 0 and s.empty_inputs == []
    assert (s.total_rows, s.total_errors, s.index_size) == (6, 1, 5)
    assert "broken.png" in s.error_samples[0]
    assert sum(progress) == 6
    assert s.backend == "onnxruntime" and not s.trained and not s.interrupted
    assert s.wall_s > 0 and "write" in s.stage_s and set(s.batch_latency_ms) == {"p50", "p99"}
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == s.run_id and record["status"] == "complete"
    assert record["counts"]["processed"] == 6
    df = rows(out)
    assert df.height == 6 and set(df["run_id"]) == {s.run_id}
    assert sorted(df["status"].to_list()) == ["error"] + ["ok"] * 5
    assert len(vectors.load_index(out)) == 5
    with OutputLock(out):  # released
        pass


def test_a_rerun_skips_what_is_done_and_keeps_the_history(inputs, tmp_path, tiny_models_dir):
    out = tmp_path / "out"
    first = runner.screen(config([inputs], out, tiny_models_dir))
    png(inputs / "img9.png", 9)
    again = runner.screen(config([inputs], out, tiny_models_dir))
    assert again.run_id != first.run_id
    assert (again.processed, again.skipped_existing) == (1, 6)
    assert (again.total_rows, again.index_size) == (7, 6)
    record = json.loads((out / "run.json").read_text())
    assert [h["run_id"] for h in record["history"]] == [first.run_id]


def test_an_empty_input_is_found_to_hold_nothing(tmp_path, tiny_models_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    s = runner.screen(config([empty], tmp_path / "out", tiny_models_dir))
    assert s.found_nothing and s.processed == 0
    assert s.empty_inputs == [str(empty)]


def test_ctrl_c_keeps_every_finished_row_and_says_interrupted(
    inputs, tmp_path, tiny_models_dir, monkeypatch
):
    real = runner.iter_items

    def three_then_ctrl_c(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(runner, "iter_items", three_then_ctrl_c)
    out = tmp_path / "out"
    s = runner.screen(config([inputs], out, tiny_models_dir, shard_size=100))
    assert s.interrupted and not s.found_nothing
    assert rows(out).height == 3 == s.total_rows  # flushed on the way out
    assert len(parquet.list_parts(out)) == 1
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    monkeypatch.setattr(runner, "iter_items", real)
    rest = runner.screen(config([inputs], out, tiny_models_dir))
    assert (rest.processed, rest.skipped_existing, rest.total_rows) == (3, 3, 6)


def test_a_write_error_is_raised_once_and_not_flushed_again(
    inputs, tmp_path, tiny_models_dir, monkeypatch
):
    flushes: list[int] = []
    monkeypatch.setattr(ShardWriter, "flush", lambda self: flushes.append(1))

    def failing(*args, **kwargs):
        raise OutputError("disk full")

    monkeypatch.setattr(runner, "screen_items", failing)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full"):
        runner.screen(config([inputs], out, tiny_models_dir))
    assert flushes == []
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    with OutputLock(out):  # released
        pass


def test_a_second_run_on_a_locked_output_is_refused(inputs, tmp_path, tiny_models_dir):
    out = tmp_path / "out"
    with OutputLock(out), pytest.raises(OutputLocked):
        runner.screen(config([inputs], out, tiny_models_dir))
    assert not (out / "predictions").exists()


def test_ray_runs_go_to_the_executor_untouched(monkeypatch, tmp_path):
    from engine.distributed import executor

    seen = []
    marker = object()

    def fake(cfg, *, on_progress=None):
        seen.append((cfg, on_progress))
        return marker

    monkeypatch.setattr(executor, "screen", fake)
    monkeypatch.setattr(runner, "load_models", lambda *a, **k: pytest.fail("loaded models"))
    cfg = config([tmp_path], tmp_path / "out", tmp_path, ray="local")
    assert runner.screen(cfg, on_progress=print) is marker
    assert seen == [(cfg, print)]
    assert not (tmp_path / "out").exists()
