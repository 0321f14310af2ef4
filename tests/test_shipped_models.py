"""The default models that ship inside the package: present, intact, and giving what they gave.

Expected values come from tests/data/make_shipped_expected.py (rerun it when new weights are
committed). Tolerances: the same ONNX Runtime build gives the same numbers to ~1e-6; 1e-4 on
probabilities and lung fraction leaves room for other CPUs' kernels, and a lung box may move by
one pixel of the source per side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.config import ScreenConfig
from engine.models import (
    AUTO_MAX_AUC_DIFF,
    AUTO_MIN_SAME_DECISION,
    PACKAGED_MODELS,
    load_models,
    sha256_file,
)
from engine.runner import screen

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "tests" / "data" / "shipped_expected.json"
PROB_TOL = 1e-4
BOX_TOL_PX = 1

pytestmark = pytest.mark.skipif(
    not (PACKAGED_MODELS / "classifier.json").is_file(), reason="no default models shipped yet"
)


def test_shipped_models_load_trained_with_matching_sha256():
    models = load_models(None)
    for m in (models.segmenter, models.classifier):
        assert m.trained, m.role
        assert sha256_file(m.onnx_path) == m.sha256
        assert m.card, f"{m.role} has no model card"
        for v in m.variants.values():  # e.g. the w8 export beside an INT8 classifier
            assert sha256_file(m.directory / v.onnx) == v.sha256, v.onnx
    files = {m.onnx_path for m in (models.segmenter, models.classifier)}
    files |= {
        m.directory / v.onnx
        for m in (models.segmenter, models.classifier)
        for v in m.variants.values()
    }
    total = sum(f.stat().st_size for f in files)
    assert total < 60e6, f"shipped weights are {total / 1e6:.1f} MB, the budget is 60 MB"


def test_shipped_classifier_records_parity_with_fp32_within_the_bar():
    clf = load_models(None).classifier
    assert clf.precision in ("int8", "fp16"), clf.precision
    parity = clf.card[clf.precision]["parity"]  # measured on the 288 dev images vs FP32
    assert parity["same_decision"] >= AUTO_MIN_SAME_DECISION
    assert abs(parity["roc_auc_diff"]) <= AUTO_MAX_AUC_DIFF
    assert parity["embedding_cosine_mean"] >= 0.99


def test_shipped_models_reproduce_the_stored_outputs_on_the_examples(tmp_path):
    expected = json.loads(EXPECTED.read_text())
    models = load_models(None)
    assert expected["model_id"] == models.model_id, "rerun tests/data/make_shipped_expected.py"
    out = tmp_path / "out"
    screen(
        ScreenConfig(
            inputs=(REPO / "examples",), out=out, progress=False, embeddings_in_parquet=True
        )
    )
    rows = {
        Path(r["source"]).name: r
        for r in pl.read_parquet(out / "predictions" / "*.parquet").iter_rows(named=True)
    }
    assert sorted(rows) == sorted(e["file"] for e in expected["images"])
    for e in expected["images"]:
        got = rows[e["file"]]
        assert got["status"] == "ok"
        assert got["prob"] == pytest.approx(e["prob"], abs=PROB_TOL), e["file"]
        assert got["lung_fraction"] == pytest.approx(e["lung_fraction"], abs=PROB_TOL)
        assert np.abs(np.array(got["lung_bbox"]) - e["lung_bbox"]).max() <= BOX_TOL_PX
        head = np.array(got["embedding"][:16])
        np.testing.assert_allclose(head, e["embedding_head"], rtol=1e-3, atol=1e-4)
