"""engine.nightly.runs: history entries and run views of hand-written run.json records (old
entries lacking fields read as null), listing and finding runs, a run's rows with superseded
ones marked, `--show`'s document, the scheduler's summaries and their atomic write."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from engine.errors import ConfigError, EngineError
from engine.io import parquet
from engine.io.outdir import write_run_json
from engine.nightly import runs
from engine.nightly.changes import CHANGE_SCHEMA, changes_path

RECORD = {
    "run_id": "bbb222",
    "status": "complete",
    "started_at": "2026-01-02T01:00:00+00:00",
    "updated_at": "2026-01-02T01:10:00+00:00",
    "host": "node1",
    "backend": "onnxruntime",
    "libraries": {"numpy": "2.0"},
    "config": {"threads": 2},
    "models": {
        "model_id": "m1",
        "threshold": 0.5,
        "directory": "/models",
        "segmenter": {"precision": "fp32", "sha256": "aa"},
        "classifier": {"precision": "int8", "sha256": "bb"},
    },
    "counts": {
        "processed": 7,
        "skipped_existing": 12,
        "error": 1,
        "positive": 2,
        "ignored_files": 3,
        "total_rows": 18,
        "total_errors": 1,
        "index_size": 17,
    },
    "timings": {"wall_s": 4.0, "images_per_s": 1.75, "stages": {"decode": 1.0}},
    "changes": {
        "checked": 12,
        "changed": 2,
        "rescreened": 1,
        "vanished": 1,
        "new_vanished": 1,
        "touched": 0,
        "unverified": 0,
        "unreadable": 0,
        "rescreen_changed": True,
        "changed_samples": ["/a.png"],
        "vanished_samples": ["/b.png"],
    },
    "drift": {
        "status": "ok",
        "reference": "aaa111",
        "flagged": [],
        "metrics": {"psi": 0.01},
        "thresholds": {"psi": 0.2},
        "extra": "not shown",
    },
}
OLD = {  # an entry from before the nightly fields: no changes, drift, host or models
    "run_id": "aaa111",
    "status": "complete",
    "started_at": "2026-01-01T01:00:00+00:00",
    "updated_at": "2026-01-01T01:05:00+00:00",
    "counts": {"processed": 12, "skipped_existing": 0},
}


# ---------------------------------------------------------------------------------------------
# history entries and views


def test_history_entry_keeps_the_compact_record():
    entry = runs.history_entry(RECORD)
    assert set(entry) == {
        "run_id", "status", "started_at", "updated_at", "host", "backend", "models", "counts",
        "timings", "changes", "drift",
    }  # fmt: skip
    assert entry["models"] == {
        "model_id": "m1",
        "threshold": 0.5,
        "segmenter": {"precision": "fp32"},
        "classifier": {"precision": "int8"},
    }
    assert entry["timings"] == {"wall_s": 4.0, "images_per_s": 1.75}
    assert "changed_samples" not in entry["changes"] and entry["changes"]["changed"] == 2
    assert "changed_samples" in RECORD["changes"]  # the record itself is left as it is
    assert entry["counts"] is RECORD["counts"] or entry["counts"] == RECORD["counts"]
    # a history entry's view is the record's view
    assert runs.run_view(entry) == runs.run_view(RECORD)


def test_history_entry_of_a_bare_record():
    entry = runs.history_entry({"run_id": "x"})
    assert entry["changes"] is None and entry["drift"] is None and entry["counts"] is None
    assert entry["models"]["segmenter"] == {"precision": None}


def test_run_view_of_a_full_record():
    v = runs.run_view(RECORD)
    assert v["run_id"] == "bbb222" and v["ended_at"] == RECORD["updated_at"]
    assert v["images"] == {
        "new": 6,  # processed 7, of which 1 rescreened
        "rescreened": 1,
        "skipped": 12,
        "errors": 1,
        "positives": 2,
        "ignored_files": 3,
    }
    assert v["totals"] == {"rows": 18, "errors": 1, "index_size": 17}
    assert (v["images_per_s"], v["wall_s"], v["backend"], v["model_id"]) == (
        1.75, 4.0, "onnxruntime", "m1",
    )  # fmt: skip
    assert v["precision"] == {"segmenter": "fp32", "classifier": "int8"}
    assert v["changes"] == {
        "checked": 12, "changed": 2, "rescreened": 1, "vanished": 1, "new_vanished": 1,
        "touched": 0, "unverified": 0, "unreadable": 0,
    }  # fmt: skip
    assert v["drift"] == {
        "status": "ok",
        "reference": "aaa111",
        "flagged": [],
        "metrics": {"psi": 0.01},
        "thresholds": {"psi": 0.2},
    }


def test_run_view_of_an_old_or_running_entry_says_null():
    v = runs.run_view(OLD)
    assert v["images"]["new"] == 12 and v["images"]["rescreened"] is None
    assert v["images"]["errors"] is None and v["totals"]["rows"] is None
    assert v["changes"] is None and v["drift"] is None and v["precision"] is None
    assert v["host"] is None and v["model_id"] is None
    running = runs.run_view(OLD | {"status": "running", "counts": {}})
    assert running["ended_at"] is None and running["images"]["new"] is None


# ---------------------------------------------------------------------------------------------
# an output directory with two runs


def row(key: int, run_id: str, *, status="ok", prob=0.5, error=None) -> dict:
    return {
        "key": key,
        "source": f"/in/{key}.png",
        "member": None,
        "status": status,
        "error": error,
        "prob": prob if status == "ok" else None,
        "decision": (prob >= 0.5) if status == "ok" else None,
        "run_id": run_id,
    }


@pytest.fixture
def out(tmp_path) -> Path:
    """Run aaa111 screened keys 1-4 (3 failed); run bbb222 rescreened 2 and added 5 and 6."""
    out = tmp_path / "out"
    out.mkdir()
    first = [
        row(1, "aaa111", prob=0.9),
        row(2, "aaa111", prob=0.7),
        row(3, "aaa111", status="error", error="/in/3.png: truncated"),
        row(4, "aaa111", prob=0.1),
    ]
    second = [row(2, "bbb222", prob=0.2), row(5, "bbb222", prob=0.95), row(6, "bbb222", prob=0.6)]
    parquet.write_part(out, 0, parquet.rows_frame(first))
    parquet.write_part(out, 1, parquet.rows_frame(second))
    write_run_json(out, RECORD | {"history": [runs.history_entry(OLD), {"status": "bogus"}]})
    found = pl.DataFrame(
        [
            {
                "key": 2,
                "source": "/in/2.png",
                "member": None,
                "change": "changed",
                "old_sha256": "a",
                "new_sha256": "b",
            },
            {
                "key": 9,
                "source": "/in/9.png",
                "member": None,
                "change": "vanished",
                "old_sha256": "c",
                "new_sha256": None,
            },
        ],  # fmt: skip
        schema=CHANGE_SCHEMA,
    )
    changes_path(out, "bbb222").parent.mkdir()
    found.write_parquet(changes_path(out, "bbb222"))
    return out


def test_list_runs_oldest_first_without_entries_lacking_an_id(out):
    views = runs.list_runs(out)
    assert [v["run_id"] for v in views] == ["aaa111", "bbb222"]
    doc = runs.runs_json(out)
    assert doc == {"schema": runs.RUNS_SCHEMA, "out": str(out), "runs": views}


def test_find_run_by_id_or_unique_prefix(out):
    assert runs.find_run(out, "bbb222")["run_id"] == "bbb222"
    assert runs.find_run(out, "a")["run_id"] == "aaa111"
    with pytest.raises(ConfigError, match="run 'zzz': no such run recorded in run.json"):
        runs.find_run(out, "zzz")
    record = json.loads((out / "run.json").read_text())
    record["history"].append({"run_id": "aaa999"})
    write_run_json(out, record)
    with pytest.raises(ConfigError, match="run 'aaa' matches several runs: aaa111, aaa999"):
        runs.find_run(out, "aaa")


def test_no_run_json_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="no run.json; is this the --out of a `cxr screen` run"):
        runs.list_runs(tmp_path)


def test_run_rows_marks_rows_a_later_run_replaced(out):
    first = runs.run_rows(out, "aaa111")
    assert first["key"].to_list() == [1, 2, 3, 4]
    assert first["superseded"].to_list() == [False, True, False, False]
    assert "run_id" not in first.columns
    second = runs.run_rows(out, "bbb222")
    assert second["key"].to_list() == [2, 5, 6] and not second["superseded"].any()
    assert runs.run_rows(out, "nope").height == 0


def test_run_rows_of_a_directory_without_parts_has_the_same_columns(out, tmp_path):
    rows = runs.run_rows(tmp_path, "x")
    assert rows.height == 0
    assert rows.columns == [
        "key", "source", "member", "status", "error", "prob", "decision", "superseded",
    ]  # fmt: skip
    assert rows.schema == runs.run_rows(out, "aaa111").schema


def test_show_run_lists_positives_errors_and_changes(out):
    doc = runs.show_run(out, "aaa")
    assert doc["schema"] == runs.SHOW_SCHEMA and doc["run"]["run_id"] == "aaa111"
    # positives by probability, the superseded one marked
    assert [(p["key"], p["superseded"]) for p in doc["positives"]] == [(1, False), (2, True)]
    assert doc["errors"] == [
        {"key": 3, "source": "/in/3.png", "member": None, "prob": None,
         "error": "/in/3.png: truncated", "superseded": False},
    ]  # fmt: skip
    assert doc["changed"] == [] and doc["vanished"] == []  # it found none
    second = runs.show_run(out, "bbb222")
    assert [p["key"] for p in second["positives"]] == [5, 6]
    assert [c["key"] for c in second["changed"]] == [2]
    assert second["vanished"][0]["source"] == "/in/9.png"


# ---------------------------------------------------------------------------------------------
# summaries for a scheduler


def test_summary_and_failure_json(out):
    s = runs.summary_json(out, "bbb222", 3)
    assert s == {
        "schema": runs.SUMMARY_SCHEMA,
        "out": str(out),
        "exit_code": 3,
        "run": runs.find_run(out, "bbb222"),
    }
    f = runs.failure_json(out, 1, "models not found")
    assert f == {
        "schema": runs.SUMMARY_SCHEMA,
        "out": str(out),
        "exit_code": 1,
        "error": "models not found",
        "run": None,
    }


def test_write_json_is_atomic_and_makes_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "summary.json"
    runs.write_json(path, {"when": Path("/x"), "n": 1})
    assert json.loads(path.read_text()) == {"when": "/x", "n": 1}
    runs.write_json(path, {"n": 2})
    assert json.loads(path.read_text()) == {"n": 2}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EngineError, match=r"file/s.json: cannot write the summary"):
        runs.write_json(blocker / "s.json", {})
