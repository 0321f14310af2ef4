"""engine.io.parquet, engine.io.vectors and engine.io.outdir: the output directory's contents.

Parts are the commit points, sidecars feed the index idempotently, one writer holds the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import MISSING, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import get_type_hints

import numpy as np
import polars as pl
import pytest

from engine.errors import EngineError, OutputLocked
from engine.io import outdir, parquet, vectors
from engine.io.outdir import OutputLock, read_run_json, write_run_json

REPO = Path(__file__).resolve().parents[1]
SEED = 7
DIM = 8


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


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


def commit_shard(out: Path, number: int, keys: list[int], seed: int = SEED) -> np.ndarray:
    """What the runner does per shard: sidecar first, then the part (the commit point)."""
    vecs = unit_vectors(len(keys), seed)
    vectors.write_sidecar(out, number, np.array(keys, np.uint64), vecs)
    parquet.write_part(out, number, parquet.rows_frame(make_rows(keys)))
    return vecs


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


# --------------------------------------------------------------------------- sidecars + index


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
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0, f"rc={proc.returncode} (-11 is SIGSEGV)\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- OutputLock


def test_lock_conflicts_in_the_same_process_and_is_released_on_exit(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        assert (out / outdir.LOCK).read_text() == str(os.getpid())
        # flock belongs to the open file description: a second open conflicts even here
        with pytest.raises(OutputLocked) as err, OutputLock(out):
            pass
        assert f"(pid {os.getpid()})" in str(err.value)
        assert str(out) in str(err.value) and "another --out" in str(err.value)
    with OutputLock(out) as lock:  # released on exit
        assert lock._fd is not None
    # released on exit by an exception too
    with pytest.raises(RuntimeError), OutputLock(out):
        raise RuntimeError("boom")
    with OutputLock(out):
        pass


HOLDER = """
import sys, time
from engine.io.outdir import OutputLock
with OutputLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=rf"\(pid {proc.pid}\)"), OutputLock(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)  # even SIGKILL releases a flock
        proc.wait(timeout=10)
        proc.stdout.close()
    with OutputLock(out):
        assert (out / outdir.LOCK).read_text() == str(os.getpid())


def test_lock_on_an_impossible_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EngineError, match="cannot create the output directory"):
        OutputLock(blocker / "out").__enter__()


# --------------------------------------------------------------------------- run.json


def test_run_json_round_trip(tmp_path):
    assert read_run_json(tmp_path) is None
    data = {"run_id": "abc", "out": tmp_path, "counts": {"ok": 3}, "at": datetime(2024, 1, 1)}
    write_run_json(tmp_path, data)
    back = read_run_json(tmp_path)
    assert back == {
        "run_id": "abc",
        "out": str(tmp_path),
        "counts": {"ok": 3},
        "at": "2024-01-01 00:00:00",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temp left


def test_run_json_write_is_atomic(tmp_path, monkeypatch):
    import errno

    from engine.errors import OutputError
    from engine.io import atomic

    write_run_json(tmp_path, {"run": 1})
    real_write_all = atomic._write_all

    def torn(fd, data):
        real_write_all(fd, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", torn)
    with pytest.raises(OutputError, match=r"run\.json: cannot write run\.json: No space left"):
        write_run_json(tmp_path, {"run": 2})
    monkeypatch.undo()
    assert read_run_json(tmp_path) == {"run": 1}  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary left


def test_corrupt_run_json_is_an_engine_error(tmp_path):
    (tmp_path / "run.json").write_text('{"run_id": "abc", ')
    with pytest.raises(EngineError, match=r"run\.json: cannot read .*rewritten by the next run"):
        read_run_json(tmp_path)
