"""The README's quick start and the nightly job of docs/nightly.md, run as a new user would:
the docs cannot rot."""

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
NIGHTLY = REPO / "docs" / "nightly.md"  # the nightly job's guide, examples included


def quick_start_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the `cxr` of this checkout, also where the environment's editable install is another one's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
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


def test_readme_model_numbers_are_the_cards():
    """The README's model table is copied from the shipped model card: every number in it, and
    every value with its interval, stands in the card as written."""
    from engine.models import PACKAGED_MODELS

    card = (PACKAGED_MODELS / "MODEL_CARD.md").read_text()
    section = README.read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4, rows  # the header and three models
    found = 0
    for row in rows[1:]:
        for value in re.findall(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row):
            assert value in card, value
        for number in re.findall(r"\d\.\d{3}", row):
            assert number in card, number
            found += 1
        for count in re.findall(r"\d+ \(\d+\)", row):
            assert count in card, count
    assert found >= 12


# ---------------------------------------------------------------------------------------------
# Nightly jobs (docs/nightly.md): the cron line, the systemd units and the summary reader


def nightly_blocks() -> dict[str, list[str]]:
    section = NIGHTLY.read_text().split("## Nightly jobs", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        blocks.setdefault(lang, []).append(body)
    return blocks


def local_paths(text: str, root: Path) -> str:
    """The guide's system paths -> places under `root` (and this environment's cxr)."""
    cxr = Path(sys.executable).with_name("cxr")
    for system, here in (
        ("/opt/cxr/.venv/bin/cxr", str(cxr) if cxr.is_file() else "cxr"),
        ("/srv/xray/archive", str(root / "archive")),
        ("/srv/xray/screening", str(root / "screening")),
        ("/var/lock/cxr-nightly.lock", str(root / "cxr-nightly.lock")),
        ("/var/log/cxr-nightly.log", str(root / "cxr-nightly.log")),
    ):
        text = text.replace(system, here)
    assert "/srv/" not in text and "/var/" not in text and "/opt/" not in text, text
    return text


def cron_entry() -> tuple[list[str], str]:
    lines = [ln for ln in nightly_blocks()["cron"][0].splitlines() if ln and ln[0] != "#"]
    assert len(lines) == 1, lines
    *when, command = lines[0].split(None, 5)
    return when, command


def cxr_part(command: str) -> str:
    """`cxr screen ...` of a scheduler's command line (without flock and the redirection)."""
    start = command.index("/opt/cxr/.venv/bin/cxr")
    end = command.find(" >>")
    return command[start : end if end > 0 else None]


def test_readme_cron_line_runs_the_nightly_job_and_its_summary_is_read(tmp_path):
    when, command = cron_entry()
    minute, hour, dom, month, weekday = when
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and (dom, month, weekday) == ("*",) * 3
    examples = sorted(p for p in (REPO / "examples").iterdir() if p.suffix != ".md")
    archive = tmp_path / "archive"
    archive.mkdir()
    for p in examples[:-1]:
        shutil.copyfile(p, archive / p.name)
    line = local_paths(command, tmp_path)
    for night in (1, 2):
        if night == 2:  # the archive grew
            shutil.copyfile(examples[-1], archive / examples[-1].name)
        done = run_shell(line, tmp_path)
        assert done.returncode == 0, (tmp_path / "cxr-nightly.log").read_text()
    log = (tmp_path / "cxr-nightly.log").read_text()
    assert log.count("cxr screen ->") == 2
    summary_path = tmp_path / "screening" / "last-night.json"
    summary = json.loads(summary_path.read_text())
    assert summary["exit_code"] == 0
    assert (summary["run"]["images"]["new"], summary["run"]["images"]["skipped"]) == (1, 4)

    reader = local_paths(nightly_blocks()["python"][0], tmp_path)

    def read() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", reader], capture_output=True, text=True, timeout=60
        )

    ok = read()
    assert ok.returncode == 0, ok.stderr
    assert "1 new, 0 rescreened" in ok.stdout and "drift too_few_images" in ok.stdout
    # a night that drifted, and one that failed, make the reader fail with a reason
    summary["run"]["drift"].update(status="drift", flagged=["ood_share"])
    summary_path.write_text(json.dumps(summary))
    drifted = read()
    assert drifted.returncode == 1 and "needs a look" in drifted.stderr
    assert "drift drift ood_share" in drifted.stdout
    summary_path.write_text(json.dumps({**summary, "run": None, "error": "models missing"}))
    failed = read()
    assert failed.returncode == 1 and "failed: models missing" in failed.stderr


def test_readme_systemd_units_run_what_the_cron_line_runs():
    import configparser

    service_text, timer_text = nightly_blocks()["ini"]
    units = []
    for text in (service_text, timer_text):
        unit = configparser.ConfigParser(interpolation=None, strict=True)
        unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
        unit.read_string(text)
        units.append(unit)
    service, timer = units
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["SuccessExitStatus"] == "3"
    _, command = cron_entry()
    assert service["Service"]["ExecStart"] == cxr_part(command)
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert timer["Timer"]["Persistent"] == "true"
    when, _ = cron_entry()
    assert timer["Timer"]["OnCalendar"] == f"*-*-* {int(when[1]):02d}:{int(when[0]):02d}:00"
    analyze = shutil.which("systemd-analyze")
    if analyze:
        got = subprocess.run(
            [analyze, "calendar", timer["Timer"]["OnCalendar"]], capture_output=True, text=True
        )
        assert got.returncode == 0, got.stderr
    # every option the job uses is one `cxr screen` has
    import typer

    from engine.cli import app

    screen = typer.main.get_command(app).commands["screen"]  # type: ignore[attr-defined]
    known = {n for param in screen.params for n in (*param.opts, *param.secondary_opts)}
    for option in re.findall(r"--[a-z-]+", service["Service"]["ExecStart"]):
        assert option in known, option
