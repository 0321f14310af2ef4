"""engine.io.vectors: embedding sidecars and the usearch index they feed, idempotently.

A sidecar is merged once its part is committed; an orphan or an already-indexed one is not.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env
from test_parquet import DIM, SEED, make_rows, unit_vectors

from engine.errors import EngineError
from engine.io import parquet, vectors


def commit_shard(out: Path, number: int, keys: list[int], seed: int = SEED) -> np.ndarray:
    """What the runner does per shard: sidecar first, then the part (the commit point)."""
    vecs = unit_vectors(len(keys), seed)
    vectors.write_sidecar(out, number, np.array(keys, np.uint64), vecs)
    parquet.write_part(out, number, parquet.rows_frame(make_rows(keys)))
    return vecs


def index_keys(out: Path) -> list[int]:
    index = vectors.load_index(out)
    return sorted(int(k) for k in index.keys)


def test_sync_index_adds_committed_sidecars_then_keeps_them_aside(tmp_path):
    out = tmp_path / "out"
    assert vectors.sync_index(out, DIM) == vectors.SyncResult(added=0, size=0)
    assert vectors.load_index(out) is None
    v0 = commit_shard(out, 0, [10, 11, 12])
    commit_shard(out, 1, [20, 21], seed=SEED + 1)
    result = vectors.sync_index(out, DIM)
    assert result == vectors.SyncResult(added=5, size=5)
    assert index_keys(out) == [10, 11, 12, 20, 21]
    assert list((out / "embeddings").glob("*.npz")) == []  # nothing left to merge
    kept = sorted(p.name for p in vectors.indexed_dir(out).iterdir())
    assert kept == ["part-00000.npz", "part-00001.npz"]  # kept to rebuild the index
    index = vectors.load_index(out)
    assert index.ndim == DIM
    hit = index.search(v0[1], 1)
    assert int(hit.keys[0]) == 11  # usearch key == Parquet key
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp index


def test_sync_index_is_idempotent(tmp_path):
    out = tmp_path / "out"
    commit_shard(out, 0, [1, 2, 3])
    first = vectors.sync_index(out, DIM)
    size_on_disk = vectors.index_path(out).stat().st_size
    second = vectors.sync_index(out, DIM)
    assert (first.added, first.size) == (3, 3)
    assert (second.added, second.size) == (0, 3)
    assert vectors.index_path(out).stat().st_size == size_on_disk
    assert index_keys(out) == [1, 2, 3]


def test_orphan_sidecar_is_deleted_and_not_indexed(tmp_path):
    out = tmp_path / "out"
    commit_shard(out, 0, [1, 2])
    # a crash after the sidecar of part 1 but before its part: not committed
    vectors.write_sidecar(out, 1, np.array([7, 8], np.uint64), unit_vectors(2))
    (out / "embeddings" / ".part-00002.npz.tmp-123").write_bytes(b"torn")
    result = vectors.sync_index(out, DIM)
    assert (result.added, result.size) == (2, 2)
    assert index_keys(out) == [1, 2]
    assert list((out / "embeddings").glob("*.npz")) == []
    assert [p.name for p in vectors.indexed_dir(out).iterdir()] == ["part-00000.npz"]


def test_sidecar_already_in_the_index_is_not_added_again(tmp_path):
    out = tmp_path / "out"
    vecs = commit_shard(out, 0, [1, 2, 3])
    vectors.sync_index(out, DIM)
    # a crash after saving the index but before deleting the sidecar: it is still there
    vectors.write_sidecar(out, 0, np.array([1, 2, 3], np.uint64), vecs)
    result = vectors.sync_index(out, DIM)
    assert (result.added, result.size) == (0, 3)
    assert not vectors.sidecar_path(out, 0).exists()
    # partly known: only the new keys go in
    vectors.write_sidecar(out, 0, np.array([3, 4], np.uint64), unit_vectors(2, SEED + 5))
    result = vectors.sync_index(out, DIM)
    assert (result.added, result.size) == (1, 4)
    assert index_keys(out) == [1, 2, 3, 4]


def test_sync_index_refuses_another_dimension(tmp_path):
    out = tmp_path / "out"
    commit_shard(out, 0, [1])
    vectors.sync_index(out, DIM)
    commit_shard(out, 1, [2])
    with pytest.raises(EngineError, match=r"holds 8-d vectors but the model gives 16-d.*new --out"):
        vectors.sync_index(out, 16)
    assert vectors.sidecar_path(out, 1).exists()  # nothing lost: a later run may still merge it


@pytest.mark.parametrize("content", [b"", b"not an index\n" * 8], ids=["empty", "garbage"])
def test_corrupt_index_is_an_engine_error(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    vectors.index_path(out).write_bytes(content)
    with pytest.raises(
        EngineError, match=r"index\.usearch: not a usearch index.*cxr index rebuild"
    ):
        vectors.load_index(out)


def test_truncated_index_is_an_engine_error(tmp_path):
    out = tmp_path / "out"
    commit_shard(out, 0, list(range(100)))
    vectors.sync_index(out, DIM)
    path = vectors.index_path(out)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for view in (False, True):
        with pytest.raises(EngineError, match="not a usearch index"):
            vectors.load_index(out, view=view)


def test_usearch_then_onnxruntime_import_order_does_not_crash(tmp_path):
    # usearch's extension loaded before onnxruntime's makes `import onnxruntime` segfault;
    # vectors._usearch_index_class imports onnxruntime first to avoid it.
    code = textwrap.dedent(
        f"""
        import numpy as np
        import engine.io.vectors as vectors
        index = vectors.new_index(4)
        index.add(np.arange(3, dtype=np.uint64), np.eye(3, 4, dtype=np.float32))
        index.save({str(tmp_path / "index.usearch")!r})
        assert len(vectors.load_index({str(tmp_path)!r})) == 3
        import onnxruntime
        onnxruntime.get_available_providers()
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert proc.returncode == 0, f"rc={proc.returncode} (-11 is SIGSEGV)\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"
