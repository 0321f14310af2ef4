"""Hostile and awkward queries to `cxr similar` (issue 16: #10's query file, and the similar
items: the key of an error row, and an identical copy of the query in the index)."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
from conftest import copy_images, dev_images, plain, run_child, run_cli, screen_folder

TIMEOUT_S = 120  # a child loads the engine and the models in a few seconds


@pytest.fixture(scope="module")
def screened(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    """Three real CXRs, a byte-identical copy of the first under another name, and a text file
    named .png (an error row)."""
    root = tmp_path_factory.mktemp("adv-similar")
    real = dev_images(3)
    src = copy_images(root / "in", real)
    original, copy = src / real[0].name, src / f"copy-of-{real[0].name}"
    shutil.copy(real[0], copy)
    broken = src / "broken.png"
    broken.write_text("this is not an image\n")
    out = root / "out"
    rows = {r["source"]: r for r in screen_folder([src], out, tiny_models_dir)}
    return {
        "root": root,
        "out": out,
        "original": original,
        "copy": copy,
        "broken": broken,
        "rows": rows,
    }


def cxr(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """`cxr ARGS` of this checkout in a child process; fails the test if it does not finish."""
    code = "import sys; from engine.cli import main; sys.argv[0] = 'cxr'; main()"
    what = f"cxr {' '.join(map(str, args))}"
    return run_child(["-c", code, *args], timeout=TIMEOUT_S, what=what)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_as_the_query_file_is_refused_not_waited_on(screened):
    """issue 16 #10: `cxr similar FIFO` (and the server's query path) waited on the FIFO."""
    fifo = screened["root"] / "query.png"
    os.mkfifo(fifo)
    try:
        done = cxr("similar", fifo, "--out", screened["out"])
    finally:
        fifo.unlink()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not a regular file" in " ".join(done.stderr.split())


def test_the_key_of_an_error_row_says_why_it_has_no_neighbours(screened):
    """issue 16 (similar): the key of an error row said "not in index.usearch", not the failure."""
    from engine.errors import EngineError
    from engine.similar import similar

    row = screened["rows"][str(screened["broken"])]
    assert row["status"] == "error" and row["error"]
    key = str(row["key"])
    with pytest.raises(EngineError) as caught:
        similar(screened["out"], key)
    message = str(caught.value)
    assert "this image failed" in message and row["error"] in message, message
    assert "index.usearch" not in message
    code, _, stderr = run_cli(["similar", key, "--out", screened["out"]])
    assert code == 1 and "this image failed" in plain(stderr), stderr
    # a key that is no image of the run at all keeps its message
    code, _, stderr = run_cli(["similar", "12345", "--out", screened["out"]])
    assert code == 1 and "is not in" in plain(stderr) and "failed" not in plain(stderr)


def test_serve_answers_the_failure_for_the_key_of_an_error_row(screened):
    """issue 16 (similar): GET /api/similar/<error key> passes the failure on (422)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2")
    from fastapi.testclient import TestClient

    from engine.serve.app import create_app

    row = screened["rows"][str(screened["broken"])]
    r = TestClient(create_app(screened["out"])).get(f"/api/similar/{row['key']}")
    assert r.status_code == 422 and "this image failed" in r.json()["detail"], r.text


def test_an_image_ranks_above_its_byte_identical_copy(screened):
    """issue 16 (similar): with an identical copy in the index, the copy could rank above the
    query image itself, against the README's "finds itself first"; ties go to the query's key."""
    from engine.similar import similar

    rows = screened["rows"]
    original, copy = rows[str(screened["original"])], rows[str(screened["copy"])]
    for path, own, twin in (
        (screened["original"], original, copy),
        (screened["copy"], copy, original),
    ):
        for k in (1, 2, 4):
            result = similar(screened["out"], str(path), k=k)
            keys = [n.key for n in result.neighbours]
            sims = [n.similarity for n in result.neighbours]
            assert result.query_key == own["key"]
            assert keys[0] == own["key"], (path.name, k, keys)
            if k > 1:  # the copy ties exactly, and comes next
                assert keys[1] == twin["key"] and sims[1] == sims[0], (keys, sims)
        # asked by key, the image is left out and its copy is the nearest
        by_key = similar(screened["out"], str(own["key"]), k=1).neighbours
        assert [n.key for n in by_key] == [twin["key"]]
