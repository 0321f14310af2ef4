"""Parity of a packed (shipped) classifier with the FP32 export it was packed from.

    python -m engine.train.parity --models TRAINED_DIR --packed PACKED_DIR \
        --labels LABELS.csv --images ROOT [--write]

(the same command as `cxr train parity ...`).

Both classifiers score the same served lung crops of every labelled image (the engine pipeline,
the trained segmenter, engine.stages.crop: exactly what `cxr train classifier` measures INT8
parity on), and the packed export is compared with the FP32 one: same decision at the manifest's
threshold, ROC AUC of each, probabilities, embedding cosine; each export the packed manifest
lists (its own and its variants) is measured. --write records the results in the packed
manifest's card under each precision (e.g. card["fp16"]["parity"]) and in the variant entries;
the ONNX files are unchanged.

`cxr` mounts the command, so torch (the train extra) is imported only when parity is measured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from engine.console import fatal_errors, run_script
from engine.models import (
    Manifest,
    classifier_parity_ok,
    load_manifest,
    manifest_path,
    save_manifest,
)
from engine.train import require_torch

if TYPE_CHECKING:
    from engine.train.classifier import CropData


def reference_logits(ref: Manifest, data: CropData, fp32: dict[str, np.ndarray]) -> dict[str, Any]:
    """The FP32 export's logit on each crop parity is measured on, by the image's path as the
    labels CSV gives it: what a test of the shipped export can re-measure parity against
    without the FP32 file (tests/models/test_shipped_models.py)."""
    from engine.train.export import PARITY_INPUTS

    logits = fp32["logit"].reshape(-1)
    return {
        "reference": f"{ref.onnx} (fp32), sha256 {ref.sha256}",
        "threshold": ref.threshold,
        "inputs": PARITY_INPUTS,
        "images": [
            {"path": im.rel, "split": str(s), "label": int(y), "logit": float(v)}
            for im, s, y, v in zip(data.images, data.split, data.labels, logits, strict=True)
        ],
    }


def packed_parity(
    trained: Path,
    packed: Path,
    labels: Path,
    images: Path,
    *,
    threads: int = 2,
    reference_json: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Parity with the FP32 export of each export the packed classifier lists (its own and
    its variants, e.g. the w8 one a release with INT8 carries), keyed by precision.
    reference_json: where to write the FP32 logits it was measured against."""
    from engine.train.data import log
    from engine.train.export import PARITY_INPUTS, export_parity
    from engine.train.redo import reference_outputs

    got = load_manifest(manifest_path(packed, "classifier"))
    ref, data, fp32 = reference_outputs(trained, labels, images, threads=threads)
    if reference_json is not None:
        doc = reference_logits(ref, data, fp32)
        reference_json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    exports = {got.precision: got.onnx_path} | {
        p: got.directory / v.onnx for p, v in got.variants.items()
    }
    out = {}
    for precision, path in exports.items():
        log(f"parity of {path} ({precision}) with the FP32 export")
        par = export_parity(
            fp32,
            path,
            data.inputs,
            data.labels,
            got.threshold,
            threads,
            precision=precision,
            held_out=data.split != "train",
        )
        par["inputs"] = PARITY_INPUTS
        par["reference"] = f"{ref.onnx} (fp32), sha256 {ref.sha256[:12]}"
        par["meets_bar"] = classifier_parity_ok(par)
        out[precision] = par
    return out


def record_parity(packed: Path, pars: dict[str, dict[str, Any]]) -> Manifest:
    """Record each export's parity in the packed classifier manifest's card under its
    precision (card[precision] = {..., "onnx": ..., "parity": par}, keeping the record of how
    the export was made, e.g. INT8 calibration and tuning) and in its variant entry; the ONNX
    files are unchanged."""
    m = load_manifest(manifest_path(packed, "classifier"))
    card, variants = dict(m.card), dict(m.variants)
    for precision, measured in pars.items():
        onnx = m.onnx if precision == m.precision else variants[precision].onnx
        # how training made the export (calibration, tuning) stays with its new figures
        made = (card.get(precision) or {}).get("parity") or {}
        par = {k: made[k] for k in ("calibration",) if k in made} | measured
        card[precision] = dict(card.get(precision, {})) | {"onnx": onnx, "parity": par}
        if precision in variants:
            variants[precision] = replace(variants[precision], parity=par)
    recorded = replace(m, card=card, variants=variants)
    save_manifest(recorded, packed)
    return recorded


def parity_command(
    models: Annotated[Path, typer.Option(help="Trained models directory (the FP32 export).")],
    packed: Annotated[Path, typer.Option(help="Packed models directory.")],
    labels: Annotated[Path, typer.Option(help="Labels CSV of the training.")],
    images: Annotated[Path, typer.Option(help="Folder the CSV's 'path' column is relative to.")],
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 2,
    write: Annotated[bool, typer.Option(help="Record it in the packed card.")] = False,
) -> None:
    """Parity of a packed classifier's exports with the FP32 export (JSON on stdout)."""
    with fatal_errors():
        require_torch()
        pars = packed_parity(models, packed, labels, images, threads=threads)
        print(json.dumps(pars, indent=2))
        if write:
            record_parity(packed, pars)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.train.parity ARGS`: the exit code of `cxr train parity ARGS`."""
    return run_script(parity_command, argv, prog="python -m engine.train.parity")


if __name__ == "__main__":
    sys.exit(main())
