"""Embeddings -> ``index.usearch`` (cosine, f16; usearch key == Parquet ``key``).

Each shard's embeddings are first written beside its Parquet part as
``embeddings/part-NNNNN.npz`` (before the part, which is the commit point). Merging them into
the index is a separate, idempotent step (``sync_index``): it adds only keys the index lacks,
only from sidecars whose part is committed, saves the index atomically, and only then moves the
sidecars to ``embeddings/indexed/``. A crash at any moment therefore loses nothing and
duplicates nothing.

The index is derived data: the sidecars in ``embeddings/indexed/`` are kept so that a lost or
corrupt index can be rebuilt (``rebuild_index``, `cxr index rebuild`; ``sync_index`` does it by
itself when the index file is gone). Runs made before the sidecars were kept have only the
Parquet ``embedding`` column, when they were screened with --embeddings-in-parquet.

A key rescreened by `--rescreen-changed` comes back in a later part's sidecar: its vector
replaces the one in the index (sidecars are merged in part order, in sync and in rebuild
alike, so the index holds the vector of the key's current row, the one in its highest-numbered
part; see engine/io/parquet.py).
"""

from __future__ import annotations

import errno
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.errors import EngineError
from engine.io.atomic import check_room, output_error, replacing, write_atomically
from engine.io.parquet import current, list_parts, parts_dir

EMBEDDINGS = "embeddings"
INDEXED = "indexed"  # under EMBEDDINGS: sidecars already merged, kept to rebuild the index
INDEX = "index.usearch"
SIDECAR_RE = re.compile(r"^part-(\d{5,})\.npz$")


def index_path(out: Path) -> Path:
    return Path(out) / INDEX


def sidecar_path(out: Path, number: int) -> Path:
    return Path(out) / EMBEDDINGS / f"part-{number:05d}.npz"


def indexed_dir(out: Path) -> Path:
    return Path(out) / EMBEDDINGS / INDEXED


def write_sidecar(out: Path, number: int, keys: np.ndarray, vectors: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, keys=keys.astype(np.uint64), vectors=vectors.astype(np.float16))
    return write_atomically(sidecar_path(out, number), buf.getvalue(), what="the embedding sidecar")


def _sidecars(out: Path) -> list[tuple[int, Path]]:
    """Sidecars not yet merged into the index (interrupted writes are deleted)."""
    return _listed(Path(out) / EMBEDDINGS)


def _kept_sidecars(out: Path) -> list[tuple[int, Path]]:
    """Sidecars already merged, kept to rebuild the index."""
    return _listed(indexed_dir(out))


def _listed(d: Path) -> list[tuple[int, Path]]:
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = SIDECAR_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
        elif p.name.startswith(".") and ".tmp" in p.name:
            p.unlink(missing_ok=True)  # an interrupted sidecar write
    return sorted(found)


def _keep(paths: list[Path], out: Path) -> None:
    """Move merged sidecars into indexed/. A move lost in a crash leaves the sidecar pending,
    and merging it again adds nothing (only keys the index lacks are added)."""
    if not paths:
        return
    kept = indexed_dir(out)
    try:
        kept.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, kept / path.name)
    except OSError as exc:
        raise output_error(kept, "the indexed embeddings", exc) from None


def _usearch_index_class():
    # Loading usearch's extension before onnxruntime's makes the latter crash on import
    # (SIGSEGV in libstdc++ codecvt; seen with usearch 2.26 and onnxruntime 1.23-1.32).
    # Loading onnxruntime first is harmless and avoids it.
    import onnxruntime  # noqa: F401
    from usearch.index import Index

    return Index


def new_index(ndim: int):
    return _usearch_index_class()(ndim=ndim, metric="cos", dtype="f16")


def load_index(out: Path, *, view: bool = False):
    """The saved index, or None if there is none yet."""
    path = index_path(out)
    if not path.exists():
        return None
    if not path.is_file():  # usearch would block on a FIFO, holding the GIL
        raise EngineError(f"{path}: not a regular file; delete it and rerun cxr screen")
    try:
        index = _usearch_index_class().restore(str(path), view=view)
    except (ValueError, RuntimeError):  # usearch: "Not a dense USearch index!", truncated...
        index = None
    if index is None:
        raise EngineError(
            f"{path}: not a usearch index (corrupt?); `cxr index rebuild {Path(out)}` rebuilds "
            "it from the embeddings the run keeps"
        )
    return index


@dataclass(frozen=True, slots=True)
class SyncResult:
    added: int
    size: int


def sync_index(out: Path, ndim: int) -> SyncResult:
    """Merge committed sidecars into the index (idempotent); call while holding the lock.

    Without an index file but with kept sidecars (the index was deleted), rebuild it first.
    """
    if not index_path(out).exists() and _kept_sidecars(out):
        rebuilt = rebuild_index(out, ndim=ndim)
        return SyncResult(added=rebuilt.size, size=rebuilt.size)
    pending = _pending(out)
    if not pending:  # nothing to add: a memory-mapped view tells the size without loading it
        view = load_index(out, view=True)
        return SyncResult(added=0, size=len(view) if view is not None else 0)
    index = load_index(out)
    if index is None:
        index = new_index(ndim)
    elif index.ndim != ndim:
        raise EngineError(
            f"{index_path(out)} holds {index.ndim}-d vectors but the model gives {ndim}-d; "
            "this output directory belongs to other models: use a new --out"
        )
    added = sum(_upsert(index, *_read_sidecar(path)) for path in pending)
    _save(index, out)
    _keep(pending, out)
    return SyncResult(added=added, size=len(index))


