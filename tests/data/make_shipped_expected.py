"""Regenerate tests/data/shipped_expected.json after new default models are committed.

Screens the five example CXRs with the packaged models, once with each export of the
classifier (the shipped one and its variants, e.g. the INT8 export `--precision auto` runs on
VNNI/AMX CPUs), and stores what they gave (prob, decision, lung box, lung fraction, the first
embedding values), so tests/models/test_shipped_models.py notices any change in the models or in
the pipeline in front of them, whichever export the CPU running the tests picks.

    python tests/data/make_shipped_expected.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[2]


def screen_examples(precision: str) -> dict:
    """What the packaged models give on the examples with the classifier export `precision`."""
    from engine.config import ScreenConfig
    from engine.models import load_models
    from engine.runner import screen

    models = load_models(None, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        screen(
            ScreenConfig(
                inputs=(REPO / "examples",),
                out=out,
                progress=False,
                embeddings_in_parquet=True,
                precision=precision,
            )
        )
        rows = pl.read_parquet(out / "predictions" / "*.parquet").sort("source")
    return {
        "model_id": models.model_id,
        "images": [
            {
                "file": Path(r["source"]).name,
                "status": r["status"],
                "prob": r["prob"],
                "decision": r["decision"],
                "lung_bbox": list(r["lung_bbox"]),
                "lung_fraction": r["lung_fraction"],
                "embedding_head": [float(v) for v in r["embedding"][:16]],
            }
            for r in rows.iter_rows(named=True)
        ],
    }


def main() -> None:
    from engine.models import PACKAGED_MODELS, load_manifest, manifest_path

    clf = load_manifest(manifest_path(PACKAGED_MODELS, "classifier"))
    expected = {p: screen_examples(p) for p in (clf.precision, *sorted(clf.variants))}
    path = REPO / "tests" / "data" / "shipped_expected.json"
    path.write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
