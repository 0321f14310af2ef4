"""The `cxr models` group (engine/cli.py mounts `app`): export and pack models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.console import fatal_errors, out_console

app = typer.Typer(no_args_is_help=True, help="Export and inspect models.")


@app.command("init")
def models_init(
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="DIR", help="Directory to write the models into.")
    ],
    tiny: Annotated[
        bool, typer.Option(help="Tiny architectures (for tests and quick demos).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Export the segmenter (U-Net) and classifier (ResNet50) UNTRAINED, with manifests."""
    from engine.config import output_path
    from engine.models import init_models

    with fatal_errors():
        ms = init_models(output_path(out), size="tiny" if tiny else "full", seed=seed)
    for m in (ms.segmenter, ms.classifier):
        out_console.print(
            f"{m.role:10s} {m.architecture:16s} {m.onnx_path}  sha256 {m.sha256[:16]}"
        )
    out_console.print(
        "[bold yellow]These models are UNTRAINED (random weights): use them to test the "
        "pipeline, not to screen.[/]"
    )


@app.command("pack")
def models_pack(
    models: Annotated[Path, typer.Option("--models", help="Trained models directory.")],
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="DIR", help="Directory for the lean copy.")
    ],
    classifier: Annotated[
        str,
        typer.Option(
            help="int8 (QDQ export, with a w8 export for TensorRT's float plans) | fp16 "
            "(float16-stored weights)."
        ),
    ] = "int8",
) -> None:
    """A lean copy of a models directory for shipping (the chosen classifier export)."""
    from engine.config import output_path
    from engine.models import pack_models

    with fatal_errors():
        ms = pack_models(models, output_path(out), classifier_precision=classifier)
    for m in (ms.segmenter, ms.classifier):
        size = m.onnx_path.stat().st_size / 1e6
        out_console.print(f"{m.role:10s} {m.precision:5s} {m.onnx_path}  {size:.1f} MB")
        for precision, v in m.variants.items():
            path = m.directory / v.onnx
            size = path.stat().st_size / 1e6
            out_console.print(f"{'':10s} {precision:5s} {path}  {size:.1f} MB")
