"""The review page's view of one `cxr screen` output directory, built for 10^6 rows.

What stays in memory is a *slim* frame: per row only the key, the number of the part holding it
and the small fixed-width columns the table filters and sorts on (prob, decision, status,
lung_fraction, width, height, screened_at): about 30 bytes a row, 30 MB for 10^6 rows. It is
built once from the Parquet parts and extended by the parts a still-running `cxr screen`
commits. The text columns (paths, DICOM ids, errors) stay on disk:

* a page is filter + sort + slice on the slim frame, then the full rows of that page are read
  from the few parts that hold them (projection + `key in page` over those parts only);
* a free-text search is one lazy scan over the text columns (polars `scan_parquet`), whose
  matching keys are kept in a small LRU, so paging through a search scans once;
* sorting by a text column computes that column's rank once (4 bytes a row) and keeps it;
* a deep page (offset beyond 20 000) sorts fully once and keeps that order for the next pages;
* counts come from the slim frame; the summary is kept until the parts change.

The first request pays for building the slim frame, the later ones for a page or a scan
(latencies measured on 10^6 rows: docs/measurements.md).

Only current rows are shown: a file rescreened by `cxr screen --rescreen-changed` has its old row
in an earlier part, which `parquet.current` (the highest-numbered part wins) leaves out of the
slim frame and of every scan. `Filters.run` keeps the rows one run wrote (`cxr runs`).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl

from engine.errors import ConfigError, EngineError
from engine.io import parquet, thumbs
from engine.io.outdir import read_run_json

TABLE_COLUMNS = (
    "key",
    "source",
    "member",
    "sha256",
    "format",
    "width",
    "height",
    "bit_depth",
    "patient_id",
    "study_uid",
    "sop_uid",
    "view_position",
    "modality",
    "status",
    "error",
    "prob",
    "decision",
    "threshold",
    "lung_bbox",
    "lung_fraction",
    "screened_at",
    "run_id",
)
STATUS = pl.Enum(["error", "ok"])  # lexical order: sorts like the strings on disk
SLIM_COLUMNS = (
    "key",
    "prob",
    "decision",
    "status",
    "lung_fraction",
    "width",
    "height",
    "screened_at",
)
SEARCHED = ("source", "member", "patient_id", "study_uid", "sop_uid")
RANKED = frozenset({"source", "member", "patient_id", "study_uid", "sop_uid", "format"})
SORTABLE = frozenset(SLIM_COLUMNS) | RANKED
MAX_PAGE = 500
MAX_OFFSET = 2**53 - 1  # the page's offsets are JavaScript numbers: exact up to here
TOP_K_UP_TO = 20_000
HISTOGRAM_BINS = 20
KEY_MAX = 2**64 - 1

Decision = Literal["positive", "negative"]
Status = Literal["ok", "error"]


@dataclass(frozen=True, slots=True)
class Filters:
    decision: Decision | None = None
    status: Status | None = None
    prob_min: float | None = None
    prob_max: float | None = None
    text: str | None = None
    run: str | None = None  # the run_id that wrote the rows

    def numeric(self) -> pl.Expr | None:
        """The part of the filter the slim frame answers (all but the text)."""
        terms: list[pl.Expr] = []
        if self.decision is not None:
            terms.append(pl.col("decision") == (self.decision == "positive"))
        if self.status is not None:
            terms.append(pl.col("status") == self.status)
        if self.prob_min is not None:
            terms.append(pl.col("prob") >= self.prob_min)
        if self.prob_max is not None:
            terms.append(pl.col("prob") <= self.prob_max)
        return pl.all_horizontal(terms) if terms else None

    @property
    def needle(self) -> str:
        return (self.text or "").strip()


def text_match(needle: str) -> pl.Expr:
    """Rows whose path, member or DICOM ids contain `needle` (any case), or whose key does."""
    pattern = "(?i)" + re.escape(needle)
    hits = [pl.col(c).str.contains(pattern).fill_null(False) for c in SEARCHED]
    if needle.isdigit():  # a key typed or pasted whole or in part
        hits.append(pl.col("key").cast(pl.String).str.contains(needle, literal=True))
    return pl.any_horizontal(hits)


@dataclass(frozen=True, slots=True)
class Page:
    total: int
    offset: int
    limit: int
    rows: list[dict[str, Any]]


def parse_key(text: str) -> int:
    """A key as typed in a URL -> int; ConfigError for anything that is not one."""
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > KEY_MAX:
        raise ConfigError(f"{text[:40]!r} is not an image key (an unsigned 64-bit integer)")
    return int(text)


class RunStore:
    """Read-only access to one output directory; safe to share between request threads."""

    def __init__(self, out: Path, *, report_dir: Path | None = None) -> None:
        self.out = Path(out)
        if not parquet.parts_dir(self.out).is_dir():
            raise EngineError(
                f"{self.out}: no predictions/ folder; is this the --out of a `cxr screen` run?"
            )
        self.report_dir = Path(report_dir) if report_dir else self.out / "report"
        self._lock = threading.RLock()
        self._stamp: tuple[int, int] | None = None
        self._parts: list[tuple[int, Path]] = []
        self._slim = pl.DataFrame(schema=_SLIM_SCHEMA)
        self._sorted_keys = pl.DataFrame(schema={"key": pl.UInt64(), "part": pl.Int32()})
        self._ranks: dict[str, pl.Series] = {}
        self._searches: OrderedDict[str, pl.Series] = OrderedDict()
        self._orders: OrderedDict[tuple[Filters, str, bool], pl.DataFrame] = OrderedDict()
        self._summary: dict[str, Any] | None = None
        self._thumb_cache: OrderedDict[int, dict[int, tuple[bytes, bytes]]] = OrderedDict()

    # -- parts and the slim frame ----------------------------------------------------------

    def _refresh(self) -> None:
        """Pick up parts committed since the last request (one stat when there are none)."""
        d = parquet.parts_dir(self.out)
        try:
            st = d.stat()
        except OSError as exc:
            raise EngineError(f"{d}: cannot read ({exc.strerror})") from None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return
        parts = parquet.list_parts(self.out)
        if parts != self._parts:
            known = {n for n, _ in self._parts}
            if not known <= {n for n, _ in parts}:  # a part vanished: start over
                self._slim = self._slim.clear()
                known = set()
            fresh = [(n, p) for n, p in parts if n not in known]
            if fresh:
                slim = pl.concat([self._slim, _read_slim(fresh)], how="vertical")
                self._slim = parquet.current(slim.lazy()).collect()
            self._parts = parts
            self._sorted_keys = self._slim.select("key", "part").sort("key")
            self._ranks.clear()
            self._searches.clear()
            self._orders.clear()
            self._summary = None
            self._thumb_cache.clear()
        self._stamp = stamp

    def _state(self) -> tuple[pl.DataFrame, list[Path]]:
        with self._lock:
            self._refresh()
            return self._slim, [p for _, p in self._parts]

    def scan(self) -> pl.LazyFrame:
        """A lazy scan of every committed part, table columns only."""
        _, paths = self._state()
        if not paths:
            return pl.LazyFrame(schema={c: parquet.SCHEMA[c] for c in TABLE_COLUMNS})
        scan = pl.scan_parquet(paths, missing_columns="insert").select(TABLE_COLUMNS)
        return parquet.current(scan)

    def part_of(self, key: int) -> int | None:
        """The number of the part holding `key`, or None when the run has no such image."""
        with self._lock:
            self._refresh()
            keys = self._sorted_keys["key"]
            i = int(keys.search_sorted(key, side="left"))
            if i < len(keys) and keys[i] == key:
                return int(self._sorted_keys["part"][i])
            return None

    # -- the table -------------------------------------------------------------------------

    def _filtered(self, filters: Filters, slim: pl.DataFrame) -> pl.DataFrame:
        numeric = filters.numeric()
        if numeric is not None:
            slim = slim.filter(numeric)
        if filters.needle:
            slim = slim.filter(pl.col("key").is_in(self._search(filters.needle).implode()))
        if filters.run:
            slim = slim.filter(pl.col("key").is_in(self._run_keys(filters.run).implode()))
        return slim

    def _run_keys(self, run: str) -> pl.Series:
        """Keys of the current rows one run wrote (one scan, then kept with the searches)."""
        token = "\0run:" + run  # no typed search holds a NUL
        with self._lock:
            hit = self._searches.get(token)
            if hit is not None:
                return hit
        keys = self.scan().filter(pl.col("run_id") == run).select("key").collect()["key"]
        with self._lock:
            self._searches[token] = keys
            while len(self._searches) > 8:
                self._searches.popitem(last=False)
        return keys

    def _search(self, needle: str) -> pl.Series:
        """Keys of the rows matching a free-text search (one scan, then kept in an LRU)."""
        with self._lock:
            hit = self._searches.get(needle)
            if hit is not None:
                self._searches.move_to_end(needle)
                return hit
        keys = self.scan().filter(text_match(needle)).select("key").collect()["key"]
        with self._lock:
            self._searches[needle] = keys
            while len(self._searches) > 8:
                self._searches.popitem(last=False)
        return keys

    def _rank(self, column: str) -> pl.Series:
        """Dense rank of a text column, aligned with the slim frame (computed once)."""
        with self._lock:
            if column in self._ranks:
                return self._ranks[column]
            slim = self._slim
        rank = (
            self.scan()
            .select(pl.col(column).rank("dense").cast(pl.UInt32).alias(f"rank_{column}"))
            .collect()
            .to_series()
        )
        with self._lock:
            if rank.len() != self._slim.height or slim is not self._slim:
                return rank  # the parts changed meanwhile: use it once, do not keep it
            self._ranks[column] = rank
        return rank

    def page(
        self,
        filters: Filters,
        *,
        sort: str = "key",
        descending: bool = False,
        offset: int = 0,
        limit: int = 50,
    ) -> Page:
        if sort not in SORTABLE:
            raise ConfigError(f"cannot sort by {sort!r}; one of: {', '.join(sorted(SORTABLE))}")
        if not 0 <= offset <= MAX_OFFSET or not 1 <= limit <= MAX_PAGE:
            raise ConfigError(
                f"offset must be between 0 and {MAX_OFFSET} and limit between 1 and {MAX_PAGE}"
            )
        base, _ = self._state()
        slim, by = base, sort
        if sort in RANKED:
            rank = self._rank(sort)
            if rank.len() == slim.height:
                slim = slim.with_columns(rank)
                by = rank.name
            else:  # the parts changed between the two reads: sort this page from the disk
                return self._page_from_disk(filters, sort, descending, offset, limit)
        filtered = self._filtered(filters, slim)
        # key breaks ties, so consecutive pages never overlap or skip a row
        order = [by] if by == "key" else [by, "key"]
        flags = [descending, False][: len(order)]
        if offset + limit <= TOP_K_UP_TO:  # sort + slice runs as a top-k: fast near the top
            chosen = (
                filtered.lazy()
                .sort(order, descending=flags, nulls_last=True)
                .slice(offset, limit)
                .select("key", "part")
                .collect()
            )
        else:  # deep pages: one full sort, kept for the next pages, beats a deep top-k
            ordered = self._ordered(filters, sort, descending)
            if ordered is None:
                ordered = filtered.sort(order, descending=flags, nulls_last=True).select(
                    "key", "part"
                )
                self._remember_order(filters, sort, descending, ordered, base)
            chosen = ordered.slice(offset, limit)
        return Page(filtered.height, offset, limit, self._rows_of(chosen))

    def _ordered(self, filters: Filters, sort: str, descending: bool) -> pl.DataFrame | None:
        with self._lock:
            return self._orders.get((filters, sort, descending))

    def _remember_order(
        self,
        filters: Filters,
        sort: str,
        descending: bool,
        ordered: pl.DataFrame,
        slim: pl.DataFrame,
    ) -> None:
        with self._lock:
            if slim is not self._slim:
                return  # sorted before new parts came in
            self._orders[(filters, sort, descending)] = ordered
            while len(self._orders) > 2:  # 12 bytes a row each
                self._orders.popitem(last=False)

    def _page_from_disk(
        self, filters: Filters, sort: str, descending: bool, offset: int, limit: int
    ) -> Page:
        lf = self.scan()
        numeric = filters.numeric()
        if numeric is not None:
            lf = lf.filter(numeric)
        if filters.needle:
            lf = lf.filter(text_match(filters.needle))
        if filters.run:
            lf = lf.filter(pl.col("run_id") == filters.run)
        rows = (
            lf.sort([sort, "key"], descending=[descending, False], nulls_last=True)
            .slice(offset, limit)
            .collect()
        )
        total = lf.select(pl.len()).collect().item()
        return Page(int(total), offset, limit, [row_json(r) for r in rows.iter_rows(named=True)])

    def _rows_of(self, chosen: pl.DataFrame) -> list[dict[str, Any]]:
        """Full rows of the chosen keys, in their order, read from the parts that hold them."""
        if chosen.height == 0:
            return []
        paths = [parquet.part_path(self.out, n) for n in chosen["part"].unique().sort()]
        chosen_rows = (
            pl.scan_parquet(paths, missing_columns="insert")
            .select(TABLE_COLUMNS)
            .filter(pl.col("key").is_in(chosen["key"].implode()))
        )
        full = parquet.current(chosen_rows).collect()  # an older part may hold a key's old row
        by_key = {r["key"]: r for r in full.iter_rows(named=True)}
        return [row_json(by_key[k]) for k in chosen["key"] if k in by_key]

    # -- one image -------------------------------------------------------------------------

    def row(self, key: int) -> dict[str, Any] | None:
        """The recorded row of `key` (raw values), or None when the run has no such image."""
        number = self.part_of(key)
        if number is None:
            return None
        hit = (
            pl.scan_parquet(parquet.part_path(self.out, number), missing_columns="insert")
            .select(TABLE_COLUMNS)
            .filter(pl.col("key") == key)
            .collect()
        )
        return hit.row(0, named=True) if hit.height else None

    def previews(self, key: int) -> tuple[bytes, bytes] | None:
        """(thumbnail JPEG, mask PNG) of `key`, from the thumbs part beside its part."""
        number = self.part_of(key)
        if number is None:
            return None
        with self._lock:
            cached = self._thumb_cache.get(number)
            if cached is not None:
                self._thumb_cache.move_to_end(number)
                return cached.get(key)
        path = thumbs.thumbs_path(self.out, number)
        if not path.is_file():
            return None
        df = pl.read_parquet(path)
        by_key = {
            int(k): (t, m)
            for k, t, m in zip(df["key"], df["thumb_jpeg"], df["mask_png"], strict=True)
        }
        with self._lock:
            # a thumbs part holds up to shard-size previews (docs/measurements.md, Thumbnails):
            # keep a few parts
            self._thumb_cache[number] = by_key
            while len(self._thumb_cache) > 16:
                self._thumb_cache.popitem(last=False)
        return by_key.get(key)

    # -- summary ---------------------------------------------------------------------------

    def run_info(self) -> dict[str, Any]:
        run = read_run_json(self.out) or {}
        models = run.get("models", {})
        classifier = models.get("classifier", {})
        segmenter = models.get("segmenter", {})
        return {
            "out": str(self.out),
            "run_id": run.get("run_id"),
            "status": run.get("status"),
            "started_at": run.get("started_at"),
            "updated_at": run.get("updated_at"),
            "backend": run.get("backend"),
            "model_id": models.get("model_id"),
            "threshold": models.get("threshold"),
            "trained": bool(classifier.get("trained")) and bool(segmenter.get("trained")),
            "inputs": run.get("config", {}).get("inputs", []),
            "max_pixels": run.get("config", {}).get("max_pixels"),
        }

    def summary(self) -> dict[str, Any]:
        slim, _ = self._state()
        with self._lock:
            if self._summary is not None and slim is self._slim:
                return self._summary
        counts = {"total": slim.height, "ok": 0, "error": 0, "positive": 0, "negative": 0}
        for status, decision, n in slim.group_by("status", "decision").len().iter_rows():
            counts["ok" if status == "ok" else "error"] += n
            if status == "ok" and decision is not None:
                counts["positive" if decision else "negative"] += n
        bins = (
            slim.filter((pl.col("status") == "ok") & pl.col("prob").is_not_null())
            .select(
                (pl.col("prob") * HISTOGRAM_BINS)
                .floor()
                .clip(0, HISTOGRAM_BINS - 1)
                .cast(pl.Int32)
                .alias("bin")
            )
            .group_by("bin")
            .len()
        )
        hist = [0] * HISTOGRAM_BINS
        for b, n in bins.iter_rows():
            hist[b] = n
        result = {
            "counts": counts,
            "histogram": {
                "edges": [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)],
                "counts": hist,
            },
        }
        with self._lock:
            if slim is self._slim:
                self._summary = result
        return result

    # -- evaluation report -----------------------------------------------------------------

    REPORT_FILES = {
        "report.html": "text/html; charset=utf-8",
        "metrics.json": "application/json",
        "roc.png": "image/png",
        "pr.png": "image/png",
        "reliability.png": "image/png",
    }

    def report_file(self, name: str) -> Path | None:
        """One file of the `cxr evaluate --report` folder, by its fixed name, or None."""
        if name not in self.REPORT_FILES:
            return None
        path = self.report_dir / name
        return path if path.is_file() else None

    def report_metrics(self) -> dict[str, Any] | None:
        path = self.report_file("metrics.json")
        if path is None:
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        overall = doc.get("overall", {}) if isinstance(doc, dict) else {}
        return {
            "counts": doc.get("counts"),
            "overall": {
                "images": overall.get("images"),
                "patients": overall.get("patients"),
                "positives": overall.get("positives"),
                "negatives": overall.get("negatives"),
                "confusion": overall.get("confusion"),
                "metrics": overall.get("metrics", {}),
            },
            "caveats": doc.get("caveats", []),
            "plots": [n for n in ("roc.png", "pr.png") if self.report_file(n) is not None],
            "html": self.report_file("report.html") is not None,
        }


_SLIM_SCHEMA: dict[str, pl.DataType] = {
    **{c: parquet.SCHEMA[c] for c in SLIM_COLUMNS},
    "status": STATUS,
    "part": pl.Int32(),
}


def _read_slim(parts: list[tuple[int, Path]]) -> pl.DataFrame:
    """The slim columns of some parts, each row tagged with the number of its part."""
    number_of = {str(p): n for n, p in parts}
    df = (
        pl.scan_parquet([p for _, p in parts], include_file_paths="file", missing_columns="insert")
        .select(*SLIM_COLUMNS, "file")
        .collect()
    )
    # Series.replace_strict: the same in an expression context costs far more (measured:
    # docs/measurements.md)
    part = df["file"].replace_strict(number_of, return_dtype=pl.Int32()).alias("part")
    status = df["status"].cast(STATUS, strict=False)
    return df.drop("file").with_columns(status, part)


def row_json(row: dict[str, Any]) -> dict[str, Any]:
    """A row for the browser: keys as strings (JS numbers lose uint64 precision), no NaN."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if name == "key":
            value = str(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, datetime):
            value = value.isoformat()
        out[name] = value
    out["name"] = display_name(row.get("source"), row.get("member"))
    return out


def display_name(source: str | None, member: str | None) -> str:
    if member:
        return member.replace("\\", "/").rsplit("/", 1)[-1]
    return os.path.basename(source or "") or (source or "")
