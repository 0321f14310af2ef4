"""engine.train.parity: a packed classifier's exports (its own and each variant) compared with
the FP32 export they were packed from on the same served crops, the FP32 logits written for
later re-measurement, and the results recorded in the packed card and variant entries without
touching the ONNX files; `python -m engine.train.parity` is the same command.

The tiny models with an int8 variant (tests/conftest.py's add_int8_variant) and synthetic crops
(test_classifier_fit.crop_data) stand in for a trained directory's labelled images, under
tmp_path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from conftest import add_int8_variant  # noqa: E402
from test_classifier_fit import crop_data  # noqa: E402

from engine.models import load_manifest, save_manifest, sha256_file  # noqa: E402
from engine.train import redo  # noqa: E402
from engine.train.export import PARITY_INPUTS, ort_run, ort_session  # noqa: E402
from engine.train.parity import (  # noqa: E402
    main,
    packed_parity,
    record_parity,
    reference_logits,
)

SPLIT = ["train"] * 6 + ["val"] * 3 + ["test"] * 3


@pytest.fixture
def packed(tiny_models, tmp_path):
    """A copy of the tiny models whose classifier lists an int8 variant (a copy of its ONNX)."""
    d = tmp_path / "packed"
    shutil.copytree(tiny_models.classifier.directory, d)
    add_int8_variant(d, "classifier", "classifier.int8.onnx")
    return d


@pytest.fixture
def reference(packed, monkeypatch):
    """redo.reference_outputs replaced: the packed FP32 classifier's ONNX outputs on 12
    synthetic crops (what it computes from a trained directory's labelled images)."""
    ref = load_manifest(packed / "classifier.json")
    data = crop_data(SPLIT)
    fp32 = ort_run(ort_session(ref.onnx_path, 1), data.inputs)
    calls = []

    def outputs(trained, labels, images, *, extra=(), threads=2, cache=None):
        calls.append((trained, labels, images, threads))
        return ref, data, fp32

    monkeypatch.setattr(redo, "reference_outputs", outputs)
    return ref, data, fp32, calls


def test_reference_logits_list_each_crop_by_its_csv_path(reference):
    ref, data, fp32, _ = reference
    doc = reference_logits(ref, data, fp32)
    assert doc["reference"] == f"{ref.onnx} (fp32), sha256 {ref.sha256}"
    assert doc["threshold"] == ref.threshold and doc["inputs"] == PARITY_INPUTS
    assert len(doc["images"]) == 12
    first = doc["images"][0]
    assert first == {
        "path": "images/0.png",
        "split": "train",
        "label": 1,
        "logit": pytest.approx(float(fp32["logit"][0, 0])),
    }
    assert [im["split"] for im in doc["images"]] == SPLIT
    json.dumps(doc, allow_nan=False)  # plain JSON


def test_packed_parity_measures_every_export_the_packed_manifest_lists(packed, reference, tmp_path):
    ref, data, fp32, calls = reference
    out = tmp_path / "reference.json"
    pars = packed_parity(
        packed, packed, tmp_path / "l.csv", tmp_path, threads=1, reference_json=out
    )
    assert calls == [(packed, tmp_path / "l.csv", tmp_path, 1)]
    assert set(pars) == {"fp32", "int8"}
    for precision, par in pars.items():
        # both files hold the FP32 weights: the same decisions, AUC, embeddings
        assert par["images"] == 12 and par["same_decision"] == 1.0, precision
        assert par["held_out_images"] == 6 and par["roc_auc_diff"] == pytest.approx(0.0)
        assert par["embedding_cosine_min"] == pytest.approx(1.0)
        assert par["meets_bar"] is True and par["inputs"] == PARITY_INPUTS
        assert par["reference"] == f"{ref.onnx} (fp32), sha256 {ref.sha256[:12]}"
    assert "roc_auc_int8" in pars["int8"] and "roc_auc_fp32" in pars["fp32"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(reference_logits(ref, data, fp32)))


def test_record_parity_writes_the_card_and_variants_not_the_onnx_files(packed):
    before = {p.name: sha256_file(p) for p in packed.glob("*.onnx")}
    m = load_manifest(packed / "classifier.json")
    made = {"calibration": {"images": 256}, "same_decision": 0.5}  # what training recorded
    card = {**m.card, "int8": {"note": "kept", "parity": made}}
    save_manifest(replace(m, card=card), packed)
    pars = {"fp32": {"same_decision": 1.0}, "int8": {"same_decision": 0.99}}
    recorded = record_parity(packed, pars)
    again = load_manifest(packed / "classifier.json")
    assert again.card == recorded.card
    assert again.card["fp32"] == {"onnx": "classifier.onnx", "parity": pars["fp32"]}
    # the new figures replace the old ones; how the export was calibrated and tuned stays
    want = {"calibration": {"images": 256}, "same_decision": 0.99}
    assert again.card["int8"] == {"note": "kept", "onnx": "classifier.int8.onnx", "parity": want}
    assert again.variants["int8"].parity == want
    assert again.variants["int8"].sha256 == m.variants["int8"].sha256
    assert {p.name: sha256_file(p) for p in packed.glob("*.onnx")} == before


def test_the_script_prints_json_and_writes_only_when_asked(packed, reference, tmp_path, capsys):
    args = ["--models", str(packed), "--packed", str(packed), "--labels", str(tmp_path / "l.csv")]
    args += ["--images", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"fp32", "int8"} and printed["int8"]["same_decision"] == 1.0
    unwritten = load_manifest(packed / "classifier.json")  # no --write: nothing recorded
    assert not unwritten.variants["int8"].parity and "fp32" not in unwritten.card
    assert main([*args, "--write"]) == 0
    assert load_manifest(packed / "classifier.json").card["int8"]["parity"]["same_decision"] == 1.0
    with pytest.raises(SystemExit) as usage:
        main(["--models", str(packed)])
    assert usage.value.code == 2
    assert main(["--help"]) == 0 and "--packed" in capsys.readouterr().out
