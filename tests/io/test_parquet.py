"""engine.io.parquet: the typed row, its frame, and the parts (the commit points of a run).

Parts are written whole or not at all, never overwritten, and read back as one table.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import get_type_hints

import numpy as np
import polars as pl
import pytest

from engine.io import parquet

SEED = 7
DIM = 8


def make_rows(keys, *, errors=()) -> list[dict]:
    rows = []
    for k in keys:
        if k in errors:
            rows.append({"key": k, "source": f"img{k}.png", "status": "error", "error": "bad"})
        else:
            rows.append(
                {
                    "key": k,
                    "source": f"img{k}.png",
                    "member": None,
                    "width": 1024,
                    "height": 1000,
                    "bit_depth": 8,
                    "status": "ok",
                    "prob": 0.25,
                    "decision": False,
                    "threshold": 0.5,
                    "lung_bbox": [10, 20, 900, 950],
                    "lung_fraction": 0.4,
                    "screened_at": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
                }
            )
    return rows


def unit_vectors(n: int, seed: int = SEED) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --------------------------------------------------------------------------- rows_frame


def test_rows_frame_schema_types_and_nulls():
    big = 2**63 + 5  # keys are uint64: above int64's range must survive
    df = parquet.rows_frame(make_rows([big, 3], errors={3}))
    assert dict(df.schema) == parquet.SCHEMA
    assert df.schema["key"] == pl.UInt64 and df.schema["lung_bbox"] == pl.Array(pl.Int32, 4)
    assert df["key"].to_list() == [big, 3]
    ok, bad = df.row(0, named=True), df.row(1, named=True)
    assert ok["lung_bbox"] == [10, 20, 900, 950] and ok["status"] == "ok"
    assert ok["screened_at"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert bad["status"] == "error" and bad["error"] == "bad"
    for col in ("prob", "decision", "lung_bbox", "lung_fraction", "width", "screened_at"):
        assert bad[col] is None, col


def test_the_typed_row_is_the_schema():
    """parquet.Row declares every column once: SCHEMA is its fields in order, each field's
    Python type is what its Parquet type reads back as, and a Row goes through rows_frame."""
    hints = get_type_hints(parquet.Row)
    assert list(parquet.SCHEMA) == [f.name for f in fields(parquet.Row)] == list(hints)
    python = {
        pl.UInt64: int,
        pl.Int64: int,
        pl.Int32: int,
        pl.Int16: int,
        pl.String: str,
        pl.Float32: float,
        pl.Boolean: bool,
        pl.Array: list[int],
        pl.Datetime: datetime,
    }
    for name, dtype in parquet.SCHEMA.items():
        want = python[type(dtype)]
        assert hints[name] in (want, want | None), (name, hints[name], dtype)
    # what every row has, even one of an input that could not be read: where it came from
    required = [f.name for f in fields(parquet.Row) if f.default is MISSING]
    assert required == ["key", "source", "member"]

    row = parquet.Row(key=2**63 + 5, source="img.png", member=None)
    row.update(make_rows([1])[0] | {"key": row.key, "lung_fraction": 0.375})  # float32-exact
    df = parquet.rows_frame([row.columns()])
    assert dict(df.schema) == parquet.SCHEMA
    assert df.row(0, named=True) == row.columns()
    with pytest.raises(AttributeError):
        row.update({"no_such_column": 1})


def test_rows_frame_embeddings_column():
    vecs = unit_vectors(3).astype(np.float64)  # stored as float32 whatever comes in
    df = parquet.rows_frame(make_rows([1, 2, 3]), embeddings=vecs)
    assert df.schema["embedding"] == pl.Array(pl.Float32, DIM)
    np.testing.assert_allclose(df["embedding"].to_numpy(), vecs, rtol=1e-6)
    assert "embedding" not in parquet.rows_frame(make_rows([1])).columns


# --------------------------------------------------------------------------- parts


def test_write_part_round_trips_and_never_overwrites(tmp_path):
    out = tmp_path / "out"
    p = parquet.write_part(out, 0, parquet.rows_frame(make_rows([1, 2, 3], errors={2})))
    assert p == out / "predictions" / "part-00000.parquet"
    back = pl.read_parquet(p)
    assert dict(back.schema) == parquet.SCHEMA
    assert back["key"].to_list() == [1, 2, 3]
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        parquet.write_part(out, 0, parquet.rows_frame(make_rows([9])))
    assert p.read_bytes() == before
    assert sorted(x.name for x in p.parent.iterdir()) == ["part-00000.parquet"]  # no temp left


def test_a_part_never_exists_half_written(tmp_path, monkeypatch):
    import errno

    from engine.errors import OutputError
    from engine.io import atomic

    out = tmp_path / "out"
    final = parquet.part_path(out, 4)
    seen = []
    real_write_all = atomic._write_all

    def failing_write(fd, data):
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        assert not final.exists()  # the final name appears only by rename
        real_write_all(fd, data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", failing_write)
    with pytest.raises(OutputError, match="No space left on device"):
        parquet.write_part(out, 4, parquet.rows_frame(make_rows([1, 2])))
    assert len(seen) == 1 and seen[0].parent == final.parent and seen[0].name.startswith(".")
    assert list(final.parent.iterdir()) == []  # the torn temporary file was removed
    # a crash (kill -9) at that moment leaves the torn temporary file: never a part
    (final.parent / seen[0].name).write_bytes(b"torn")
    assert parquet.list_parts(out) == []
    assert parquet.existing_keys(out) == set()
    assert parquet.next_part_number(out) == 0
    assert parquet.remove_temporaries(out) == 1
    assert list(final.parent.iterdir()) == []


def test_list_parts_ignores_temporaries_and_strangers(tmp_path):
    out = tmp_path / "out"
    assert parquet.list_parts(out) == [] and parquet.next_part_number(out) == 0
    parquet.write_part(out, 2, parquet.rows_frame(make_rows([5])))
    parquet.write_part(out, 0, parquet.rows_frame(make_rows([1, 2])))
    d = parquet.parts_dir(out)
    for name in (
        ".part-00003.parquet.tmp-999",
        "part-1.parquet",
        "part-00004.parquet.bak",
        "notes.txt",
    ):
        (d / name).write_bytes(b"junk")
    assert [n for n, _ in parquet.list_parts(out)] == [0, 2]
    assert parquet.next_part_number(out) == 3
    assert parquet.existing_keys(out) == {1, 2, 5}  # the junk is never read
    assert parquet.remove_temporaries(out) == 1
    assert not (d / ".part-00003.parquet.tmp-999").exists()
    assert (d / "notes.txt").exists()


def test_read_predictions_across_parts_with_and_without_embeddings(tmp_path):
    out = tmp_path / "out"
    empty = parquet.read_predictions(out)
    assert empty.height == 0 and dict(empty.schema) == parquet.SCHEMA
    parquet.write_part(out, 0, parquet.rows_frame(make_rows([1, 2]), embeddings=unit_vectors(2)))
    parquet.write_part(out, 1, parquet.rows_frame(make_rows([3], errors={3})))
    df = parquet.read_predictions(out)
    assert df["key"].to_list() == [1, 2, 3]
    assert df["embedding"].null_count() == 1
    assert parquet.read_predictions(out, columns=["key", "status"]).columns == ["key", "status"]
