"""Prediction rows -> ``predictions/part-NNNNN.parquet``, each part written atomically.

A part is the commit point of a shard: it is written to a temporary name, fsynced and renamed,
so a reader (or a resumed run) sees a whole part or none of it. The set of keys already in the
parts is what a rerun skips.

Current rows and history: a key normally has one row. `cxr screen --rescreen-changed` screens a
file whose content changed again and writes its new row into a new part; the old row stays
where it was, as history. The rule every reader follows, through `current`: **a key's current
row is its row in the highest-numbered part**. The new part is the commit point of the
replacement too, so a crash leaves either the old row current or the new one, never both.
`read_predictions` returns current rows unless asked for the history.

The columns of a directory are fixed by its first part: later parts are written with the same
columns (`directory_schema`, `conform`), so a directory written before a column was added to
SCHEMA stays readable as one table (polars refuses parts with columns the first one lacks).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.io.atomic import write_atomically

PREDICTIONS = "predictions"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")

SCHEMA: dict[str, pl.DataType] = {
    "key": pl.UInt64(),
    "source": pl.String(),
    "member": pl.String(),
    "sha256": pl.String(),
    # stat of `source` (the file, or the archive holding the member) when it was read; null when
    # unknown (written by an older version, or the file changed while being read)
    "source_size": pl.Int64(),
    "source_mtime_ns": pl.Int64(),
    "format": pl.String(),
    "width": pl.Int32(),
    "height": pl.Int32(),
    "bit_depth": pl.Int16(),
    "patient_id": pl.String(),
    "study_uid": pl.String(),
    "sop_uid": pl.String(),
    "view_position": pl.String(),
    "modality": pl.String(),
    "status": pl.String(),
    "error": pl.String(),
    "prob": pl.Float32(),
    "decision": pl.Boolean(),
    "threshold": pl.Float32(),
    "lung_bbox": pl.Array(pl.Int32(), 4),
    "lung_fraction": pl.Float32(),
    "model_id": pl.String(),
    "backend": pl.String(),
    "run_id": pl.String(),
    "screened_at": pl.Datetime("us", "UTC"),
}


def parts_dir(out: Path) -> Path:
    return Path(out) / PREDICTIONS


def part_path(out: Path, number: int) -> Path:
    return parts_dir(out) / f"part-{number:05d}.parquet"


def list_parts(out: Path) -> list[tuple[int, Path]]:
    """Committed parts, by number. Temporary files of an interrupted write are not parts, nor is
    anything but a regular file (a FIFO under a part's name would block every reader)."""
    d = parts_dir(out)
    if not d.is_dir():
        return []
    found = []
    with os.scandir(d) as entries:
        for entry in entries:
            m = PART_RE.match(entry.name)
            if m and entry.is_file():
                found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


def next_part_number(out: Path) -> int:
    parts = list_parts(out)
    return parts[-1][0] + 1 if parts else 0


def remove_temporaries(out: Path) -> int:
    """Delete leftovers of writes a crash interrupted (call only while holding the lock).

    Parts in predictions/, and ``.index.usearch.tmp-PID`` / ``.run.json.tmp-PID`` in `out`
    itself: the pid in their names differs on the next run, so nothing else ever replaces them.
    """
    removed = 0
    for d in (parts_dir(out), Path(out)):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
                    p.unlink(missing_ok=True)
                    removed += 1
    return removed


def existing_keys(out: Path) -> set[int]:
    parts = list_parts(out)
    if not parts:
        return set()
    keys = pl.scan_parquet([p for _, p in parts]).select("key").collect()["key"]
    return set(keys.to_list())


def rows_frame(
    rows: Iterable[dict[str, Any]], embeddings: np.ndarray | None = None
) -> pl.DataFrame:
    """Rows (dicts with SCHEMA's keys; missing ones are null) -> a frame with SCHEMA's types."""
    rows = list(rows)
    columns = {name: [r.get(name) for r in rows] for name in SCHEMA}
    df = pl.DataFrame(columns, schema=SCHEMA)
    if embeddings is not None:
        dim = embeddings.shape[1]
        df = df.with_columns(
            pl.Series("embedding", embeddings.astype(np.float32), dtype=pl.Array(pl.Float32, dim))
        )
    return df


def write_part(out: Path, number: int, df: pl.DataFrame) -> Path:
    """Write df as part `number`: temp file, fsync, rename, fsync the directory.

    Encoded in memory first (one shard), so that the file is written by our own writer, whose
    OSError (a full disk ...) becomes one OutputError; polars' own errors carry no errno.
    """
    final = part_path(out, number)
    if final.exists():
        raise FileExistsError(f"{final} already exists; parts are never overwritten")
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return write_atomically(final, buf.getvalue(), what="the Parquet part", sync_dir=True)


def current(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Only the current row of each key: its last row, `lf` scanning the parts in part order.

    A filter on `key` commutes with this (every row of a key passes or none does), so readers
    after a few keys filter first and call this on what is left.
    """
    return lf.unique(subset="key", keep="last", maintain_order=True)


def scan_predictions(out: Path, *, history: bool = False) -> pl.LazyFrame | None:
    """Lazy scan of the committed parts in part order: current rows, or every row; None if none."""
    parts = list_parts(out)
    if not parts:
        return None
    lf = pl.scan_parquet([p for _, p in parts], missing_columns="insert")
    return lf if history else current(lf)


def read_predictions(
    out: Path, columns: list[str] | None = None, *, history: bool = False
) -> pl.DataFrame:
    """The current row of every key (with `history`, every row ever written, in part order)."""
    lf = scan_predictions(out, history=history)
    if lf is None:
        return pl.DataFrame(schema=SCHEMA)
    return (lf.select(columns) if columns else lf).collect()


def directory_schema(out: Path) -> dict[str, pl.DataType] | None:
    """The columns of the directory's first part (None before the first part is written)."""
    parts = list_parts(out)
    return dict(pl.read_parquet_schema(parts[0][1])) if parts else None


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType] | None) -> pl.DataFrame:
    """`df` with exactly `schema`'s columns, in its order: missing ones null, extra ones dropped."""
    if schema is None or dict(df.schema) == schema:
        return df
    return df.select(
        [
            pl.col(name).cast(dtype) if name in df.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in schema.items()
        ]
    )
