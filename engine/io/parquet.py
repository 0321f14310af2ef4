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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.io.atomic import write_atomically

PREDICTIONS = "predictions"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def _column(dtype: pl.DataType, *, required: bool = False) -> Any:
    """A field of Row with its Parquet type; null (None) until a filler sets it."""
    if required:
        return field(metadata={"dtype": dtype})
    return field(default=None, metadata={"dtype": dtype})


@dataclass(slots=True)
class Row:
    """One image's row of a predictions part. SCHEMA is read off it: names, order and types.

    A column is a field here plus the line of its group's filler that sets it:
        location, file, header                engine/io/reader.py  `prepare`
        DICOM tags                            engine/io/dicom.py   `_META_KEYWORDS`
        status, error, model outputs, time    engine/screening.py  `finish_batch`
        the run's models, backend, threshold  engine/screening.py  `common_columns`
    """

    key: int = _column(pl.UInt64(), required=True)
    source: str = _column(pl.String(), required=True)
    member: str | None = _column(pl.String(), required=True)
    sha256: str | None = _column(pl.String())
    # stat of `source` (the file, or the archive holding the member) when it was read; null when
    # unknown (written by an older version, or the file changed while being read)
    source_size: int | None = _column(pl.Int64())
    source_mtime_ns: int | None = _column(pl.Int64())
    format: str | None = _column(pl.String())
    width: int | None = _column(pl.Int32())
    height: int | None = _column(pl.Int32())
    bit_depth: int | None = _column(pl.Int16())
    patient_id: str | None = _column(pl.String())
    study_uid: str | None = _column(pl.String())
    sop_uid: str | None = _column(pl.String())
    view_position: str | None = _column(pl.String())
    modality: str | None = _column(pl.String())
    status: str | None = _column(pl.String())
    error: str | None = _column(pl.String())
    prob: float | None = _column(pl.Float32())
    decision: bool | None = _column(pl.Boolean())
    threshold: float | None = _column(pl.Float32())
    lung_bbox: list[int] | None = _column(pl.Array(pl.Int32(), 4))
    lung_fraction: float | None = _column(pl.Float32())
    model_id: str | None = _column(pl.String())
    backend: str | None = _column(pl.String())
    run_id: str | None = _column(pl.String())
    screened_at: datetime | None = _column(pl.Datetime("us", "UTC"))

    def update(self, columns: Mapping[str, Any]) -> None:
        """Set the named columns (AttributeError for a name that is not one)."""
        for name, value in columns.items():
            setattr(self, name, value)

    def columns(self) -> dict[str, Any]:
        """Column name -> value, in SCHEMA's order (what `rows_frame` takes)."""
        return {name: getattr(self, name) for name in SCHEMA}


SCHEMA: dict[str, pl.DataType] = {f.name: f.metadata["dtype"] for f in fields(Row)}


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
