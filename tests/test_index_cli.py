"""engine/index_cli.py: `cxr index rebuild OUT` on hand-built output directories (the runs that
lose or corrupt an index for real are in tests/adversarial/test_screen_index.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import plain

from engine.io import parquet, vectors

DIM = 4


def commit(out: Path, number: int, keys: list[int], *, sidecar: bool = True, column=False):
    """A committed shard: its embedding sidecar (or the Parquet column, or neither), its part."""
    vecs = np.eye(len(keys), DIM, k=number, dtype=np.float32) + 0.1
    rows = [
        parquet.Row(key=k, source=f"img{k}.png", member=None).columns() | {"status": "ok"}
        for k in keys
    ]
    if sidecar:
        vectors.write_sidecar(out, number, np.array(keys, np.uint64), vecs)
    parquet.write_part(out, number, parquet.rows_frame(rows, vecs if column else None))


def test_rebuild_replaces_a_corrupt_index_from_the_kept_embeddings(tmp_path, cli):
    out = tmp_path / "out"
    commit(out, 0, [1, 2])
    vectors.sync_index(out, DIM)  # the sidecar is kept aside once indexed
    commit(out, 1, [3], sidecar=False, column=True)  # --embeddings-in-parquet
    vectors.index_path(out).write_bytes(b"not an index")
    code, stdout, err = cli(["index", "rebuild", out])
    assert code == 0, err
    assert f"{vectors.index_path(out)}: 3 vectors (2 from embeddings/, 1 from the Parquet" in (
        plain(stdout)
    )
    assert sorted(int(k) for k in vectors.load_index(out).keys) == [1, 2, 3]


def test_rebuild_says_which_screened_images_it_could_not_index(tmp_path, cli):
    out = tmp_path / "out"
    commit(out, 0, [1, 2])
    commit(out, 1, [3], sidecar=False)  # an older cxr deleted the sidecar once indexed
    code, stdout, err = cli(["index", "rebuild", out])
    assert code == 1
    assert "2 vectors" in plain(stdout)
    assert "1 screened images have no kept embedding" in plain(err)


def test_rebuild_of_a_directory_without_parts_exits_1(tmp_path, cli):
    code, _, err = cli(["index", "rebuild", tmp_path])
    assert code == 1 and "no predictions/part-*.parquet" in plain(err)
    code, _, err = cli(["index", "rebuild", " "])
    assert code == 1 and "OUT is empty (only blanks)" in plain(err)
