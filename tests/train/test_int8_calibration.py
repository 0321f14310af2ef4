"""INT8 calibration one batch at a time: every input is seen once, and the ranges are those of
all inputs (not of the last batch); Percentile runs through the same strided path."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("onnxruntime.quantization")

from engine.arch import tiny_classifier  # noqa: E402
from engine.train.export import (  # noqa: E402
    Int8Recipe,
    _Calibration,
    ort_run,
    ort_session,
    quantize_int8,
)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 64, 64)).astype(np.float32)


def test_strided_reader_yields_every_input_once_in_order():
    x = _images(37)
    reader = _Calibration(x, batch=16)
    assert len(reader) == 3
    seen = []
    for start in range(len(reader)):  # what quantize_static does with CalibStridedMinMax=1
        reader.set_range(start_index=start, end_index=start + 1)
        got = [b["image"] for b in iter(reader.get_next, None)]
        assert len(got) == 1
        seen.append(got[0])
    np.testing.assert_array_equal(np.concatenate(seen), x)
    reader.set_range(0, 99)  # past the end: the rest, no error
    assert [len(b["image"]) for b in iter(reader.get_next, None)] == [16, 16, 5]


def _input_scale(path) -> float:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    return float(numpy_helper.to_array(inits[q.input[1]]))


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_ranges_come_from_all_batches(tmp_path, method):
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(tiny_classifier(seed=1), str(fp32))
    x = _images(48)
    x[0, 0, 0, :4] = [-3.0, 3.0, -3.0, 3.0]  # the extremes sit in the first of three batches
    out = tmp_path / f"{method}.onnx"
    quantize_int8(fp32, out, x, Int8Recipe(method=method, percentile=100.0))
    # U8 asymmetric over [min, max] of every input: (3 - -3) / 255; the last batch alone
    # would give about 2 / 255.
    assert _input_scale(out) == pytest.approx(6.0 / 255, rel=0.01)
    ref = ort_run(ort_session(fp32, 1), x[:8])
    got = ort_run(ort_session(out, 1), x[:8])
    a, b = ref["embedding"], got["embedding"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.95, cos  # a quantized copy of the same weights


def test_percentile_recipe_is_described():
    d = Int8Recipe(method="percentile").describe()
    assert d["method"] == "Percentile" and d["percentile"] == 99.999
    with pytest.raises(ValueError, match="calibration method"):
        quantize_int8(None, None, _images(1), Int8Recipe(method="median"))  # type: ignore[arg-type]
