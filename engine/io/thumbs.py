"""Per-image previews for the review page: ``thumbs/part-NNNNN.parquet`` beside each part.

Each row holds a small grayscale JPEG of the image (long side THUMB_SIDE, source aspect) and
the lung mask the engine used (1-bit PNG at the segmenter's resolution, in the same stretched
square frame as the work image, so it maps onto the image by scaling each axis). They are
written before the shard's Parquet part (the commit point), like the embedding sidecars, so
a committed part always has its previews, and the page never re-runs a model to show a case.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import polars as pl

from engine.io.atomic import write_atomically
from engine.io.parquet import list_parts

THUMBS = "thumbs"
THUMB_SIDE = 256
THUMB_RE = re.compile(r"^part-(\d{5,})\.parquet$")
SCHEMA: dict[str, pl.DataType] = {
    "key": pl.UInt64(),
    "thumb_jpeg": pl.Binary(),
    "mask_png": pl.Binary(),
}


def thumbs_path(out: Path, number: int) -> Path:
    return Path(out) / THUMBS / f"part-{number:05d}.parquet"


def encode_thumb(work: np.ndarray, width: int, height: int) -> bytes:
    """Work image (S, S) in [0, 1] -> JPEG of the source's aspect, long side THUMB_SIDE.

    JPEG at quality 85: a fraction of a PNG's size, which adds up over 10^6 images
    (docs/measurements.md).
    """
    from PIL import Image

    scale = THUMB_SIDE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = Image.fromarray(np.clip(work * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Boolean (h, w) lung mask -> 1-bit PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def write_thumbs(
    out: Path, number: int, keys: list[int], thumbs: list[bytes], masks: list[bytes]
) -> Path:
    df = pl.DataFrame({"key": keys, "thumb_jpeg": thumbs, "mask_png": masks}, schema=SCHEMA)
    buf = io.BytesIO()
    df.write_parquet(buf, compression="uncompressed")  # JPEG/PNG are compressed already
    return write_atomically(thumbs_path(out, number), buf.getvalue(), what="the previews")


def remove_orphans(out: Path) -> int:
    """Delete previews of shards that never committed, and interrupted writes."""
    d = Path(out) / THUMBS
    if not d.is_dir():
        return 0
    committed = {n for n, _ in list_parts(out)}
    removed = 0
    for p in d.iterdir():
        m = THUMB_RE.match(p.name)
        if (m and int(m.group(1)) not in committed) or (
            p.name.startswith(".") and ".tmp" in p.name
        ):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def read_previews(out: Path, key: int) -> tuple[bytes, bytes] | None:
    """(thumbnail JPEG, mask PNG) of one screened image, or None."""
    d = Path(out) / THUMBS
    files = sorted(d.glob("part-*.parquet")) if d.is_dir() else []
    if not files:
        return None
    hit = pl.scan_parquet(files).filter(pl.col("key") == key).collect()
    if hit.is_empty():
        return None
    # a rescreened image has previews in two parts: the later one belongs to its current row
    return hit["thumb_jpeg"][-1], hit["mask_png"][-1]
