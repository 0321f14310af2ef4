"""One output directory, one Parquet schema: `pl.read_parquet("OUT/predictions/*.parquet")`
must work after every sequence of runs the engine accepts.

The `embedding` column exists with --embeddings-in-parquet only, so switching the option on an
existing directory is refused, and a part made only of error rows still carries the column.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import dev_images, plain, run_cli

from engine.io import parquet

FLAG = "--embeddings-in-parquet"


def _glob_read(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "predictions" / "*.parquet")


def _add_images(inp: Path, skip: int, n: int) -> None:
    inp.mkdir(parents=True, exist_ok=True)
    for src in dev_images(skip + n)[skip:]:
        shutil.copyfile(src, inp / src.name)


@pytest.mark.parametrize(
    "first_with", [True, False], ids=["with-then-without", "without-then-with"]
)
def test_switching_embeddings_in_parquet_on_an_output_is_refused(
    tmp_path, tiny_models_dir, first_with
):
    """issue 16 #9: a run with --embeddings-in-parquet then one without (or the reverse) on the
    same --out was accepted, and the glob read of the parts then failed."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _add_images(inp, 0, 2)
    base = ["screen", inp, "--out", out, "--models", tiny_models_dir]
    first, second = ([*base, FLAG], base) if first_with else (base, [*base, FLAG])
    assert run_cli(first)[0] == 0
    _add_images(inp, 2, 2)  # new images: an unchecked second run would write a part

    code, stdout, stderr = run_cli(second)

    assert code == 1, stdout + stderr
    message = plain(stderr)
    assert FLAG in message and "new --out" in message
    assert len(parquet.list_parts(out)) == 1
    df = _glob_read(out)
    assert df.height == 2 and ("embedding" in df.columns) == first_with

    assert run_cli(first)[0] == 0  # the directory's own setting goes on
    df = _glob_read(out)
    assert df.height == 4 and ("embedding" in df.columns) == first_with


def test_a_part_of_error_rows_only_keeps_the_embedding_column(tmp_path, tiny_models_dir):
    """issue 16 #9: with --embeddings-in-parquet, a shard whose images all failed was written
    without the column, so the glob read failed even without switching the option."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _add_images(inp, 0, 2)
    (inp / "zz-empty-1.png").write_bytes(b"")
    (inp / "zz-empty-2.png").write_bytes(b"")
    args = ["screen", inp, "--out", out, "--models", tiny_models_dir, FLAG, "--shard-size", "2"]

    assert run_cli(args)[0] == 3  # the empty files
    assert len(parquet.list_parts(out)) == 2
    for _, part in parquet.list_parts(out):
        assert pl.read_parquet_schema(part)["embedding"] == pl.Array(pl.Float32, 64)
    df = _glob_read(out)
    assert df.height == 4
    errors = df.filter(pl.col("status") == "error")
    assert errors.height == 2

    assert run_cli(args)[0] == 3  # a rerun (nothing new) is accepted and keeps it readable
    assert _glob_read(out).height == 4
