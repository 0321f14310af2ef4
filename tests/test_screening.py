"""engine/screening.py: items in, rows out, as a local run and a Ray shard both screen: items
batched by decoded samples, every row counted and written in input order, the columns a run
shares, and an error of the reading thread raised in the caller. (With the real models and the
runner around it: test_screen_e2e.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.config import ScreenConfig
from engine.io import parquet
from engine.io.archive import ImageRef, Item
from engine.io.reader import prepare
from engine.io.writer import ShardWriter
from engine.run_record import RunSummary
from engine.screener import Screener, embedding_dim
from engine.screening import batches, common_columns, screen_items


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 80), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def items(kinds: str) -> list[Item]:
    """g: a good PNG, u: unreadable (no bytes), x: bytes that are no image."""
    data = {"g": lambda k: png(k), "u": lambda k: None, "x": lambda k: b"not an image" * 10}
    return [
        Item(
            ImageRef(key=k, source=f"/in/{k}.png", member=None),
            data[c](k),
            "gone" if c == "u" else None,
        )
        for k, c in enumerate(kinds, start=1)
    ]


def config(tmp_path, **options) -> ScreenConfig:
    return ScreenConfig(inputs=(tmp_path,), out=tmp_path / "out", threads=1, min_side=16, **options)


def read(kinds: str, cfg: ScreenConfig):
    """What the reading side hands to `batches`: each item prepared, nothing decoded yet."""
    return [
        (prepare(item, max_pixels=cfg.max_pixels, min_side=cfg.min_side), None)
        for item in items(kinds)
    ]


def test_a_batch_holds_batch_size_samples_and_the_failures_in_between(tmp_path):
    cfg = config(tmp_path, batch_size=2)
    got = list(batches(read("gugxgg", cfg), cfg.batch_size))
    assert [[p.row.key for p in b.items] for b in got] == [[1, 2, 3], [4, 5, 6]]
    assert [p.sample is None for p in got[0].items] == [False, True, False]
    assert got[0].items[1].row.error == "/in/2.png: gone"
    # failures alone close a batch at 4x batch_size items, so memory stays bounded
    assert [len(b.items) for b in batches(read("u" * 9, cfg), cfg.batch_size)] == [8, 1]


@pytest.fixture
def screener(tiny_models):
    s = Screener(tiny_models, backend="null", batch_size=2, threads=1, decoder="pillow")
    yield s
    s.close()


def test_common_columns_name_the_models_backend_run_and_threshold(screener, tiny_models):
    assert common_columns(screener, "run-9") == {
        "model_id": tiny_models.model_id,
        "backend": "null",
        "run_id": "run-9",
        "threshold": tiny_models.classifier.threshold,
    }


def test_screen_items_writes_every_row_once_in_input_order(screener, tmp_path):
    out = tmp_path / "out"
    writer = ShardWriter(
        out,
        shard_size=3,
        common=common_columns(screener, "r1"),
        with_embeddings=False,
        dim=embedding_dim(screener.models),
    )
    summary = RunSummary(run_id="r1", out=out, backend="null", model_id="m", trained=False)
    latencies: list[float] = []
    seen: list[int] = []
    screen_items(
        screener, items("gxgug"), writer, summary,
        config=config(tmp_path, batch_size=2), latencies=latencies, on_rows=seen.append,
    )  # fmt: skip
    writer.flush()
    rows = parquet.read_predictions(out)
    assert rows["key"].to_list() == [1, 2, 3, 4, 5]
    assert rows["status"].to_list() == ["ok", "error", "ok", "error", "ok"]
    assert rows["error"][1].startswith("/in/2.png: ")
    assert set(rows["run_id"]) == {"r1"} and rows["lung_bbox"][0].to_list() == [0, 0, 80, 96]
    assert (summary.processed, summary.ok, summary.errors) == (5, 3, 2)
    assert sum(seen) == 5 and len(latencies) == len(seen)
    assert {"read", "decode+preprocess", "write"} <= set(screener.clock.seconds)


def test_an_error_while_reading_is_raised_in_the_caller(screener, tmp_path):
    def broken():
        yield from items("g")
        raise OSError("the disk went away")

    writer = ShardWriter(tmp_path / "out", shard_size=8, common={}, with_embeddings=False, dim=64)
    summary = RunSummary(run_id="r1", out=tmp_path, backend="null", model_id="m", trained=False)
    with pytest.raises(OSError, match="the disk went away"):
        screen_items(
            screener, broken(), writer, summary, config=config(tmp_path, batch_size=2), latencies=[]
        )
