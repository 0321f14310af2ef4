"""What every command shares: the exit codes, the two consoles and `fatal_errors`.

A floor below engine/cli.py and the modules that define commands (build, bench, eval, serve,
nightly, train): they import these from here, and engine/cli.py only mounts their commands, so
no command module imports the `cxr` app. The exit codes are documented in engine/cli.py's
docstring and the README.

`run_script` runs one command as a `python -m` entry point (engine.eval.release, ...) would:
the same command `cxr` mounts, with its exit code returned instead of the process ended.
`command_line` says how the running command was invoked, for files that record it;
`config_from_options` makes a config dataclass from a command's options of the same names.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from engine.errors import EngineError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    C = TypeVar("C", bound=DataclassInstance)

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


def command_line(ctx: typer.Context) -> str:
    """The running command as one shell line, to record what made a file (a model card).

    Its name as it was invoked (`cxr eval card`, or run_script's prog: `python -m
    engine.eval.card`), then the options given on the command line, in the order the command
    declares them; options left at their defaults are not written.
    """
    words = ctx.command_path.split()
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name is None or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if not param.opts or not param.opts[0].startswith("-"):  # an argument
            values = value if isinstance(value, list | tuple) else [value]
            words += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            secondary = param.secondary_opts
            words.append(param.opts[0] if value or not secondary else secondary[0])
        elif getattr(param, "multiple", False):
            for v in value:
                words += [param.opts[0], str(v)]
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def config_from_options(cls: type[C], ctx: typer.Context, **converted: Any) -> C:
    """The config dataclass `cls` from the running command's options.

    CLI options map onto config fields one to one: each field takes the option of its name;
    `converted` gives the fields whose option needs converting or is named otherwise, and wins.
    Fields with neither keep their defaults; options that are no field are left out.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    given = {name: value for name, value in ctx.params.items() if name in names}
    return cls(**(given | converted))
