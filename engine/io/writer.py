"""The writing side of a run: finished rows -> shards of files, each committed by its part.

A shard is `shard_size` rows: its embedding sidecar (engine/io/vectors.py) and its previews
(engine/io/thumbs.py) are written first, its Parquet part (engine/io/parquet.py: tmp + fsync +
rename) last, as the commit point, all named after the shard's number. A run killed at any
moment and rerun ends with every image once in Parquet and once in the index.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import OutputError
from engine.io import parquet, thumbs, vectors
from engine.io.parquet import Row


class ShardWriter:
    """Collects finished rows; every `shard_size` rows commits a sidecar and a Parquet part."""

    def __init__(
        self,
        out: Path,
        *,
        shard_size: int,
        common: dict[str, Any],  # columns every row shares (screening.common_columns)
        with_embeddings: bool,
        dim: int,
        number: int | None = None,  # the first part's number; None: after the last committed
    ):
        self.out = out
        self.shard_size = shard_size
        self.common = common
        self.with_embeddings = with_embeddings
        self.dim = dim
        self.number = parquet.next_part_number(out) if number is None else number
        self.schema = parquet.directory_schema(out)  # every part keeps the first one's columns
        self._rows: list[Row] = []
        self._vectors: list[np.ndarray | None] = []
        self._previews: list[tuple[bytes, bytes] | None] = []
        self.parts_written = 0

    def add(self, row: Row, vector: np.ndarray | None, preview: tuple[bytes, bytes] | None) -> None:
        self._rows.append(row)
        self._vectors.append(vector)
        self._previews.append(preview)
        if len(self._rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        if parquet.part_path(self.out, self.number).exists():
            # An interrupt landed after this shard's part was renamed into place but before
            # the bookkeeping below: the part holds exactly these rows, so it is committed.
            self._advance()
            return
        try:
            self._commit()
        except OutputError:
            # The part is the commit point: without it, this shard's sidecar and previews
            # would be orphans (a rerun deletes those too, but a failed run leaves nothing).
            if not parquet.part_path(self.out, self.number).exists():
                with contextlib.suppress(OSError):
                    vectors.sidecar_path(self.out, self.number).unlink(missing_ok=True)
                    thumbs.thumbs_path(self.out, self.number).unlink(missing_ok=True)
            raise
        self._advance()

    def _commit(self) -> None:
        rows = [{**r.columns(), **self.common} for r in self._rows]
        ok = [i for i, v in enumerate(self._vectors) if v is not None]
        keys = np.array([rows[i]["key"] for i in ok], np.uint64)
        mat = np.stack([v for v in self._vectors if v is not None]) if ok else None
        if mat is not None:
            vectors.write_sidecar(self.out, self.number, keys, vectors.unit(mat))
        shown = [(r["key"], p) for r, p in zip(rows, self._previews, strict=True) if p is not None]
        if shown:
            thumbs.write_thumbs(
                self.out,
                self.number,
                [k for k, _ in shown],
                [p[0] for _, p in shown],
                [p[1] for _, p in shown],
            )
        emb = None
        if self.with_embeddings:
            # every part has the column, even one of error rows only: one schema per directory
            emb = np.full((len(rows), self.dim), np.nan, np.float32)
            if mat is not None:
                emb[ok] = mat
        frame = parquet.conform(parquet.rows_frame(rows, emb), self.schema)
        parquet.write_part(self.out, self.number, frame)

    def _advance(self) -> None:
        self.number += 1
        self.parts_written += 1
        self._rows, self._vectors, self._previews = [], [], []
