"""`--out ''` (an unset shell variable: `--out "$OUT"`) must not mean the current directory.

Every command that writes to or reads from an output path refuses an empty or blank one, with
exit code 1 and a message naming the option, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import plain, run_cli

from engine.config import ScreenConfig
from engine.errors import ConfigError


def _commands(tmp: Path, models: Path) -> dict[str, list[str | Path]]:
    """Each command's required options, with OUT where the output path goes."""
    return {
        "screen": ["screen", tmp / "in", "--out", "OUT", "--models", models],
        "similar": ["similar", "1", "--out", "OUT"],
        "models init": ["models", "init", "--out", "OUT", "--tiny"],
        "models pack": ["models", "pack", "--models", models, "--out", "OUT"],
        "train segmenter": ["train", "segmenter", "--masks", tmp / "masks", "--out", "OUT"],
        "train classifier": [
            "train",
            "classifier",
            "--labels",
            tmp / "labels.csv",
            "--images",
            tmp,
            "--segmenter",
            models,
            "--out",
            "OUT",
        ],
        "build": ["build", "--models", models, "--out", "OUT"],
        "index rebuild": ["index", "rebuild", "OUT"],
    }


COMMANDS = list(_commands(Path("."), Path(".")))


@pytest.mark.parametrize("value", ["", "  "], ids=["empty", "blank"])
@pytest.mark.parametrize("command", COMMANDS)
def test_empty_out_is_refused_and_nothing_is_written(
    tmp_path, tiny_models_dir, monkeypatch, command, value
):
    """issue 16 #5: `--out ''` wrote into the current directory (exit 0)."""
    (tmp_path / "in").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = [value if a == "OUT" else a for a in _commands(tmp_path, tiny_models_dir)[command]]

    code, stdout, stderr = run_cli(args)

    message = plain(stdout + stderr)
    assert code == 1, message
    option = "OUT" if command == "index rebuild" else "--out"
    assert option in message and "empty" in message
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("out", ["", " ", "\t"])
def test_screen_config_refuses_an_empty_out(out):
    """issue 16 #5: the library refuses it too, not only the command line."""
    with pytest.raises(ConfigError, match="--out"):
        ScreenConfig(inputs=(Path("x.png"),), out=out)  # type: ignore[arg-type]
