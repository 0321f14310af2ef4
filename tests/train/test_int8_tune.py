"""INT8 weight tuning: tuning brings the INT8 outputs closer to FP32 while changing integer
values only (and learned scales keep each bias in units of input x weight scale); the float
head refit. The torch mirror it tunes (engine/train/qdq_mirror.py) has its own file,
test_qdq_mirror.py, which uses this file's `tiny_models`, `_images` and `_step`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from engine.arch import tiny_classifier  # noqa: E402
from engine.errors import ConfigError, ModelError  # noqa: E402
from engine.train.export import Int8Recipe, ort_run, ort_session, quantize_int8  # noqa: E402
from engine.train.int8_tune import Int8Tuning, refit_head, tune_int8  # noqa: E402
from engine.train.qdq_mirror import QDQMirror  # noqa: E402


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 64, 64)).astype(np.float32)


def tiny_models(d: Path) -> tuple[Path, Path]:
    """The tiny classifier (seed 3) and its MinMax INT8 export, written into `d`."""
    fp32, int8 = d / "fp32.onnx", d / "int8.onnx"
    onnx.save(tiny_classifier(seed=3), str(fp32))
    quantize_int8(fp32, int8, _images(64, seed=1), Int8Recipe(method="minmax"))
    return fp32, int8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tune"))


def _step(path) -> float:
    """The largest quantization step of a QuantizeLinear output: one step of disagreement
    is what different float summation orders can give."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return max(float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear")


