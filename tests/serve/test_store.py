"""engine.serve.store: the review page's view of an output directory, on hand-written parts:
pages filtered, searched and sorted from the slim frame, rows and parts found by key, a
rescreened image shown once (its latest row), and the helpers that shape a row for the browser.
The same store over a real screening run, through the app: test_app.py."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from engine.errors import ConfigError, EngineError
from engine.io import parquet, thumbs
from engine.serve.store import (
    KEY_MAX,
    Filters,
    RunStore,
    display_name,
    parse_key,
    row_json,
    text_match,
)

AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def row(key: int, prob: float | None, *, source: str | None = None, **columns) -> dict:
    ok = prob is not None
    return parquet.Row(key=key, source=source or f"/in/img{key}.png", member=None).columns() | {
        "status": "ok" if ok else "error",
        "error": None if ok else "cannot decode",
        "prob": prob,
        "decision": None if prob is None else prob >= 0.5,
        "screened_at": AT,
        **columns,
    }


@pytest.fixture
def out(tmp_path) -> Path:
    out = tmp_path / "out"
    parquet.write_part(out, 0, parquet.rows_frame([row(1, 0.9), row(2, 0.2), row(3, None)]))
    parquet.write_part(out, 1, parquet.rows_frame([row(4, 0.7, patient_id="PAT-77")]))
    return out


def keys(page) -> list[str]:
    return [r["key"] for r in page.rows]


def test_pages_filter_and_sort_like_the_table(out):
    store = RunStore(out)
    page = store.page(Filters(), sort="prob", descending=True, limit=2)
    assert (page.total, page.offset, page.limit) == (4, 0, 2)
    assert keys(page) == ["1", "4"]
    assert keys(store.page(Filters(), sort="prob", descending=True, offset=2)) == ["2", "3"]
    assert keys(store.page(Filters(decision="positive"))) == ["1", "4"]
    assert keys(store.page(Filters(status="error"))) == ["3"]
    assert keys(store.page(Filters(prob_min=0.5, prob_max=0.8))) == ["4"]
    assert keys(store.page(Filters(text="pat-77"))) == ["4"]  # DICOM ids, any case
    assert keys(store.page(Filters(text="img2"))) == ["2"]
    assert store.page(Filters(text="nowhere")).total == 0


def test_page_refuses_unknown_sorts_and_out_of_range_windows(out):
    store = RunStore(out)
    with pytest.raises(ConfigError, match="cannot sort by 'error'"):
        store.page(Filters(), sort="error")
    with pytest.raises(ConfigError, match="limit between 1 and 500"):
        store.page(Filters(), limit=501)
    with pytest.raises(ConfigError, match="offset must be between 0"):
        store.page(Filters(), offset=-1)


def test_rows_and_parts_by_key_and_new_parts_picked_up(out):
    store = RunStore(out)
    assert store.part_of(4) == 1 and store.part_of(2) == 0 and store.part_of(99) is None
    assert store.row(3)["error"] == "cannot decode" and store.row(99) is None
    # a rescreen of image 2 commits a later part: its new row is the one shown
    parquet.write_part(out, 2, parquet.rows_frame([row(2, 0.6), row(5, 0.1)]))
    assert store.part_of(2) == 2 and store.row(2)["prob"] == pytest.approx(0.6)
    assert store.page(Filters()).total == 5


def test_previews_come_from_the_part_of_the_current_row(out):
    thumbs.write_thumbs(out, 1, [4], [b"jpeg-4"], [b"mask-4"])
    store = RunStore(out)
    assert store.previews(4) == (b"jpeg-4", b"mask-4")
    assert store.previews(1) is None  # part 0 has no previews


def test_a_directory_without_predictions_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="no predictions/ folder"):
        RunStore(tmp_path)


def test_parse_key_takes_unsigned_64_bit_integers_only():
    assert parse_key("0") == 0 and parse_key(str(KEY_MAX)) == KEY_MAX
    for bad in (str(KEY_MAX + 1), "-1", "12a", "", "١٢", "1" * 21):
        with pytest.raises(ConfigError, match="is not an image key"):
            parse_key(bad)


def test_row_json_is_safe_for_javascript():
    got = row_json({"key": 2**63 + 5, "prob": math.nan, "screened_at": AT, "source": "/a/b.png"})
    assert got == {
        "key": str(2**63 + 5),  # JS numbers lose uint64 precision
        "prob": None,
        "screened_at": AT.isoformat(),
        "source": "/a/b.png",
        "name": "b.png",
    }
    assert display_name("/in/batch.tar", "x\\y\\1.png") == "1.png"
    assert display_name(None, None) == ""


def test_text_match_searches_paths_ids_and_keys():
    frame = pl.DataFrame(
        {
            "key": pl.Series([123456, 7], dtype=pl.UInt64),
            "source": ["/in/A.png", "/in/b.png"],
            "member": [None, "x.png"],
            "patient_id": [None, "PAT-1"],
            "study_uid": [None, None],
            "sop_uid": [None, None],
        },
        schema_overrides={"member": pl.String, "study_uid": pl.String, "sop_uid": pl.String},
    )

    def hits(needle: str) -> list[int]:
        return frame.filter(text_match(needle))["key"].to_list()

    assert hits("a.png") == [123456] and hits("pat-1") == [7] and hits("X.PNG") == [7]
    assert hits("345") == [123456]  # part of a key
    assert hits("(") == []  # a regex character is searched as itself
