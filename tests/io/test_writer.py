"""engine.io.writer: ShardWriter commits every `shard_size` rows as a shard: the embedding
sidecar and the previews first, the Parquet part (the commit point) last, under one number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from engine.errors import OutputError
from engine.io import parquet, thumbs, vectors
from engine.io.parquet import Row
from engine.io.writer import ShardWriter

DIM = 4
COMMON = {"model_id": "models-1", "run_id": "run-1"}


def row(key: int, *, ok: bool = True) -> Row:
    r = Row(key=key, source=f"img{key}.png", member=None)
    if ok:
        r.status, r.prob = "ok", 0.25
    else:
        r.status, r.error = "error", "bad"
    return r


def vector(key: int) -> np.ndarray:
    return np.arange(1, DIM + 1, dtype=np.float32) * key  # any length: the writer normalises


def writer(out: Path, **options: Any) -> ShardWriter:
    settings: dict[str, Any] = dict(shard_size=2, common=COMMON, with_embeddings=False, dim=DIM)
    return ShardWriter(out, **settings | options)


def sidecar(out: Path, number: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(vectors.sidecar_path(out, number)) as z:
        return z["keys"], z["vectors"]


def test_every_shard_size_rows_commit_a_part_and_flush_commits_the_rest(tmp_path):
    w = writer(tmp_path)
    for key in range(1, 6):
        w.add(row(key), vector(key), None)
    assert [n for n, _ in parquet.list_parts(tmp_path)] == [0, 1]  # 4 rows: two full shards
    w.flush()
    w.flush()  # nothing left: no empty part
    assert [n for n, _ in parquet.list_parts(tmp_path)] == [0, 1, 2]
    assert w.parts_written == 3 and w.number == 3
    df = parquet.read_predictions(tmp_path)
    assert df["key"].to_list() == [1, 2, 3, 4, 5]
    assert set(df["model_id"]) == {"models-1"} and set(df["run_id"]) == {"run-1"}  # common
    assert "embedding" not in df.columns


def test_the_sidecar_holds_unit_vectors_of_the_rows_that_have_one(tmp_path):
    w = writer(tmp_path, shard_size=3)
    w.add(row(1), vector(1), None)
    w.add(row(2, ok=False), None, None)  # an error row has no embedding
    w.add(row(3), vector(3), None)
    keys, vecs = sidecar(tmp_path, 0)
    assert keys.tolist() == [1, 3] and vecs.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=1e-3)
    assert parquet.read_predictions(tmp_path)["status"].to_list() == ["ok", "error", "ok"]


def test_a_shard_of_error_rows_writes_no_sidecar_and_no_previews(tmp_path):
    w = writer(tmp_path)
    w.add(row(1, ok=False), None, None)
    w.add(row(2, ok=False), None, None)
    assert parquet.part_path(tmp_path, 0).exists()
    assert not vectors.sidecar_path(tmp_path, 0).exists()
    assert not thumbs.thumbs_path(tmp_path, 0).exists()


def test_embeddings_in_parquet_keep_one_schema_even_for_error_rows(tmp_path):
    w = writer(tmp_path, with_embeddings=True)
    w.add(row(1), vector(1), None)
    w.add(row(2, ok=False), None, None)
    w.add(row(3, ok=False), None, None)
    w.add(row(4, ok=False), None, None)  # a part of error rows only still has the column
    first, second = (pl.read_parquet(p) for _, p in parquet.list_parts(tmp_path))
    assert first.schema == second.schema
    assert first.schema["embedding"] == pl.Array(pl.Float32, DIM)
    np.testing.assert_allclose(first["embedding"][0].to_numpy(), vector(1), rtol=1e-6)
    assert np.isnan(first["embedding"][1].to_numpy()).all()
    assert np.isnan(np.stack(second["embedding"].to_numpy())).all()


def test_previews_are_written_for_the_rows_that_have_them(tmp_path):
    w = writer(tmp_path)
    w.add(row(1), vector(1), (b"jpeg-1", b"png-1"))
    w.add(row(2, ok=False), None, None)
    got = pl.read_parquet(thumbs.thumbs_path(tmp_path, 0))
    assert got["key"].to_list() == [1]
    assert thumbs.read_previews(tmp_path, 1) == (b"jpeg-1", b"png-1")
    assert thumbs.read_previews(tmp_path, 2) is None


def test_numbers_continue_after_the_committed_parts_or_start_where_told(tmp_path):
    parquet.write_part(tmp_path, 4, parquet.rows_frame([row(9).columns()]))
    assert writer(tmp_path).number == 5
    w = writer(tmp_path / "other", number=7)
    w.add(row(1), None, None)
    w.add(row(2), None, None)
    assert [n for n, _ in parquet.list_parts(tmp_path / "other")] == [7]


def test_a_part_already_in_place_counts_as_committed(tmp_path):
    """An interrupt after the part's rename but before the bookkeeping: the part is not
    written again, the writer moves on to the next number."""
    parquet.write_part(tmp_path, 0, parquet.rows_frame([row(1).columns(), row(2).columns()]))
    before = parquet.part_path(tmp_path, 0).read_bytes()
    w = writer(tmp_path, number=0)
    w.add(row(1), vector(1), None)
    w.add(row(2), vector(2), None)
    assert (w.number, w.parts_written) == (1, 1)
    assert parquet.part_path(tmp_path, 0).read_bytes() == before
    assert not vectors.sidecar_path(tmp_path, 0).exists()


def test_a_failed_part_leaves_no_sidecar_and_no_previews(tmp_path, monkeypatch):
    def full_disk(out, number, df):
        raise OutputError(f"part {number}: No space left on device")

    monkeypatch.setattr(parquet, "write_part", full_disk)
    w = writer(tmp_path, shard_size=1)
    with pytest.raises(OutputError, match="No space left"):
        w.add(row(1), vector(1), (b"jpeg", b"png"))
    assert not vectors.sidecar_path(tmp_path, 0).exists()
    assert not thumbs.thumbs_path(tmp_path, 0).exists()
    assert (w.number, w.parts_written) == (0, 0)
