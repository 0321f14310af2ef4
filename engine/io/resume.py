"""What a run on an existing output directory must match, checked before anything is written.

run.json is a record that can be lost or deleted, so it is not the only witness: the committed
Parquet parts say which models wrote the rows (`model_id`) and at which decision threshold
(`threshold`), the index says the dimension of the embeddings, and the parts' columns say
whether embeddings are stored in the rows (--embeddings-in-parquet). A run that does not match
is refused with the way forward (a new --out, or the directory's own options), because one
directory mixing them can never be read as one table
(`pl.read_parquet("OUT/predictions/*.parquet")`) or searched as one index again.

Then `resume` clears what a killed run left and says which keys are committed already: the
single-process runner and the Ray executor start every run on a directory this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from engine.errors import ConfigError
from engine.io import parquet, thumbs, vectors


@dataclass(frozen=True, slots=True)
class Holdings:
    """What the committed parts of an output directory hold."""

    model_ids: frozenset[str]
    thresholds: frozenset[float]  # as stored (float32)
    with_embeddings: frozenset[bool]  # per part: has an `embedding` column


def holdings(out: Path) -> Holdings | None:
    """What `out`'s committed parts hold, or None when it has none yet."""
    parts = [p for _, p in parquet.list_parts(out)]
    if not parts:
        return None
    # Reads one column of each part; tolerant of parts whose columns differ (older versions).
    lf = pl.scan_parquet(parts, missing_columns="insert", extra_columns="ignore")
    unique = [pl.col(c).unique().implode() for c in ("model_id", "threshold")]
    ids, thresholds = lf.select(unique).collect().row(0)
    return Holdings(
        model_ids=frozenset(str(m) for m in ids if m is not None),
        thresholds=frozenset(float(t) for t in thresholds if t is not None),
        with_embeddings=frozenset("embedding" in pl.read_parquet_schema(p) for p in parts),
    )


def check_resumable(
    out: Path,
    *,
    previous: dict[str, Any] | None,
    model_id: str,
    dim: int,
    threshold: float,
    with_embeddings: bool,
) -> None:
    """Raise ConfigError unless a run of `model_id` (embeddings of `dim`, deciding at
    `threshold`, with the embedding column or not) may write into `out`."""
    held = holdings(out)
    if held is not None:
        recorded = (previous or {}).get("models", {}).get("model_id")
        _check_models(out, held, recorded, model_id)
        _check_threshold(out, held, threshold)
        _check_embedding_column(out, held, with_embeddings)
    index = vectors.load_index(out, view=True)  # a corrupt one raises, naming the fix
    if index is not None and index.ndim != dim:
        raise ConfigError(
            f"{vectors.index_path(out)} holds {index.ndim}-d vectors but the models give "
            f"{dim}-d: this output directory belongs to other models; use a new --out"
        )


def _check_embedding_column(out: Path, held: Holdings, with_embeddings: bool) -> None:
    # Refused rather than written as an all-null column when off: directories screened
    # before this check have parts without the column, which such a column would mix again.
    if held.with_embeddings == {with_embeddings}:
        return
    flag = "--embeddings-in-parquet"
    if len(held.with_embeddings) > 1:
        raise ConfigError(
            f"{out} already mixes parts with and without the embedding column (an older cxr "
            "allowed it; read them with pl.scan_parquet(..., missing_columns='insert')): "
            "screen into a new --out"
        )
    had = "without" if with_embeddings else "with"
    now = "with" if with_embeddings else "without"
    raise ConfigError(
        f"{out} was screened {had} {flag} and this run is {now} it: parts with and without the "
        f"embedding column cannot be read as one table. Rerun {had} {flag}, or use a new --out"
    )


def _check_threshold(out: Path, held: Holdings, threshold: float) -> None:
    # Compared as stored: the column is float32, so 0.3 reads back as 0.30000001.
    stored = np.float32(threshold)
    others = sorted(t for t in held.thresholds if np.float32(t) != stored)
    if not others:
        return
    was = ", ".join(f"{t:.6g}" for t in sorted(held.thresholds))
    raise ConfigError(
        f"{out} was screened at decision threshold {was}; this run's is {float(stored):.6g} "
        "(--threshold, or the model's when not given): one table with decisions at two "
        f"thresholds misleads. Rerun with --threshold {others[0]:.6g}, or use a new --out "
        "(decisions at another threshold can also be recomputed from the `prob` column)"
    )


def _check_models(out: Path, held: Holdings, recorded: str | None, model_id: str) -> None:
    others = sorted((held.model_ids | ({recorded} if recorded else set())) - {model_id})
    if not others:
        return
    mixed = (
        " (it already mixes models: only a new --out gives comparable rows)"
        if len(held.model_ids) > 1
        else ""
    )
    raise ConfigError(
        f"{out} holds results of models {', '.join(others)}{mixed}; this run uses "
        f"{model_id}. Mixing models in one output would make its rows incomparable: "
        "use a new --out, or the run's --models and --precision"
    )


def resume(out: Path, dim: int) -> set[int]:
    """Finish what a killed run committed and drop what it did not; the keys already written.

    Call only while holding the output lock, after `check_resumable`.
    """
    remove_leftovers(out)
    vectors.sync_index(out, dim)  # sidecars committed with their parts go into the index
    return parquet.existing_keys(out)


def remove_leftovers(out: Path) -> None:
    """Temporary files of interrupted writes, and previews of shards that never committed."""
    parquet.remove_temporaries(out)
    thumbs.remove_orphans(out)
