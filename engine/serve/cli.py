"""The `cxr serve` command, registered by engine/cli.py (``app.command("serve")(serve)``)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated

import typer

from engine.console import err_console, fatal_errors, out_console


def serve(
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT_DIR", help="Output directory of a `cxr screen` run.")
    ],
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. The default lets only this machine connect; "
            "0.0.0.0 exposes patient images to the network WITHOUT authentication."
        ),
    ] = "127.0.0.1",
    models: Annotated[
        Path | None,
        typer.Option(help="Models directory for image queries (default: the one the run used)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="`cxr evaluate --report` folder to show (default: OUT_DIR/report)."),
    ] = None,
    max_upload_mb: Annotated[
        int, typer.Option(help="Largest image accepted as a query upload, in MB.")
    ] = 64,
) -> None:
    """Review a screening run in the browser: table, cases, similar cases, summary."""
    from engine.errors import ConfigError, EngineError

    with fatal_errors():
        if not 0 < port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, not {port}")
        if max_upload_mb < 1:
            raise ConfigError(f"--max-upload-mb must be at least 1, not {max_upload_mb}")
        loopback = is_loopback(host)
        app = build_app(
            out_dir, models=models, report=report, host=host, port=port, max_upload_mb=max_upload_mb
        )
        _check_port_free(host, port)
        shown = f"[{host}]" if ":" in host else host
        out_console.print(
            f"cxr serve: [bold]http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/[/]"
            f"  ({out_dir})  Ctrl-C to stop",
            highlight=False,
        )
        if loopback:
            out_console.print(
                "Only this machine can connect. To let others on your network connect, add "
                "--host 0.0.0.0: that serves patient images WITHOUT authentication.",
                highlight=False,
            )
        else:
            err_console.print(
                f"[bold red]WARNING:[/] listening on {host}: anyone who can reach this machine "
                "can see these patient images; there is no authentication.",
                highlight=False,
            )
        try:
            import uvicorn
        except ImportError:
            raise EngineError("cxr serve needs uvicorn: pip install uvicorn fastapi") from None
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def build_app(
    out_dir: Path,
    *,
    models: Path | None,
    report: Path | None,
    host: str,
    port: int,
    max_upload_mb: int,
):
    """The app as `cxr serve` configures it (the Host check on loopback)."""
    from engine.errors import EngineError

    try:
        from engine.serve.app import create_app
    except ImportError as exc:
        raise EngineError(f"cxr serve needs fastapi ({exc}): pip install fastapi uvicorn") from None
    if not Path(out_dir).is_dir():
        raise EngineError(f"{out_dir}: no such directory; pass the --out of a `cxr screen` run")
    loopback = is_loopback(host)
    return create_app(
        Path(out_dir),
        models_dir=models,
        report_dir=report,
        # on loopback, refuse other Host names: a web page cannot rebind its DNS name onto us
        allowed_hosts=[*LOOPBACK_NAMES] if loopback else None,
        max_upload_bytes=max_upload_mb << 20,
    )


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    from engine.errors import EngineError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EngineError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
            ) from None
