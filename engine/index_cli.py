"""The `cxr index` group (engine/cli.py mounts `app`): maintain the similarity index of a run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from engine.console import EXIT_FATAL, err_console, fatal_errors, out_console
from engine.errors import EngineError

app = typer.Typer(no_args_is_help=True, help="Maintain the similarity index of a run.")


@app.command("rebuild")
def index_rebuild(
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="Output directory of cxr screen.")],
) -> None:
    """Rebuild OUT/index.usearch from the embeddings the run keeps (a lost or corrupt index)."""
    from engine.config import output_path
    from engine.io import parquet, vectors
    from engine.io.outdir import OutputLock

    with fatal_errors():
        out = output_path(out_dir, "OUT")
        if not parquet.list_parts(out):
            raise EngineError(
                f"{out}: no predictions/part-*.parquet; pass the --out of a `cxr screen` run"
            )
        with OutputLock(out):
            result = vectors.rebuild_index(out)
    out_console.print(
        f"{escape(str(vectors.index_path(out)))}: {result.size} vectors "
        f"({result.from_sidecars} from {vectors.EMBEDDINGS}/, {result.from_parquet} from the "
        "Parquet embedding column)",
        highlight=False,
        soft_wrap=True,
    )
    if result.missing:
        err_console.print(
            f"[bold red]error:[/] {result.missing} screened images have no kept embedding and "
            "are not in the index (screened by an older cxr, which deleted the sidecars once "
            "indexed); screen their inputs again into a new --out to search them",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FATAL)
