"""engine.models.manifest: the manifest JSON (format, tensors, preprocessing, crop, threshold)
and its checks when loaded: checksum, missing files, malformed or invalid fields, each a
ModelError naming the file and the fix."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.models import (
    MANIFEST_FORMAT,
    ModelSet,
    init_models,
    load_manifest,
    load_models,
    manifest_path,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, ModelSet]:
    out = tmp_path_factory.mktemp("tiny")
    return out, init_models(out, size="tiny", seed=0)


@pytest.fixture
def models_dir(pristine, tmp_path) -> Path:
    """A private copy of the tiny models that a test may damage."""
    return Path(shutil.copytree(pristine[0], tmp_path / "models"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def rewrite(path: Path, **changes) -> None:
    raw = read_json(path)
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_manifest_json_carries_everything_the_pipeline_needs(pristine):
    out, _ = pristine
    seg = read_json(out / "segmenter.json")
    clf = read_json(out / "classifier.json")
    for raw in (seg, clf):
        assert raw["format"] == MANIFEST_FORMAT
        assert raw["onnx"] == f"{raw['role']}.onnx"
        assert raw["sha256"] == hashlib.sha256((out / raw["onnx"]).read_bytes()).hexdigest()
        assert raw["trained"] is False
        assert "UNTRAINED" in raw["card"]["status"] and raw["card"]["seed"] == 0
        assert raw["threshold"] == 0.5
        assert raw["preprocess"] == {
            "size": [64, 64],
            "channels": 1,
            "mean": [0.5],
            "std": [0.25],
            "intensity": "minmax",
        }
        assert raw["inputs"] == [{"name": "image", "shape": ["N", 1, 64, 64], "dtype": "float32"}]
        assert "directory" not in raw  # where it lives is not part of the manifest
    assert seg["role"] == "segmenter" and seg["architecture"] == "tiny-unet"
    assert seg["outputs"] == [{"name": "mask_logit", "shape": ["N", 1, 64, 64], "dtype": "float32"}]
    assert seg.get("crop") is None
    assert clf["role"] == "classifier" and clf["architecture"] == "tiny-classifier"
    assert clf["outputs"] == [
        {"name": "logit", "shape": ["N", 1], "dtype": "float32"},
        {"name": "embedding", "shape": ["N", 64], "dtype": "float32"},
    ]
    assert clf["crop"] == {"source_size": 128, "margin": 0.05}


def test_unknown_output_name(pristine):
    with pytest.raises(ModelError, match="no output named 'probability'"):
        pristine[1].classifier.output("probability")


# --------------------------------------------------------------------------- verification


def test_sha256_mismatch_names_the_file_and_the_fix(models_dir):
    onnx_file = models_dir / "classifier.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelError) as err:
        load_models(models_dir)
    msg = str(err.value)
    assert str(onnx_file) in msg and "classifier.json" in msg
    assert "sha256" in msg and "does not match" in msg
    assert "restore it or re-export the model" in msg
    # without verification the manifest still reads
    assert load_manifest(models_dir / "classifier.json", verify=False).role == "classifier"


def test_missing_onnx(models_dir):
    (models_dir / "segmenter.onnx").unlink()
    with pytest.raises(
        ModelError, match=r"segmenter\.onnx: ONNX file named by segmenter\.json is missing"
    ):
        load_models(models_dir)


def test_missing_manifest(models_dir):
    (models_dir / "classifier.json").unlink()
    with pytest.raises(ModelError, match=r"classifier\.json: model manifest not found"):
        load_models(models_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="models directory not found"):
        load_models(tmp_path / "nowhere")


def test_malformed_json(models_dir):
    path = models_dir / "segmenter.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(
        ModelError, match=r"segmenter\.json: cannot read model manifest \(JSONDecodeError"
    ):
        load_models(models_dir)


def test_missing_field(models_dir):
    path = models_dir / "classifier.json"
    raw = read_json(path)
    del raw["preprocess"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"cannot read model manifest \(KeyError: 'preprocess'\)"):
        load_models(models_dir)


def test_manifest_in_the_wrong_role_file(models_dir):
    # a classifier manifest saved as segmenter.json
    shutil.copy(models_dir / "classifier.json", models_dir / "segmenter.json")
    with pytest.raises(ModelError, match=r"segmenter\.json: role is 'classifier', not 'segmenter'"):
        load_models(models_dir)


def test_unknown_role(models_dir):
    rewrite(models_dir / "segmenter.json", role="detector")
    with pytest.raises(ModelError, match=r"role is 'detector', expected one of"):
        load_models(models_dir)


@pytest.mark.parametrize(
    "role,change,message",
    [
        ("segmenter", {"mean": [0.5, 0.5]}, "one value per channel"),
        ("classifier", {"std": [0.2, 0.2, 0.2]}, "one value per channel"),
        ("segmenter", {"std": [0.0]}, "std must be positive"),
        ("classifier", {"intensity": "gamma"}, "intensity 'gamma' is not one of"),
        ("segmenter", {"size": [32, 32]}, r"inputs\[0\]\.shape must be"),
    ],
)
def test_invalid_preprocess(models_dir, role, change, message):
    path = manifest_path(models_dir, role)
    raw = read_json(path)
    raw["preprocess"].update(change)
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=message) as err:
        load_models(models_dir)
    assert f"{path}: invalid manifest" in str(err.value)


def test_classifier_without_embedding_output(models_dir):
    path = models_dir / "classifier.json"
    raw = read_json(path)
    raw["outputs"] = [o for o in raw["outputs"] if o["name"] != "embedding"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="outputs named 'logit' and 'embedding'"):
        load_models(models_dir)


def test_classifier_without_logit_output(models_dir):
    path = models_dir / "classifier.json"
    raw = read_json(path)
    raw["outputs"][0]["name"] = "prob"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="outputs named 'logit' and 'embedding'"):
        load_models(models_dir)


def test_classifier_without_crop(models_dir):
    rewrite(models_dir / "classifier.json", crop=None)
    with pytest.raises(ModelError, match="needs a 'crop' section"):
        load_models(models_dir)


def test_threshold_and_format_are_checked(models_dir):
    rewrite(models_dir / "classifier.json", threshold=1.5)
    with pytest.raises(ModelError, match="threshold 1.5 is not a probability"):
        load_models(models_dir)
    rewrite(models_dir / "classifier.json", threshold=0.5, format="cxr-engine-model/9")
    with pytest.raises(ModelError, match="this engine reads 'cxr-engine-model/1'"):
        load_models(models_dir)


def test_several_problems_are_reported_together(models_dir):
    path = models_dir / "classifier.json"
    raw = read_json(path)
    raw["crop"] = None
    raw["threshold"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError) as err:
        load_models(models_dir)
    assert "'crop' section" in str(err.value) and "not a probability" in str(err.value)


def test_the_box_rule_is_read_written_only_when_set_and_checked(models_dir):
    from engine.models import load_manifest, save_manifest

    seg = load_models(models_dir).segmenter
    assert seg.box_min_region == 0.0 and "box_min_region" not in seg.to_json()
    assert "box_min_region" not in read_json(models_dir / "segmenter.json")  # as it was written
    rewrite(models_dir / "segmenter.json", box_min_region=0.002)
    seg = load_models(models_dir).segmenter
    assert seg.box_min_region == 0.002 and seg.to_json()["box_min_region"] == 0.002
    save_manifest(seg, models_dir)
    assert load_manifest(models_dir / "segmenter.json").box_min_region == 0.002
    rewrite(models_dir / "segmenter.json", box_min_region=1.5)
    with pytest.raises(ModelError, match=r"box_min_region 1.5 is not in \[0, 1\)"):
        load_models(models_dir)
    rewrite(models_dir / "segmenter.json", box_min_region=0.0)
    rewrite(models_dir / "classifier.json", box_min_region=0.01)
    with pytest.raises(ModelError, match="box_min_region belongs to the segmenter's manifest"):
        load_models(models_dir)


def test_test_time_crops_are_read_written_only_when_set_and_checked(models_dir):
    from engine.models import load_manifest, save_manifest

    clf = load_models(models_dir).classifier
    assert clf.tta == () and "tta" not in clf.to_json()
    assert "tta" not in read_json(models_dir / "classifier.json")  # as it was written
    transforms = [[1.05, 0.95, 0.02, -0.03], [0.94, 1.07, -0.04, 0.01]]
    rewrite(models_dir / "classifier.json", tta=transforms)
    clf = load_models(models_dir).classifier
    assert clf.tta == ((1.05, 0.95, 0.02, -0.03), (0.94, 1.07, -0.04, 0.01))
    assert clf.to_json()["tta"] == transforms  # JSON lists again
    save_manifest(clf, models_dir)
    assert load_manifest(models_dir / "classifier.json").tta == clf.tta
    for bad, message in (
        ([[3.0, 1.0, 0.0, 0.0]], r"scales \(sx, sy\) must be in \[0.5, 2\]"),
        ([[1.0, 1.0, 0.0, -0.7]], r"shifts \(dx, dy\) must be within \+-0.5"),
        ([[1.0, 1.0, 0.0]], r"each box transform is \[sx, sy, dx, dy\], not \[1.0, 1.0, 0.0\]"),
    ):
        rewrite(models_dir / "classifier.json", tta=bad)
        with pytest.raises(ModelError, match=message):
            load_models(models_dir)
    rewrite(models_dir / "classifier.json", tta=[])
    rewrite(models_dir / "segmenter.json", tta=transforms)
    with pytest.raises(ModelError, match="tta belongs to the classifier's manifest"):
        load_models(models_dir)


def test_onnx_files_are_the_export_then_its_variants(models_dir):
    from conftest import add_int8_variant

    from engine.models import load_manifest

    assert load_manifest(models_dir / "segmenter.json").onnx_files == ["segmenter.onnx"]
    add_int8_variant(models_dir, "segmenter", "segmenter.int8.onnx")
    seg = load_manifest(models_dir / "segmenter.json")
    assert seg.onnx_files == ["segmenter.onnx", "segmenter.int8.onnx"]
