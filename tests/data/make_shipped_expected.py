"""Regenerate tests/data/shipped_expected.json after new default models are committed.

Screens the five example CXRs with the packaged models and stores what they gave (prob, lung
box, lung fraction, the first embedding values), so tests/models/test_shipped_models.py notices
any change in the models or in the pipeline in front of them.

    python tests/data/make_shipped_expected.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    from engine.config import ScreenConfig
    from engine.models import load_models
    from engine.runner import screen

    models = load_models(None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        screen(
            ScreenConfig(
                inputs=(REPO / "examples",), out=out, progress=False, embeddings_in_parquet=True
            )
        )
        rows = pl.read_parquet(out / "predictions" / "*.parquet").sort("source")
    expected = {
        "model_id": models.model_id,
        "images": [
            {
                "file": Path(r["source"]).name,
                "prob": r["prob"],
                "decision": r["decision"],
                "lung_bbox": list(r["lung_bbox"]),
                "lung_fraction": r["lung_fraction"],
                "embedding_head": [float(v) for v in r["embedding"][:16]],
            }
            for r in rows.iter_rows(named=True)
        ],
    }
    path = REPO / "tests" / "data" / "shipped_expected.json"
    path.write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
