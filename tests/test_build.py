"""engine/build.py without TensorRT: options, which ONNX each plan compiles from, profile
shapes, the ONNX parser's error report, and the symmetric-quantization check of INT8 exports.
(Real builds are in tests/runtime/test_tensorrt.py, marked ``gpu``.)"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import add_int8_variant

from engine.build import (
    BuildConfig,
    build_targets,
    format_parser_errors,
    parse_source,
    profile_shapes,
    qdq_problems,
)
from engine.errors import ConfigError, ModelError
from engine.models import (
    TensorSpec,
    init_models,
    load_manifest,
    pack_models,
    save_manifest,
    sha256_file,
)


@pytest.fixture
def models(tmp_path) -> Path:
    return init_models(tmp_path / "models", size="tiny", seed=0).classifier.directory


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )


# --------------------------------------------------------------------------- options


def test_defaults_put_plans_and_timing_cache_beside_the_models(models):
    c = BuildConfig(models=models)
    assert (c.precision, c.max_batch, c.opt_batch) == ("fp16", 64, 16)
    assert c.plans_dir == models / "plans"
    assert c.timing_cache_path == models / "plans" / "timing.cache"
    c = BuildConfig(models=models, out=Path("/p"), timing_cache=Path("/t.cache"))
    assert (c.plans_dir, c.timing_cache_path) == (Path("/p"), Path("/t.cache"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "--precision must be one of fp32, fp16, int8"),
        ({"max_batch": 0}, "--max-batch must be at least 1"),
        ({"opt_batch": 0}, "--opt-batch must be between 1 and --max-batch (64)"),
        ({"max_batch": 8, "opt_batch": 9}, "--opt-batch must be between 1 and --max-batch (8)"),
        ({"workspace_mib": 0}, "--workspace-mib must be positive"),
    ],
)
def test_bad_options_are_config_errors(models, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BuildConfig(models=models, **kwargs)


# --------------------------------------------------------------------------- targets


def test_fp16_and_fp32_plans_compile_the_reference_exports(models):
    for precision in ("fp32", "fp16"):
        targets = build_targets(models, precision)
        assert [t.manifest.role for t in targets] == ["segmenter", "classifier"]
        assert [t.manifest.onnx for t in targets] == ["segmenter.onnx", "classifier.onnx"]
        assert {t.precision for t in targets} == {precision}
        assert not any(t.strongly_typed for t in targets)


def test_int8_compiles_the_qdq_variant_strongly_typed_and_fp16_where_there_is_none(models):
    add_int8_variant(models, "classifier", "classifier.int8.onnx")
    seg, clf = build_targets(models, "int8")
    assert clf.manifest.onnx == "classifier.int8.onnx" and clf.manifest.precision == "int8"
    assert clf.precision == "int8" and clf.strongly_typed
    assert seg.manifest.onnx == "segmenter.onnx" and seg.precision == "fp16"
    assert not seg.strongly_typed and "no INT8 (QDQ) export: built FP16" in seg.note
    # and fp16 still starts from the fp32 reference, not the variant
    assert build_targets(models, "fp16")[1].manifest.onnx == "classifier.onnx"


def test_float_plans_of_a_packed_release_compile_its_float_weights(models, tmp_path):
    """A release ships no FP32 export: fp16/fp32 plans build from the float16-stored (fp16)
    or INT8-stored (w8) weights, never from the QDQ export."""
    add_int8_variant(models, "classifier", "classifier.int8.onnx")
    for precision in ("fp16", "int8"):
        packed = tmp_path / precision
        pack_models(models, packed, classifier_precision=precision)
        clf = build_targets(packed, "fp16")[1]
        want = {"fp16": "classifier.fp16.onnx", "int8": "classifier.w8.onnx"}[precision]
        assert clf.manifest.onnx == want and clf.precision == "fp16"
        assert clf.manifest.sha256 == sha256_file(packed / want)
        assert (
            build_targets(packed, "int8")[1].manifest.onnx
            == {
                "fp16": "classifier.fp16.onnx",
                "int8": "classifier.int8.onnx",
            }[precision]
        )
    # w8: TensorRT parses a copy with the weights folded to float32, beside the plans
    w8 = build_targets(tmp_path / "int8", "fp32")[1].manifest
    source = parse_source(w8, tmp_path / "plans")
    assert source.parent == tmp_path / "plans" and source != w8.onnx_path
    folded = onnx.load(str(source))
    assert "DequantizeLinear" not in {n.op_type for n in folded.graph.node}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 64, 64)).astype(np.float32)
    want, got = (_run(p, x) for p in (w8.onnx_path, source))
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # a release with only its QDQ export cannot make float plans, and says so
    only = tmp_path / "int8-only"
    shutil.copytree(tmp_path / "int8", only)
    m = load_manifest(only / "classifier.json", verify=False)
    save_manifest(replace(m, variants={}), only)
    with pytest.raises(ModelError, match="only its int8 export ships, and float plans need"):
        build_targets(only, "fp16")


def test_a_replaced_onnx_is_refused_before_building(models):
    (models / "classifier.onnx").write_bytes(b"not the exported model")
    with pytest.raises(ModelError, match=r"classifier\.onnx: sha256 .* does not match classifier"):
        build_targets(models, "fp16")
    (models / "classifier.onnx").unlink()
    with pytest.raises(ModelError, match="ONNX file named by classifier.json is missing"):
        build_targets(models, "fp16")


# --------------------------------------------------------------------------- profile


def test_profile_varies_the_batch_only():
    spec = TensorSpec(name="image", shape=("N", 1, 224, 224))
    s = profile_shapes(spec, (-1, 1, 224, 224), max_batch=64, opt_batch=16)
    assert s == {"min": [1, 1, 224, 224], "opt": [16, 1, 224, 224], "max": [64, 1, 224, 224]}
    # a dimension the ONNX leaves dynamic comes from the manifest
    s = profile_shapes(spec, (-1, 1, -1, -1), max_batch=8, opt_batch=8)
    assert s["max"] == [8, 1, 224, 224]
    with pytest.raises(ModelError, match="only N may be"):
        profile_shapes(TensorSpec(name="x", shape=("N", "H")), (-1, -1), max_batch=2, opt_batch=1)
    with pytest.raises(ModelError, match="has shape"):
        profile_shapes(spec, (-1, 224, 224), max_batch=2, opt_batch=1)


# --------------------------------------------------------------------------- parser errors


class FakeParserError:
    def __init__(self, node: int, op: str, name: str, desc: str, code: str) -> None:
        self._v = (node, op, name, desc, code)

    def node(self) -> int:
        return self._v[0]

    def node_operator(self) -> str:
        return self._v[1]

    def node_name(self) -> str:
        return self._v[2]

    def desc(self) -> str:
        return self._v[3]

    def code(self) -> str:
        return self._v[4]


class FakeParser:
    def __init__(self, errors: list[FakeParserError]) -> None:
        self._errors = errors

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> FakeParserError:
        return self._errors[i]


def test_every_parser_error_is_reported_naming_the_file():
    parser = FakeParser(
        [
            FakeParserError(3, "GridSample", "gs_1", "unsupported mode", "UNSUPPORTED_NODE"),
            FakeParserError(7, "Resize", "", "cubic_coeff_a unsupported", "INVALID_NODE"),
            FakeParserError(-1, "", "", "model has no graph", "MODEL_DESERIALIZE_FAILED"),
        ]
    )
    msg = format_parser_errors(Path("/m/classifier.onnx"), parser)
    assert msg.startswith("/m/classifier.onnx: TensorRT's ONNX parser reported 3 errors:")
    assert "1. node 3 (GridSample 'gs_1'): unsupported mode [UNSUPPORTED_NODE]" in msg
    assert "2. node 7 (Resize ''): cubic_coeff_a unsupported [INVALID_NODE]" in msg
    assert "3. model has no graph [MODEL_DESERIALIZE_FAILED]" in msg


# --------------------------------------------------------------------------- QDQ exports


def _quantize(src: Path, dst: Path, symmetric: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    calib = np.random.default_rng(0).normal(size=(8, 1, 64, 64)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": calib[:4]}, {"image": calib[4:]}])

        def get_next(self):
            return next(self.it, None)

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        extra_options=extra,
    )


def test_qdq_check_accepts_symmetric_and_names_asymmetric_exports(models, tmp_path):
    src = models / "classifier.onnx"
    sym, asym = tmp_path / "sym.onnx", tmp_path / "asym.onnx"
    _quantize(src, sym, symmetric=True)
    _quantize(src, asym, symmetric=False)
    assert qdq_problems(sym) == []
    problems = qdq_problems(asym)
    assert problems and all("zero point" in p for p in problems)
    assert qdq_problems(src) == []  # no Q/DQ nodes at all
