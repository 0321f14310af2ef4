"""engine.distributed.shard, without Ray: one shard into its part (idempotent, fenced), and
what a worker checks that it sees before it screens."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import dev_images

from engine.config import ScreenConfig
from engine.distributed.shard import StaleRun, check_view, fence, screen_shard
from engine.io import parquet, thumbs, vectors
from engine.io.outdir import write_run_json
from engine.io.shards import ShardReader, list_entries, plan_shards
from engine.models import load_models
from engine.screener import Screener


def shard_config(out: Path, models: Path, **kw) -> ScreenConfig:
    return ScreenConfig(
        inputs=(out,), out=out, models=models, batch_size=3, threads=1, progress=False, **kw
    )


@pytest.fixture
def shard_setup(tiny_models_dir, tmp_path):
    images = [str(p) for p in dev_images(7)]
    (tmp_path / "bad.png").write_text("no")
    entries = list(list_entries([*images, str(tmp_path / "bad.png")]))
    shard = plan_shards(entries, 100, first_number=5)[0]
    out = tmp_path / "out"
    out.mkdir()
    cfg = shard_config(out, tiny_models_dir)
    models = load_models(tiny_models_dir)
    screener = Screener(models, backend="onnxruntime", batch_size=3, threads=1, decoder="pillow")
    common = {"model_id": models.model_id, "backend": "onnxruntime", "run_id": "r1"}
    reader = ShardReader()
    yield screener, reader, shard, cfg, out, common
    reader.close()
    screener.close()


def test_a_shard_becomes_its_own_part_once(shard_setup):
    screener, reader, shard, cfg, out, common = shard_setup
    first = screen_shard(screener, reader, shard, config=cfg, out=out, common=common)
    assert (first.rows, first.ok, first.errors, first.already_committed) == (8, 7, 1, False)
    assert first.error_samples and "bad.png" in first.error_samples[0]
    assert [n for n, _ in parquet.list_parts(out)] == [5]  # named after the shard
    assert thumbs.thumbs_path(out, 5).exists() and vectors.sidecar_path(out, 5).exists()
    part = parquet.part_path(out, 5).read_bytes()
    df = pl.read_parquet(parquet.part_path(out, 5))
    assert df["key"].to_list() == [e.key for e in shard.entries]  # input order
    assert set(df["run_id"]) == {"r1"}

    again = screen_shard(screener, reader, shard, config=cfg, out=out, common=common)
    assert again.already_committed
    assert (again.rows, again.ok, again.errors, again.positives) == (
        first.rows,
        first.ok,
        first.errors,
        first.positives,
    )
    assert parquet.part_path(out, 5).read_bytes() == part  # a retry never rewrites a part


def test_a_fenced_out_worker_commits_nothing(shard_setup):
    screener, reader, shard, cfg, out, common = shard_setup
    write_run_json(out, {"run_id": "newer"})
    with pytest.raises(StaleRun, match="newer"):
        screen_shard(
            screener,
            reader,
            shard,
            config=cfg,
            out=out,
            common=common,
            before_commit=fence(out, "r1"),
        )
    assert parquet.list_parts(out) == []


def test_check_view(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_run_json(out, {"run_id": "abc"})
    assert check_view(out, "abc", [str(tmp_path)]) == []
    problems = check_view(out, "xyz", [str(tmp_path / "gone.tar")])
    assert any("its run.json is run abc's, not this run's (xyz)" in p for p in problems)
    assert any(p.endswith("gone.tar: no such file or directory") for p in problems)
    assert any("run.json is not there" in p for p in check_view(tmp_path / "nope", "abc", []))
