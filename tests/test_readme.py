"""The README's quick start, run as a new user would: the docs cannot rot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def quick_start_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_quick_start_has_install_run_test_and_query():
    blocks = quick_start_blocks()
    assert len(blocks) == 4, blocks
    install, _run, test, _query = blocks
    assert "pip install" in install
    assert test == "pytest"


def test_ci_runs_the_readme_install_and_test_commands():
    install, _run, test, _query = quick_start_blocks()
    ci = (REPO / ".ci" / "run").read_text()
    assert install in ci, "CI must install exactly as the README says"
    assert re.search(rf"^{re.escape(test)}$", ci, flags=re.M), "CI must run the README's tests"


def test_readme_main_job_and_similar_run_on_the_examples(tmp_path):
    _install, run, _test, query = quick_start_blocks()
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    done = run_shell(run, tmp_path)
    # Every example must be screened (exit 0), by the shipped trained models.
    assert done.returncode == 0, done.stdout + done.stderr
    assert "UNTRAINED" not in done.stdout
    import polars as pl

    rows = pl.read_parquet(tmp_path / "out" / "predictions" / "*.parquet")
    images = sorted(p.name for p in (tmp_path / "examples").iterdir() if p.suffix != ".md")
    assert sorted(Path(s).name for s in rows["source"]) == images
    assert set(rows["status"]) == {"ok"}
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["counts"]["ok"] == len(images)

    found = run_shell(query + " --json", tmp_path)
    assert found.returncode == 0, found.stdout + found.stderr
    neighbours = json.loads(found.stdout)["neighbours"]
    assert len(neighbours) == 3
    query_file = query.split()[2]
    assert Path(neighbours[0]["source"]).name == Path(query_file).name
    assert neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
