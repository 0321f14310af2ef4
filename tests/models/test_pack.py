"""engine.models.pack: the lean copy of a models directory that ships: the segmenter as is and
the chosen classifier export (int8 with its w8 weights for TensorRT's float plans, fp16, or fp16
with the INT8 export beside it for `--precision auto`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from conftest import add_int8_variant

from engine.errors import ModelError
from engine.models import load_manifest, pack_models, sha256_file


@pytest.fixture
def models(tiny_models_dir, tmp_path) -> Path:
    """A copy of the tiny models with an int8 export (a copy of the FP32 file) recorded."""
    src = Path(shutil.copytree(tiny_models_dir, tmp_path / "models"))
    add_int8_variant(src, "classifier", "classifier.int8.onnx")
    return src


def _files(out: Path) -> list[str]:
    """The classifier's files in a packed folder (classifier.X -> X), after checking that the
    segmenter's two files are there and nothing else."""
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if not n.startswith("classifier.")] == [
        "segmenter.json",
        "segmenter.onnx",
    ]
    return [n.removeprefix("classifier.") for n in names if n.startswith("classifier.")]


def test_int8_pack_ships_the_qdq_export_with_a_w8_variant(models, tmp_path):
    out = tmp_path / "packed"
    packed = pack_models(models, out, classifier_precision="int8")
    assert _files(out) == ["int8.onnx", "json", "w8.onnx"]  # no FP32 classifier
    clf = packed.classifier
    assert (clf.onnx, clf.precision, list(clf.variants)) == ("classifier.int8.onnx", "int8", ["w8"])
    assert clf.variants["w8"].sha256 == sha256_file(out / "classifier.w8.onnx")
    w8 = onnx.load(str(out / "classifier.w8.onnx"))
    assert "DequantizeLinear" in {n.op_type for n in w8.graph.node}
    assert clf.card["packed_from"] == str(models) and clf.card["reference"] == "fp32"
    seg = load_manifest(models / "segmenter.json")
    assert packed.segmenter.sha256 == seg.sha256  # the segmenter goes as it is


def test_fp16_pack_ships_float16_weights(models, tmp_path):
    packed = pack_models(models, tmp_path / "packed", classifier_precision="fp16")
    clf = packed.classifier
    assert (clf.onnx, clf.precision, clf.variants) == ("classifier.fp16.onnx", "fp16", {})
    half = onnx.load(str(clf.onnx_path))
    assert "Cast" in {n.op_type for n in half.graph.node}
    assert clf.onnx_path.stat().st_size < (models / "classifier.onnx").stat().st_size


def test_fp16_int8_pack_ships_float16_weights_with_the_int8_export_beside_them(models, tmp_path):
    from engine.models import choose_precision

    out = tmp_path / "packed"
    packed = pack_models(models, out, classifier_precision="fp16+int8")
    assert _files(out) == ["fp16.onnx", "int8.onnx", "json"]
    clf = packed.classifier
    assert (clf.onnx, clf.precision, list(clf.variants)) == (
        "classifier.fp16.onnx",
        "fp16",
        ["int8"],
    )
    trained = load_manifest(models / "classifier.json")
    assert clf.variants["int8"] == trained.variants["int8"]  # its recorded parity goes along
    assert clf.variants["int8"].sha256 == sha256_file(out / "classifier.int8.onnx")
    assert choose_precision(clf, "int8").onnx == "classifier.int8.onnx"
    assert choose_precision(clf, "fp16").onnx == "classifier.fp16.onnx"


def test_the_segmenter_goes_with_its_int8_export_and_box_rule(models, tmp_path):
    from dataclasses import replace

    from engine.models import save_manifest

    add_int8_variant(models, "segmenter", "segmenter.int8.onnx")
    seg = load_manifest(models / "segmenter.json")
    save_manifest(replace(seg, box_min_region=0.0005), models)
    out = tmp_path / "packed"
    packed = pack_models(models, out, classifier_precision="fp16+int8")
    assert sorted(p.name for p in out.glob("segmenter.*")) == [
        "segmenter.int8.onnx",
        "segmenter.json",
        "segmenter.onnx",
    ]
    assert packed.segmenter.variants == seg.variants and packed.segmenter.box_min_region == 0.0005
    assert sha256_file(out / "segmenter.int8.onnx") == seg.variants["int8"].sha256


def test_what_cannot_be_packed_is_a_model_error(tiny_models_dir, tmp_path):
    with pytest.raises(ModelError, match="the classifier has no int8 export to pack"):
        pack_models(tiny_models_dir, tmp_path / "a", classifier_precision="int8")
    with pytest.raises(ModelError, match="the classifier has no int8 export to pack"):
        pack_models(tiny_models_dir, tmp_path / "c", classifier_precision="fp16+int8")
    with pytest.raises(ModelError, match="must be int8, fp16 or fp16\\+int8, not 'fp32'"):
        pack_models(tiny_models_dir, tmp_path / "b", classifier_precision="fp32")
