"""What a run on an existing output directory must match, checked before anything is written.

run.json is a record that can be lost or deleted, so it is not the only witness: the committed
Parquet parts say which models wrote the rows (`model_id`), and the index says the dimension of
the embeddings. A run that does not match is refused with the way forward (a new --out, or the
directory's own options), because one directory mixing them can never be read as one table or
searched as one index again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from engine.errors import ConfigError
from engine.io import parquet, vectors


@dataclass(frozen=True, slots=True)
class Holdings:
    """What the committed parts of an output directory hold."""

    model_ids: frozenset[str]


def holdings(out: Path) -> Holdings | None:
    """What `out`'s committed parts hold, or None when it has none yet."""
    parts = [p for _, p in parquet.list_parts(out)]
    if not parts:
        return None
    # Reads one column of each part; tolerant of parts whose columns differ (older versions).
    lf = pl.scan_parquet(parts, missing_columns="insert", extra_columns="ignore")
    ids = lf.select(pl.col("model_id").unique()).collect()["model_id"]
    return Holdings(model_ids=frozenset(str(m) for m in ids.drop_nulls().to_list()))


def check_resumable(out: Path, *, previous: dict[str, Any] | None, model_id: str, dim: int) -> None:
    """Raise ConfigError unless a run of `model_id` (embeddings of `dim`) may write into `out`."""
    held = holdings(out)
    if held is not None:
        recorded = (previous or {}).get("models", {}).get("model_id")
        others = sorted((held.model_ids | ({recorded} if recorded else set())) - {model_id})
        if others:
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
    index = vectors.load_index(out, view=True)
    if index is not None and index.ndim != dim:
        raise ConfigError(
            f"{vectors.index_path(out)} holds {index.ndim}-d vectors but the models give "
            f"{dim}-d: this output directory belongs to other models; use a new --out"
        )
