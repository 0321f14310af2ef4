"""`cxr similar`: the screened cases whose embeddings are nearest to a query.

The query is an image file, run through the same Screener as the archive was (same models,
same pipeline), or the `key` of an image already screened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.config import max_threads
from engine.errors import ConfigError, EngineError
from engine.io import parquet, vectors
from engine.io.archive import DEFAULT_MAX_FILE_BYTES, ImageRef, Item, image_key
from engine.io.files import NotRegularFile, open_regular
from engine.io.outdir import read_run_json
from engine.models import load_models

EXACT_SEARCH_UP_TO = 100_000  # below this an exact scan is fast and removes any HNSW miss
# Above it, HNSW with this search breadth (usearch's default is 64): the recall at 10^6 vectors
# keeps rising up to it for a few ms a query (benchmarks/bench_usearch.py; docs/measurements.md).
EXPANSION_SEARCH = 512


@dataclass(frozen=True, slots=True)
class Neighbour:
    rank: int
    key: int
    similarity: float
    source: str
    member: str | None
    prob: float | None
    decision: bool | None


@dataclass(frozen=True, slots=True)
class SimilarResult:
    query: str
    query_key: int | None  # the key if the query was one, or the image's own key if screened
    neighbours: list[Neighbour]

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "query_key": self.query_key,
            "neighbours": [
                n.__dict__ if hasattr(n, "__dict__") else _asdict(n) for n in self.neighbours
            ],
        }


def _asdict(n: Neighbour) -> dict[str, Any]:
    return {f: getattr(n, f) for f in n.__slots__}


def similar(out: Path, query: str, *, k: int = 10, models_dir: Path | None = None) -> SimilarResult:
    if k < 1:
        raise ConfigError(f"-k must be at least 1, not {k}")
    out = Path(out)
    index = vectors.load_index(out, view=True)
    if index is None or len(index) == 0:
        if (parquet.read_predictions(out, ["status"])["status"] == "ok").any():  # index lost
            raise EngineError(
                f"{out}: no index.usearch with embeddings; `cxr index rebuild {out}` rebuilds "
                "it from the embeddings the run keeps"
            )
        raise EngineError(
            f"{out}: no index.usearch with embeddings; run `cxr screen ... --out {out}` first"
        )
    stored = _stored_vector(index, query)
    if stored is not None:  # a key of the run wins over a file that happens to share its name
        query_key: int | None = int(query)
        vector = stored
        exclude = query_key  # a key asks for *other* cases
    elif os.path.exists(query):
        vector = _embed_file(out, Path(query), models_dir)
        query_key = image_key(os.path.abspath(query), None)
        exclude = None
    elif query.isascii() and query.isdigit():
        raise EngineError(_not_indexed(out, query))
    else:
        raise ConfigError(
            f"QUERY {query!r} is neither an existing image file nor a key (an integer)"
        )
    pairs = _nearest(index, vector, k, exclude=exclude, first=query_key)
    return SimilarResult(query=query, query_key=query_key, neighbours=_join_rows(out, pairs))


def _nearest(
    index, vector: np.ndarray, k: int, *, exclude: int | None, first: int | None
) -> list[tuple[int, float]]:
    """The k nearest (key, similarity) pairs, `exclude` left out. Equal similarities (an image
    and its byte-identical copies) go to `first`, the query's own key, then by key: the order
    usearch returns ties in is its own, and a copy must not outrank the image itself."""
    exact = len(index) <= EXACT_SEARCH_UP_TO
    # one more than asked shows whether a tie runs past the k-th; fetch more until none does
    count = min(len(index), k + 1 + (exclude is not None))
    while True:
        if not exact:
            index.expansion_search = max(EXPANSION_SEARCH, count)
        matches = index.search(vector, count, exact=exact)
        pairs = [
            (int(key), 1.0 - float(dist))
            for key, dist in zip(matches.keys, matches.distances, strict=True)
            if int(key) != exclude
        ]
        if count >= len(index) or len(pairs) <= k or pairs[-1][1] < pairs[k - 1][1]:
            break
        count = min(len(index), 2 * count)
    pairs.sort(key=lambda pair: (-pair[1], pair[0] != first, pair[0]))
    return pairs[:k]


def _stored_vector(index, query: str) -> np.ndarray | None:
    """The indexed vector of `query` read as a key, or None if it is not a key of the index."""
    if not (query.isascii() and query.isdigit()) or int(query) >= 2**64:
        return None  # keys are uint64 (np.uint64 would raise OverflowError)
    got = index.get(np.uint64(int(query)))
    return None if got is None else np.asarray(got, np.float32).reshape(-1)


def _not_indexed(out: Path, query: str) -> str:
    """Why the key `query` has no vector: its image failed, or it is no image of the run."""
    index = vectors.index_path(out)
    parts = [p for _, p in parquet.list_parts(out)]
    if int(query) < 2**64 and parts:
        key = pl.lit(int(query), dtype=pl.UInt64())
        rows = pl.scan_parquet(parts).filter(pl.col("key") == key).select("status", "error")
        found = rows.collect()
        if found.height and found["status"][0] == "error":
            return f"key {query}: this image failed: {found['error'][0]}"
        if found.height:
            return (
                f"key {query} is screened but not in {index} yet: rerun `cxr screen` with the "
                "same --out to finish the index"
            )
    return f"key {query} is not in {index}"


def _join_rows(out: Path, pairs: list[tuple[int, float]]) -> list[Neighbour]:
    keys = [key for key, _ in pairs]
    cols = ["key", "source", "member", "prob", "decision"]
    parts = [p for _, p in parquet.list_parts(out)]
    # Filter inside the scan: a 10^6-row run reads only the k rows' columns it needs; then
    # only each key's current row (a rescreened file's old row stays in an earlier part).
    hits = pl.scan_parquet(parts).filter(pl.col("key").is_in(keys)).select(cols)
    rows = parquet.current(hits).collect()
    by_key = {r["key"]: r for r in rows.iter_rows(named=True)}
    result = []
    for rank, (key, sim) in enumerate(pairs, start=1):
        r = by_key.get(key, {})
        result.append(
            Neighbour(
                rank=rank,
                key=key,
                similarity=sim,
                source=r.get("source", "?"),
                member=r.get("member"),
                prob=r.get("prob"),
                decision=r.get("decision"),
            )
        )
    return result


def _embed_file(out: Path, path: Path, models_dir: Path | None) -> np.ndarray:
    from engine.io.reader import location, prepare
    from engine.screener import Screener

    data = _read_query(path)
    run = read_run_json(out) or {}
    recorded = run.get("models", {})
    directory = models_dir or (Path(recorded["directory"]) if recorded.get("directory") else None)
    config = run.get("config", {})
    models = load_models(directory, precision=config.get("precision", "auto"))
    if recorded.get("model_id") and recorded["model_id"] != models.model_id:
        raise ConfigError(
            f"{out} was screened with models {recorded['model_id']}, but {models.classifier.directory} "
            f"holds {models.model_id}: embeddings of different models are not comparable; "
            "pass --models with the run's models"
        )
    source = os.path.abspath(path)
    item = Item(
        ref=ImageRef(key=image_key(source, None), source=source, member=None), data=data, error=None
    )
    prepared = prepare(
        item,
        max_pixels=int(config.get("max_pixels", 100_000_000)),
        min_side=int(config.get("min_side", 32)),
    )
    if prepared.sample is None:
        raise EngineError(f"cannot screen the query: {prepared.row.error}")
    screener = Screener(
        models,
        backend="onnxruntime",
        batch_size=1,
        # recorded on the machine that screened, which may have had more cores
        threads=min(int(config.get("threads", 1)), max_threads()),
        decoder=config.get("decoder", "auto"),
    )
    try:
        pre = screener.preprocess([prepared.sample])
        if pre.errors:
            raise EngineError(f"cannot screen the query {location(source, None)}: {pre.errors[0]}")
        emb = screener.infer(pre).embedding[0]
    finally:
        screener.close()
    return emb / max(float(np.linalg.norm(emb)), 1e-12)


def _read_query(path: Path) -> bytes:
    """The query file's bytes, with the byte limit of `cxr screen`; never waits on a FIFO."""
    try:
        with open_regular(path) as f:
            data = f.read(DEFAULT_MAX_FILE_BYTES + 1)
    except NotRegularFile:
        raise EngineError(
            f"{path}: not a regular file (a directory, FIFO or device cannot be a query)"
        ) from None
    except OSError as exc:
        raise EngineError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > DEFAULT_MAX_FILE_BYTES:
        raise EngineError(f"{path}: larger than {DEFAULT_MAX_FILE_BYTES} bytes, as in cxr screen")
    return data
