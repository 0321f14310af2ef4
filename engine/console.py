"""What every command shares: the exit codes, the two consoles and `fatal_errors`.

A floor below engine/cli.py and the modules that define commands (build, bench, eval, serve,
nightly, train): they import these from here, and engine/cli.py only mounts their commands, so
no command module imports the `cxr` app. The exit codes are documented in engine/cli.py's
docstring and the README.

`run_script` runs one command as a `python -m` entry point (engine.eval.release, ...) would:
the same command `cxr` mounts, with its exit code returned instead of the process ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from engine.errors import EngineError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_IMAGE_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_NO_IMAGES, EXIT_DRIFT = 4, 5

out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def fatal_errors() -> Iterator[None]:
    """EngineError -> message on stderr and exit code 1; Ctrl-C -> 130."""
    try:
        yield
    except EngineError as exc:
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(EXIT_FATAL) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def run_script(command: Callable[..., Any], argv: Sequence[str] | None, *, prog: str) -> int:
    """Run one Typer command on argv (None: sys.argv[1:]) and return its exit code.

    A command line that does not parse ends the process as it does under `cxr` (the message,
    then SystemExit with code 2), as argparse did; --help prints the help and returns 0.
    """
    app = typer.Typer(add_completion=False)
    app.command()(command)
    try:
        app(args=None if argv is None else list(argv), prog_name=prog)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return EXIT_OK
        if not isinstance(code, int):
            raise
        if code == EXIT_USAGE:
            raise
        return code
    return EXIT_OK  # not reached: a Typer app in standalone mode always ends in SystemExit
