"""engine.models: manifests written by ``init_models``, loading, verification and errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
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
from engine.models import modelset as models_mod


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


# --------------------------------------------------------------------------- init_models


def test_init_writes_onnx_and_manifests(pristine):
    out, ms = pristine
    names = sorted(p.name for p in out.iterdir())
    assert names == ["classifier.json", "classifier.onnx", "segmenter.json", "segmenter.onnx"]
    for m in (ms.segmenter, ms.classifier):
        assert m.onnx_path == out / f"{m.role}.onnx"
        assert m.sha256 == hashlib.sha256(m.onnx_path.read_bytes()).hexdigest()
        graph = onnx.load(str(m.onnx_path)).graph
        assert [i.name for i in graph.input] == [t.name for t in m.inputs]
        assert {o.name for o in graph.output} == {t.name for t in m.outputs}


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


def test_load_models_round_trips(pristine):
    out, ms = pristine
    loaded = load_models(out)
    assert loaded == ms
    assert loaded.classifier.output("embedding").shape == ("N", 64)
    assert loaded.segmenter.input.shape == ("N", 1, 64, 64)
    assert loaded.trained is False


def test_model_id_is_stable_and_follows_the_weights(pristine, tmp_path):
    _, ms = pristine
    mid = ms.model_id
    c, s = ms.classifier, ms.segmenter
    assert mid.startswith(c.architecture) and f"+{s.architecture}" in mid
    assert f"@{c.sha256[:8]}" in mid and f"@{s.sha256[:8]}" in mid
    again = init_models(tmp_path / "again", size="tiny", seed=0)
    assert again.model_id == ms.model_id  # same seed, same bytes
    other = init_models(tmp_path / "other", size="tiny", seed=1)
    assert other.model_id != ms.model_id
    assert other.classifier.sha256 != ms.classifier.sha256
    assert other.segmenter.sha256 != ms.segmenter.sha256


def test_with_threshold(pristine):
    _, ms = pristine
    assert ms.with_threshold(None) is ms
    changed = ms.with_threshold(0.8)
    assert changed.classifier.threshold == 0.8
    assert ms.classifier.threshold == 0.5  # frozen: the original is untouched
    assert changed.segmenter == ms.segmenter
    assert changed.model_id == ms.model_id  # the threshold is not part of the weights


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


def test_no_models_installed_points_at_models_init(tmp_path, monkeypatch):
    monkeypatch.setattr(models_mod, "PACKAGED_MODELS", tmp_path / "packaged")
    with pytest.raises(ModelError) as err:
        load_models(None)
    msg = str(err.value)
    assert "cxr models init" in msg and "--models" in msg
    assert str(tmp_path / "packaged") in msg


def test_w8_weights_store_int8_and_stay_close_to_fp32(pristine, tmp_path):
    """w8: the FP32 weights stored as per-channel INT8 (a quarter of the size), float compute;
    float_weights folds them back into float32 initializers."""
    import onnx
    import onnxruntime as ort

    from engine.models import float_weights, w8_weights

    clf = pristine[1].classifier
    fp32 = onnx.load(str(clf.onnx_path))
    w8 = w8_weights(onnx.load(str(clf.onnx_path)), min_elements=16)
    assert "DequantizeLinear" in {n.op_type for n in w8.graph.node}
    assert len(w8.SerializeToString()) < 0.5 * len(fp32.SerializeToString())
    x = np.random.default_rng(1).uniform(-1, 1, (4, 1, 64, 64)).astype(np.float32)

    def run(model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(["embedding"], {"image": x})[0]

    a, b = run(fp32), run(w8)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999, cos
    folded = float_weights(w8)
    assert "DequantizeLinear" not in {n.op_type for n in folded.graph.node}
    np.testing.assert_allclose(run(folded), b, rtol=1e-5, atol=1e-6)


def test_auto_precision_takes_int8_only_where_its_parity_holds(pristine):
    from dataclasses import replace as _replace

    from engine.cpu import parse_cpuinfo
    from engine.models import Variant, choose_precision, why_precision

    vnni = parse_cpuinfo("model name\t: Zen 4\nflags\t\t: avx2 avx512f avx512_vnni\n")
    amx = parse_cpuinfo("flags\t\t: avx2 avx512f amx_tile amx_int8\n")
    avx2 = parse_cpuinfo("model name\t: old\nflags\t\t: sse2 avx avx2 fma\n")
    clf = pristine[1].classifier
    good = {"same_decision": 0.995, "roc_auc_diff": -0.002}
    bad = {"same_decision": 0.95, "roc_auc_diff": -0.002}
    v = {"int8": Variant(onnx="q.onnx", sha256="a" * 64, parity=good)}
    with_int8 = _replace(clf, variants=v)
    assert choose_precision(with_int8, "auto", vnni).precision == "int8"
    assert choose_precision(with_int8, "auto", amx).precision == "int8"
    assert "avx512_vnni" in why_precision(with_int8, "auto", vnni)
    # no 8-bit dot product on an AVX2-only CPU: INT8 would be slower there, the float export runs
    assert choose_precision(with_int8, "auto", avx2).precision == "fp32"
    assert "no VNNI/AMX" in why_precision(with_int8, "auto", avx2)
    # ...unless asked for
    assert choose_precision(with_int8, "int8", avx2).precision == "int8"
    v["int8"] = Variant(onnx="q.onnx", sha256="a" * 64, parity=bad)
    assert choose_precision(_replace(clf, variants=v), "auto", vnni).precision == "fp32"
    assert "parity" in why_precision(_replace(clf, variants=v), "auto", vnni)
    # a shipped INT8 classifier with its w8 export: auto keeps the INT8 one
    w8 = {"w8": Variant(onnx="w.onnx", sha256="b" * 64, parity=good)}
    shipped = _replace(clf, precision="int8", variants=w8)
    assert choose_precision(shipped, "auto").precision == "int8"
    assert choose_precision(shipped, "w8").onnx == "w.onnx"