def test_tuning_moves_int8_toward_fp32_and_changes_integers_only(models, tmp_path):
    fp32, int8 = models
    path = tmp_path / "tuned.onnx"
    path.write_bytes(int8.read_bytes())
    calib = _images(48, seed=4)
    ref = ort_run(ort_session(fp32, 1), calib)
    tuning = Int8Tuning(epochs=40, lr=0.05, batch=16, learn_scales=False)
    record = tune_int8(path, calib, ref, tuning, threads=1)
    assert record["objective_after"] < 0.8 * record["objective_before"], record
    assert record["images"] == 48 and record["epochs"] == 40

    # Held-out inputs: closer to FP32 than before tuning.
    x = _images(64, seed=9)
    want = ort_run(ort_session(fp32, 1), x)
    err = {
        name: np.abs(ort_run(ort_session(p, 1), x)["logit"] - want["logit"]).mean()
        for name, p in (("before", int8), ("after", path))
    }
    assert err["after"] < err["before"], err

    old, new = onnx.load(str(int8)), onnx.load(str(path))
    assert [n.SerializeToString() for n in old.graph.node] == [
        n.SerializeToString() for n in new.graph.node
    ]
    a = {t.name: numpy_helper.to_array(t) for t in old.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    changed = [n for n in a if not np.array_equal(a[n], b[n])]
    assert changed, "tuning changed nothing"
    for name in changed:  # weights and biases only; scales and zero points as calibrated
        assert not name.endswith(("_scale", "_zero_point")), name
        assert b[name].dtype == a[name].dtype, name
    moved = [np.abs(b[n].astype(np.int64) - a[n]).max() for n in changed if a[n].dtype == np.int8]
    assert moved and max(moved) >= 1


def test_no_epochs_leaves_the_file_alone(models, tmp_path):
    _, int8 = models
    path = tmp_path / "same.onnx"
    path.write_bytes(int8.read_bytes())
    assert tune_int8(path, _images(4), {}, Int8Tuning(epochs=0), threads=1) == {"epochs": 0}
    assert path.read_bytes() == int8.read_bytes()


def test_tuning_that_does_not_lower_the_objective_keeps_the_calibrated_file(models, tmp_path):
    """A step far too large for a calibration already close to FP32: the objective after the
    steps is not lower, so the calibrated file stays as it was and the record says so."""
    fp32, int8 = models
    path = tmp_path / "kept.onnx"
    path.write_bytes(int8.read_bytes())
    calib = _images(16, seed=4)
    ref = ort_run(ort_session(fp32, 1), calib)
    tuning = Int8Tuning(epochs=2, lr=50.0, bias_lr_factor=1e4, batch=8, learn_scales=False)
    record = tune_int8(path, calib, ref, tuning, threads=1)
    assert record["objective_after"] >= record["objective_before"], record
    assert record["kept"] == "calibrated (tuning did not lower the objective)"
    assert path.read_bytes() == int8.read_bytes()


def test_unmirrored_ops_and_bad_settings_are_refused():
    x = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logit", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["image"], ["logit"])], "g", [x], [y])
    with pytest.raises(ModelError, match="not mirrored: Sigmoid"):
        QDQMirror(helper.make_model(graph))
    with pytest.raises(ConfigError, match="epochs"):
        Int8Tuning(epochs=-1)
    with pytest.raises(ConfigError, match="lr"):
        Int8Tuning(lr=0)


def test_learned_scales_keep_bias_in_units_of_input_times_weight_scale(models, tmp_path):
    """learn_scales: the activation scales move, and each INT32 bias scale stays input scale x
    weight scale (what ONNX Runtime's QLinearConv assumes), so ONNX Runtime still computes what
    the mirror computes."""
    fp32, int8 = models
    untouched = QDQMirror(onnx.load(str(int8)), learn_scales=True).export()
    x = _images(16, seed=2)
    a = ort_run(ort_session(int8, 1), x)
    b = ort_run(ort_session(untouched.SerializeToString(), 1), x)
    np.testing.assert_allclose(b["logit"], a["logit"], atol=1e-6)

    path = tmp_path / "scales.onnx"
    path.write_bytes(int8.read_bytes())
    calib = _images(48, seed=4)
    ref = ort_run(ort_session(fp32, 1), calib)
    tuning = Int8Tuning(epochs=40, lr=0.05, batch=16, learn_scales=True, scale_lr=0.01)
    record = tune_int8(path, calib, ref, tuning, threads=1)
    assert record["objective_after"] < 0.8 * record["objective_before"], record
    assert record["learn_scales"] is True

    old, new = onnx.load(str(int8)), onnx.load(str(path))
    a = {t.name: numpy_helper.to_array(t) for t in old.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    acts = {n.input[1] for n in new.graph.node if n.op_type == "QuantizeLinear"} - {
        n.input[1] for n in new.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in b
    }
    assert any(not np.array_equal(a[s], b[s]) for s in acts), "no activation scale moved"
    dq_of = {n.output[0]: n for n in new.graph.node if n.op_type == "DequantizeLinear"}
    checked = 0
    for node in new.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in dq_of:
            sx = b[dq_of[node.input[0]].input[1]]
            sw = b[dq_of[node.input[1]].input[1]]
            sb = b[dq_of[node.input[2]].input[1]]
            np.testing.assert_allclose(sb, sx * sw, rtol=1e-6)
            checked += 1
    assert checked >= 4

    # ONNX Runtime and the mirror of the tuned file still agree
    got = ort_run(ort_session(path, 1), x)
    mirror = QDQMirror(new).eval()
    with torch.no_grad():
        logit = mirror(torch.from_numpy(x))[mirror.output_names.index("logit")].numpy()
    assert np.abs(logit - got["logit"]).max() <= 1.01 * _step(path)


def _head_in_float(tmp_path):
    """A tiny classifier, its INT8 export with the head (pool, Gemm) in float, 160 crops and
    the FP32 outputs on them."""
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(tiny_classifier(seed=3), str(fp32))
    head_in_float = Int8Recipe(method="minmax", exclude_op_types=("GlobalAveragePool", "Gemm"))
    quantize_int8(fp32, int8, _images(64, seed=1), head_in_float)
    x = _images(160, seed=5)
    return fp32, int8, x, ort_run(ort_session(fp32, 1), x)


def test_head_refit_follows_fp32_and_leaves_the_embeddings(tmp_path):
    """The float head is refit on the INT8 embeddings where cross-validation says it helps:
    the logits move toward FP32, the embeddings stay bit for bit, the record says why."""
    fp32, int8, x, ref = _head_in_float(tmp_path)
    before = ort_run(ort_session(int8, 1), x)
    original = int8.read_bytes()

    record = refit_head(int8, x, ref, threads=1)
    assert record["refit"] is True, record
    assert record["cv_logit_error_after"] < record["cv_logit_error_before"]
    after = ort_run(ort_session(int8, 1), x)
    np.testing.assert_array_equal(after["embedding"], before["embedding"])
    err = [np.abs(o["logit"] - ref["logit"]).mean() for o in (before, after)]
    assert err[1] < err[0], err
    held = _images(64, seed=6)  # images the refit never saw
    want = ort_run(ort_session(fp32, 1), held)["logit"]
    old = ort_run(ort_session(original, 1), held)["logit"]
    new = ort_run(ort_session(int8, 1), held)["logit"]
    assert np.abs(new - want).mean() < np.abs(old - want).mean()

    # already equal to the reference: no penalty can help, the file is left alone
    same = tmp_path / "same.onnx"
    same.write_bytes(original)
    record = refit_head(same, x, before, threads=1)
    assert record["refit"] is False and "cross-validated" in record["why"]
    assert same.read_bytes() == original


def test_head_refit_needs_a_float_head(models, tmp_path):
    fp32, int8 = models  # MinMax over the whole graph: the Gemm is quantized too
    path = tmp_path / "q.onnx"
    path.write_bytes(int8.read_bytes())
    x = _images(20, seed=7)
    record = refit_head(path, x, ort_run(ort_session(fp32, 1), x), threads=1)
    assert record == {"refit": False, "why": "no float Gemm from the embedding to the logit"}
    assert path.read_bytes() == int8.read_bytes()


def test_one_default_for_the_tuning_epochs():
    import inspect

    from engine.train import cli
    from engine.train.classifier import ClassifierTrainConfig

    want = Int8Tuning().epochs
    cfg = ClassifierTrainConfig(labels="l", images="i", segmenter="s", out="o")
    assert cfg.int8_tune_epochs == want
    for command in (cli.train_classifier, cli.train_int8):
        assert inspect.signature(command).parameters["int8_tune_epochs"].default == want


def test_head_refit_folds_keep_a_patient_together():
    from engine.train.int8_tune import group_folds

    patients = np.array(["p3", "p1", "p3", "p2", "p1", "p4", "p5", "p6", "p2", "p3"])
    folds = group_folds(len(patients), patients, 5)
    for p in set(patients):
        assert len(set(folds[patients == p])) == 1, p
    # dealt in order of first appearance: p3 p1 p2 p4 p5 p6 -> 0 1 2 3 4 0
    assert folds.tolist() == [0, 1, 0, 2, 1, 3, 4, 0, 2, 0]
    assert group_folds(7, None, 5).tolist() == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(ConfigError):
        group_folds(3, patients, 5)


def test_head_refit_by_patient_is_recorded_and_refuses_too_few_patients(tmp_path):
    fp32, int8, x, ref = _head_in_float(tmp_path)
    original = int8.read_bytes()

    few = np.array([f"p{i % 3}" for i in range(len(x))])  # 3 patients: not 5 folds
    record = refit_head(int8, x, ref, threads=1, patients=few)
    assert record["refit"] is False and "fewer than 5" in record["why"]
    assert int8.read_bytes() == original

    patients = np.array([f"p{i // 4}" for i in range(len(x))])  # 4 crops per patient
    record = refit_head(int8, x, ref, threads=1, patients=patients)
    assert record["folds_by"] == "patient" and record["refit"] is True, record
