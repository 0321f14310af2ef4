"""Ground truth for `cxr evaluate`: read the labels CSV and join it to a run's prediction rows.

A label row names an image by `path`, relative to the images root (default: the CSV's folder).
It matches a plain-file prediction row whose `source` is the same file (both paths resolved), or
an archive prediction row whose `member` ends with `path` at a folder boundary (a label
``images/a.png`` matches member ``cxr-dev/images/a.png``, not ``old-images/a.png``).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from engine.errors import ConfigError

REQUIRED = ("path", "label")
MISSING_GROUP = "(missing)"
OWN_PATIENT = "\0image:"  # prefix of the patient of an image without patient_id


@dataclass(frozen=True, slots=True)
class MatchCounts:
    labelled: int  # rows of the labels CSV
    found: int  # label rows matched to one prediction row
    missing: int  # label rows with no prediction row
    ambiguous: int  # label rows with several candidate prediction rows (the first is used)
    errors: int  # found rows whose prediction has status "error" (excluded from the metrics)
    evaluated: int  # found rows with status "ok" and a probability
    unlabelled: int  # prediction rows no label row matched

    def to_json(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__slots__}

    def rows(self) -> list[tuple[str, int]]:
        """The counts as `cxr evaluate` prints them and its report lists them."""
        return [
            ("labelled images", self.labelled),
            ("found in the run", self.found),
            ("missing from the run", self.missing),
            ("excluded (status error)", self.errors),
            ("evaluated (status ok)", self.evaluated),
        ]


def read_labels(csv: Path, *, images: Path | None = None, by: str | None = None) -> pl.DataFrame:
    """Columns `_row, path, label, patient, patient_given, group, _rel, _abs` (`group` only
    with `by`; `patient_given` is False where the image stands for its own patient)."""
    csv = Path(csv)
    if not csv.is_file():
        raise ConfigError(f"{csv}: labels CSV not found; pass --labels with a CSV file")
    try:
        raw = pl.read_csv(csv, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{csv}: cannot read as CSV ({type(exc).__name__}: {exc}); "
            "it needs a header row with at least the columns path,label"
        ) from None
    missing = [c for c in (*REQUIRED, *([by] if by else [])) if c not in raw.columns]
    if missing:
        hint = " (the --by column)" if by in missing else ""
        raise ConfigError(
            f"{csv}: no column {', '.join(missing)}{hint}; it has {', '.join(raw.columns) or 'none'}. "
            "Required: path (image path relative to --images), label (1 = COVID-19, 0 = negative)"
        )
    if raw.height == 0:
        raise ConfigError(f"{csv}: no label rows; add one row per image")
    root = Path(images) if images is not None else csv.parent
    if not root.is_dir():
        raise ConfigError(
            f"--images {root}: not a folder; pass the folder the CSV paths start from"
        )
    frame = raw.with_row_index("_row").with_columns(
        pl.col("path").str.strip_chars(),
        _label(raw["label"], csv),
        _patient(raw),
    )
    _check_paths(frame, csv)
    rel = [posixpath.normpath(p.replace("\\", "/")) for p in frame["path"]]
    real = [os.path.realpath(root / p) for p in frame["path"]]
    frame = frame.with_columns(pl.Series("_rel", rel), pl.Series("_abs", real))
    if by:
        frame = frame.with_columns(
            pl.col(by).str.strip_chars().replace("", None).fill_null(MISSING_GROUP).alias("group")
        )
    return frame.select(
        "_row",
        "path",
        "label",
        "patient",
        (~pl.col("patient").str.starts_with(OWN_PATIENT)).alias("patient_given"),
        *(["group"] if by else []),
        "_rel",
        "_abs",
    )


def _label(column: pl.Series, csv: Path) -> pl.Series:
    text = column.str.strip_chars().str.to_lowercase()
    value = text.replace_strict(
        {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0},
        default=None,
        return_dtype=pl.Int8,
    )
    bad = column.filter(value.is_null())
    if bad.len():
        examples = ", ".join(repr(v) for v in bad.head(3).to_list())
        raise ConfigError(
            f"{csv}: {bad.len()} rows have a label that is not 0 or 1 (e.g. {examples}); "
            "use 1 for COVID-19 positive and 0 for negative"
        )
    return value.alias("label")


def _patient(raw: pl.DataFrame) -> pl.Expr:
    """patient_id where given; otherwise the image is its own patient."""
    own = pl.concat_str(pl.lit(OWN_PATIENT), pl.col("path").str.strip_chars())
    if "patient_id" not in raw.columns:
        return own.alias("patient")
    given = pl.col("patient_id").str.strip_chars().replace("", None)
    return pl.when(given.is_null()).then(own).otherwise(given).alias("patient")


def _check_paths(frame: pl.DataFrame, csv: Path) -> None:
    empty = frame.filter(pl.col("path").is_null() | (pl.col("path") == ""))
    if empty.height:
        rows = ", ".join(str(r + 2) for r in empty["_row"].head(3))
        raise ConfigError(f"{csv}: empty path in line {rows}; every row must name an image")
    dup = frame.group_by("path").len().filter(pl.col("len") > 1)
    if dup.height:
        example = dup.sort("path")["path"][0]
        raise ConfigError(
            f"{csv}: {dup.height} paths appear more than once (e.g. {example!r}); "
            "keep one row per image"
        )


def match_predictions(labels: pl.DataFrame, preds: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """(label rows joined with their prediction row, label rows with several candidates).

    File matches win over archive matches; among several candidates the smallest key wins, and a
    prediction row is used for one label row only.
    """
    candidates = pl.concat([_file_matches(labels, preds), _member_matches(labels, preds)])
    per_row = candidates.group_by("_row").agg(pl.col("key").n_unique().alias("n"))
    ambiguous = per_row.filter(pl.col("n") > 1).height
    first = candidates.sort("_row", "priority", "key").unique(
        subset="_row", keep="first", maintain_order=True
    )
    chosen = first.unique(subset="key", keep="first", maintain_order=True).select("_row", "key")
    ambiguous += first.height - chosen.height  # two label rows naming the same image
    joined = labels.join(chosen, on="_row", how="inner").join(preds, on="key", how="inner")
    return joined.sort("_row"), ambiguous


def _file_matches(labels: pl.DataFrame, preds: pl.DataFrame) -> pl.DataFrame:
    files = preds.filter(pl.col("member").is_null()).select("key", "source")
    sources = files["source"].unique().drop_nulls().to_list()
    real = pl.DataFrame(
        {"source": sources, "_abs": [os.path.realpath(s) for s in sources]},
        schema={"source": pl.String, "_abs": pl.String},
    )
    return (
        files.join(real, on="source")
        .join(labels.select("_row", "_abs"), on="_abs")
        .select("_row", "key", pl.lit(0, pl.Int8).alias("priority"))
    )


def _member_matches(labels: pl.DataFrame, preds: pl.DataFrame) -> pl.DataFrame:
    members = preds.filter(pl.col("member").is_not_null()).select(
        "key", pl.col("member").str.replace(r"^(\./|/)+", "").str.split("/").alias("parts")
    )
    depth = members.select(pl.col("parts").list.len().max().fill_null(0)).item()
    # every suffix of the member at a folder boundary: a/b/c.png -> a/b/c.png, b/c.png, c.png
    suffixes = [
        members.filter(pl.col("parts").list.len() > i).select(
            "key", pl.col("parts").list.slice(i).list.join("/").alias("_rel")
        )
        for i in range(depth)
    ]
    empty = pl.DataFrame(schema={"key": pl.UInt64, "_rel": pl.String})
    return (
        pl.concat([empty, *suffixes])
        .join(labels.select("_row", "_rel"), on="_rel")
        .select("_row", "key", pl.lit(1, pl.Int8).alias("priority"))
    )
