"""engine/eval/cli.py: the `cxr eval` group mounts the same commands the `python -m` entry points
run (and `cxr train parity` likewise); `cxr evaluate` itself is tested in test_evaluate.py."""

from __future__ import annotations

import pytest

# ---------------------------------------------------------------------------------------------
# the `python -m` entry points are `cxr` commands


@pytest.mark.parametrize(
    ("words", "module"),
    [
        (["eval", "release"], "engine.eval.release"),
        (["eval", "card"], "engine.eval.card"),
        (["eval", "segmentation"], "engine.eval.segmentation"),
        (["train", "parity"], "engine.train.parity"),
    ],
)
def test_python_m_entry_points_run_the_cxr_commands(words, module, capsys):
    import importlib

    import typer

    from engine.cli import app

    group = typer.main.get_command(app)
    mounted = group.commands[words[0]].commands[words[1]]  # type: ignore[attr-defined]
    script = typer.Typer(add_completion=False)
    script.command()(getattr(importlib.import_module(module), f"{words[1]}_command"))
    alone = typer.main.get_command(script)
    assert [p.opts for p in alone.params] == [p.opts for p in mounted.params]
    assert importlib.import_module(module).main(["--help"]) == 0
    assert f"Usage: python -m {module} [OPTIONS]" in " ".join(capsys.readouterr().out.split())
