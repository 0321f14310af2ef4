"""Hostile and awkward queries to `cxr similar` (issue 16: #10's query file, and the similar
items: the key of an error row, and an identical copy of the query in the index)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import dev_images

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120  # a child loads the engine and the models in a few seconds


@pytest.fixture(scope="module")
def screened(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    """Three real CXRs, a byte-identical copy of the first under another name, and a text file
    named .png (an error row)."""
    from engine.config import ScreenConfig
    from engine.runner import screen

    root = tmp_path_factory.mktemp("adv-similar")
    src = root / "in"
    src.mkdir()
    real = dev_images(3)
    for p in real:
        shutil.copy(p, src / p.name)
    original, copy = src / real[0].name, src / f"copy-of-{real[0].name}"
    shutil.copy(real[0], copy)
    broken = src / "broken.png"
    broken.write_text("this is not an image\n")
    out = root / "out"
    screen(ScreenConfig(inputs=(src,), out=out, models=tiny_models_dir, threads=2, progress=False))
    rows = {r["source"]: r for r in pl.read_parquet(out / "predictions").to_dicts()}
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
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *map(os.fspath, args)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            cwd=REPO,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cxr {' '.join(map(str, args))} did not finish in {TIMEOUT_S} s")


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