@dataclass(frozen=True, slots=True)
class RebuildResult:
    size: int
    from_sidecars: int  # vectors taken from embeddings/ (and embeddings/indexed/)
    from_parquet: int  # from the rows' `embedding` column (runs made before sidecars were kept)
    missing: int  # screened images (status ok) with no embedding kept anywhere


def rebuild_index(out: Path, *, ndim: int | None = None) -> RebuildResult:
    """A new index from every embedding the run keeps, replacing index.usearch (even a corrupt
    one); call while holding the lock. `ndim`: what the sidecars must hold, when known.

    Raises EngineError, leaving the directory as it was, when no embedding is kept at all.
    """
    out = Path(out)
    pending = _pending(out)
    in_part_order = sorted(
        [*_kept_sidecars(out), *((n, p) for n, p in _sidecars(out) if p in pending)]
    )
    index = None
    from_sidecars = 0
    for _, path in in_part_order:
        keys, vecs = _read_sidecar(path)
        if index is None:
            index = new_index(vecs.shape[1])
        _check_dim(out, path, vecs.shape[1], ndim if ndim is not None else index.ndim)
        from_sidecars += _upsert(index, keys, vecs)
    ok_keys, embeddings = _unindexed_rows(out, index)
    from_parquet = 0
    if embeddings is not None:
        keys, vecs = embeddings
        if index is None:
            index = new_index(vecs.shape[1])
        _check_dim(out, parts_dir(out), vecs.shape[1], ndim if ndim is not None else index.ndim)
        from_parquet = _add(index, keys, vecs)
    missing = len(ok_keys) - from_parquet
    if index is None:
        if missing:
            raise EngineError(
                f"{out}: none of its {missing} screened images has a kept embedding (no "
                f"{EMBEDDINGS}/ sidecars, no `embedding` column: an older cxr deleted them once "
                "indexed), so no index can be rebuilt; screen the inputs again into a new --out"
            )
        index_path(out).unlink(missing_ok=True)  # nothing screened ok: no index, as after a run
        return RebuildResult(size=0, from_sidecars=0, from_parquet=0, missing=0)
    _save(index, out)
    _keep(pending, out)
    return RebuildResult(
        size=len(index), from_sidecars=from_sidecars, from_parquet=from_parquet, missing=missing
    )


def _pending(out: Path) -> list[Path]:
    """Sidecars of committed parts not yet merged; those of uncommitted parts are deleted."""
    committed = {n for n, _ in list_parts(out)}
    pending = []
    for number, path in _sidecars(out):
        if number in committed:
            pending.append(path)
        else:
            path.unlink()  # written before a crash that came before its part was committed
    return pending


def _read_sidecar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["keys"], z["vectors"]


def _upsert(index, keys: np.ndarray, vecs: np.ndarray) -> int:
    """Add the keys, replacing the vector of a key the index already holds (a rescreened key,
    or a sidecar merged again after a crash); how many keys were new."""
    if len(keys) == 0:
        return 0
    known = np.asarray(index.contains(keys), dtype=bool).reshape(-1)
    if known.any():
        index.remove(keys[known])
    index.add(keys, vecs)
    return int((~known).sum())


def _add(index, keys: np.ndarray, vecs: np.ndarray) -> int:
    """Add the keys the index lacks; how many were added."""
    if len(keys) == 0:
        return 0
    fresh = ~np.asarray(index.contains(keys), dtype=bool).reshape(-1)
    if fresh.any():
        index.add(keys[fresh], vecs[fresh])
    return int(fresh.sum())


def _check_dim(out: Path, source: Path, got: int, want: int) -> None:
    if got != want:
        raise EngineError(
            f"{source} holds {got}-d embeddings but {out} holds {want}-d ones: this output "
            "directory mixes models; screen into a new --out"
        )


def _unindexed_rows(out: Path, index) -> tuple[list[int], tuple[np.ndarray, np.ndarray] | None]:
    """Keys of rows screened ok that the index lacks, and their Parquet embeddings if stored."""
    parts = [p for _, p in list_parts(out)]
    if not parts:
        return [], None
    lf = current(pl.scan_parquet(parts, missing_columns="insert", extra_columns="ignore"))
    ok = lf.filter(pl.col("status") == "ok").select("key").collect()["key"].to_numpy()
    if index is not None and len(ok):
        ok = ok[~np.asarray(index.contains(ok.astype(np.uint64)), dtype=bool).reshape(-1)]
    ok_keys = [int(k) for k in ok]
    with_column = [p for p in parts if "embedding" in pl.read_parquet_schema(p)]
    if not ok_keys or not with_column:
        return ok_keys, None
    rows = (
        current(pl.scan_parquet(with_column))
        .filter(pl.col("key").is_in(ok_keys))
        .select("key", "embedding")
        .collect()
    )
    vecs = rows["embedding"].to_numpy().astype(np.float32)
    usable = np.isfinite(vecs).all(axis=1)
    keys = rows["key"].to_numpy().astype(np.uint64)[usable]
    return ok_keys, (keys, unit(vecs[usable]))


def unit(v: np.ndarray) -> np.ndarray:
    """L2-normalise rows (cosine-invariant; keeps f16 storage in range)."""
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _save(index, out: Path) -> None:
    """Save atomically: temp file, fsync, rename over the old index.

    usearch writes the file itself and its errors carry no errno, so the free space is checked
    before (no doomed write of gigabytes) and after a failure, to name a full disk as such.
    """
    final = index_path(out)
    with replacing(final, what="the index", sync_file=True) as tmp:
        check_room(final.parent, index.serialized_length)
        try:
            index.save(str(tmp))
        except RuntimeError as exc:  # "Failed to serialize into stream"
            check_room(final.parent, index.serialized_length)
            raise OSError(errno.EIO, f"usearch: {exc}") from None
