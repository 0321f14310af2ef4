"""Embeddings -> ``index.usearch`` (cosine, f16; usearch key == Parquet ``key``).

Each shard's embeddings are first written beside its Parquet part as
``embeddings/part-NNNNN.npz`` (before the part, which is the commit point). Merging them into
the index is a separate, idempotent step (``sync_index``): it adds only keys the index lacks,
only from sidecars whose part is committed, saves the index atomically, and only then deletes
the sidecars. A crash at any moment therefore loses nothing and duplicates nothing.

A key rescreened by `--rescreen-changed` comes back in a later part's sidecar: its vector
replaces the one in the index (sidecars are merged in part order, so the index holds the vector
of the key's current row, the one in its highest-numbered part; see engine/io/parquet.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.io.parquet import list_parts

EMBEDDINGS = "embeddings"
INDEX = "index.usearch"
SIDECAR_RE = re.compile(r"^part-(\d{5,})\.npz$")


def index_path(out: Path) -> Path:
    return Path(out) / INDEX


def sidecar_path(out: Path, number: int) -> Path:
    return Path(out) / EMBEDDINGS / f"part-{number:05d}.npz"


def write_sidecar(out: Path, number: int, keys: np.ndarray, vectors: np.ndarray) -> Path:
    final = sidecar_path(out, number)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, keys=keys.astype(np.uint64), vectors=vectors.astype(np.float16))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def _sidecars(out: Path) -> list[tuple[int, Path]]:
    d = Path(out) / EMBEDDINGS
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
    try:
        index = _usearch_index_class().restore(str(path), view=view)
    except (ValueError, RuntimeError):  # usearch: "Not a dense USearch index!", truncated...
        index = None
    if index is None:
        raise EngineError(f"{path}: not a usearch index (corrupt?); delete it and rerun cxr screen")
    return index


@dataclass(frozen=True, slots=True)
class SyncResult:
    added: int
    size: int


def sync_index(out: Path, ndim: int) -> SyncResult:
    """Merge committed sidecars into the index (idempotent); call while holding the lock."""
    committed = {n for n, _ in list_parts(out)}
    pending = []
    for number, path in _sidecars(out):
        if number in committed:
            pending.append(path)
        else:
            path.unlink()  # written before a crash that came before its part was committed
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
    added = 0
    for path in pending:
        with np.load(path) as z:
            keys, vectors = z["keys"], z["vectors"]
        known = np.asarray(index.contains(keys), dtype=bool).reshape(-1)
        if known.any():  # rescreened (or merged before a crash): the later vector wins
            index.remove(keys[known])
        index.add(keys, vectors)
        added += int((~known).sum())
    final = index_path(out)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    index.save(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for path in pending:
        path.unlink()
    return SyncResult(added=added, size=len(index))
