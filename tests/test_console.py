"""engine/console.py: a command run as a `python -m` script, the command line it records, and
the config it makes from its options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import typer

from engine.console import (
    EXIT_FATAL,
    command_line,
    config_from_options,
    fatal_errors,
    run_script,
)
from engine.errors import ConfigError

SEEN: list[str] = []


def toy(
    ctx: typer.Context,
    models: Annotated[Path, typer.Option(help="A path.")],
    name: Annotated[list[str] | None, typer.Option(help="Repeatable.")] = None,
    write: Annotated[bool, typer.Option(help="A flag.")] = False,
    threads: Annotated[int, typer.Option(help="A default.")] = 2,
    fail: Annotated[bool, typer.Option(help="Raise a ConfigError.")] = False,
) -> None:
    SEEN.append(command_line(ctx))
    with fatal_errors():
        if fail:
            raise ConfigError("--fail: as asked")


def test_run_script_returns_the_exit_code_and_records_the_given_options(capsys):
    SEEN.clear()
    argv = ["--write", "--name", "a b", "--models", "m", "--name", "c"]
    assert run_script(toy, argv, prog="python -m toy") == 0
    # in the order the command declares them; --threads was left at its default
    assert SEEN == ["python -m toy --models m --name 'a b' --name c --write"]
    assert run_script(toy, ["--models", "m", "--no-write", "--threads", "2"], prog="t") == 0
    assert SEEN[-1] == "t --models m --no-write --threads 2"
    assert run_script(toy, ["--models", "m", "--fail"], prog="t") == EXIT_FATAL
    assert "error: --fail: as asked" in capsys.readouterr().err
    assert run_script(toy, ["--help"], prog="t") == 0


def test_run_script_ends_the_process_on_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run_script(toy, ["--threads", "x"], prog="t")
    assert exc.value.code == 2
    assert "--threads" in capsys.readouterr().err


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    models: Path
    threads: int = 1
    write: bool = False
    names: tuple[str, ...] = ()


def test_config_from_options_maps_options_onto_fields_of_the_same_name():
    made: list[ToyConfig] = []

    def command(
        ctx: typer.Context,
        models: Annotated[Path, typer.Option()],
        name: Annotated[list[str] | None, typer.Option()] = None,
        write: Annotated[bool, typer.Option()] = False,
        verbose: Annotated[bool, typer.Option()] = False,  # no field: left out
    ) -> None:
        made.append(config_from_options(ToyConfig, ctx, names=tuple(name or ())))

    assert run_script(command, ["--models", "m", "--write", "--name", "a"], prog="t") == 0
    assert made == [ToyConfig(models=Path("m"), write=True, names=("a",))]  # threads: default
