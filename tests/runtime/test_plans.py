"""engine.runtime.plans: TensorRT plan manifests: a plan built from another ONNX, by another
TensorRT or on another GPU is refused with the advice to rebuild; --backend auto takes TensorRT
only where its plans are usable. No GPU needed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.models import ModelSet, Variant, init_models
from engine.runtime import cuda, resolve_backend
from engine.runtime.plans import (
    PLAN_FORMAT,
    PlanManifest,
    default_plans_dir,
    find_plan,
    missing_requirements,
    plan_problems,
    plans_usable,
    read_plan_manifest,
)

H100 = cuda.GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
TRT = "10.13.0.35"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelSet:
    return init_models(tmp_path_factory.mktemp("models"), size="tiny", seed=0)


def fake_plan(
    plans: Path,
    role: str,
    precision: str,
    *,
    onnx_sha256: str,
    tensorrt_version: str = TRT,
    gpu: cuda.GpuInfo = H100,
) -> PlanManifest:
    pm = PlanManifest(
        role=role,
        plan=f"{role}.{precision}.plan",
        plan_sha256="0" * 64,
        onnx=f"/models/{role}.onnx",
        onnx_sha256=onnx_sha256,
        precision=precision,
        tensorrt_version=tensorrt_version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        profile={"image": {"min": [1, 1, 64, 64], "opt": [16, 1, 64, 64], "max": [64, 1, 64, 64]}},
        inputs=[{"name": "image", "shape": [-1, 1, 64, 64], "dtype": "float32"}],
        outputs=[{"name": "logit", "shape": [-1, 1], "dtype": "float32"}],
    )
    plans.mkdir(parents=True, exist_ok=True)
    (plans / f"{role}.{precision}.json").write_text(json.dumps(pm.to_json()))
    return pm


def test_matching_plan_is_found_and_round_trips(tiny, tmp_path):
    clf = tiny.classifier
    want = fake_plan(tmp_path, "classifier", "fp16", onnx_sha256=clf.sha256)
    got = find_plan(tmp_path, clf, tensorrt_version=TRT, gpu=H100)
    assert got == want and got.max_batch == 64 and got.format == PLAN_FORMAT
    assert read_plan_manifest(tmp_path / "classifier.fp16.json") == want


def test_fastest_matching_plan_wins_unless_a_precision_is_asked(tiny, tmp_path):
    clf = tiny.classifier
    for p in ("fp32", "fp16"):
        fake_plan(tmp_path, "classifier", p, onnx_sha256=clf.sha256)
    fake_plan(tmp_path, "classifier", "int8", onnx_sha256="f" * 64)  # from another export
    assert find_plan(tmp_path, clf, tensorrt_version=TRT, gpu=H100).precision == "fp16"
    pm = find_plan(tmp_path, clf, tensorrt_version=TRT, gpu=H100, precision="fp32")
    assert pm.precision == "fp32"


def test_plans_of_another_export_the_manifest_lists_serve_it(tiny, tmp_path):
    """A release that ships INT8 lists its w8 export: fp16 plans built from that one serve."""
    clf = replace(tiny.classifier, variants={"w8": Variant(onnx="c.w8.onnx", sha256="e" * 64)})
    fake_plan(tmp_path, "classifier", "fp16", onnx_sha256="e" * 64)
    assert find_plan(tmp_path, clf, tensorrt_version=TRT, gpu=H100).precision == "fp16"
    with pytest.raises(ModelError, match="built from an ONNX with sha256 eeeeeeeeeeeeeeee"):
        find_plan(tmp_path, tiny.classifier, tensorrt_version=TRT, gpu=H100)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"onnx_sha256": "a" * 64}, "built from an ONNX with sha256 aaaaaaaaaaaaaaaa"),
        ({"tensorrt_version": "10.9.0.34"}, "built by TensorRT 10.9.0.34, this is TensorRT 10.13"),
        (
            {"gpu": cuda.GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")},
            "built on a NVIDIA A100-SXM4-80GB (compute capability 8.0), this GPU is a NVIDIA H100",
        ),
        ({"gpu": cuda.GpuInfo(H100.name, "9.1")}, "compute capability 9.1"),
    ],
)
def test_mismatched_plan_is_refused_with_rebuild_advice(tiny, tmp_path, change, expected):
    seg = tiny.segmenter
    plans = default_plans_dir(seg.directory)
    try:
        fake_plan(plans, "segmenter", "fp16", **{"onnx_sha256": seg.sha256, **change})
        with pytest.raises(ModelError) as err:
            find_plan(plans, seg, tensorrt_version=TRT, gpu=H100)
        msg = str(err.value)
        assert expected in msg
        assert "segmenter.fp16.json" in msg and str(seg.onnx_path) in msg
        assert f"rebuild the plans on this machine: `cxr build --models {seg.directory}`" in msg
    finally:
        for f in plans.glob("*"):
            f.unlink()
        plans.rmdir()


def test_plan_problems_lists_every_mismatch(tmp_path):
    pm = fake_plan(tmp_path, "classifier", "fp32", onnx_sha256="a" * 64)
    problems = plan_problems(
        pm,
        onnx_sha256="b" * 64,
        tensorrt_version="10.14.1.48",
        gpu=cuda.GpuInfo("NVIDIA L4", "8.9"),
    )
    assert len(problems) == 3
    assert not plan_problems(pm, onnx_sha256="a" * 64, tensorrt_version=TRT, gpu=H100)


def test_no_plan_says_to_build(tiny, tmp_path):
    with pytest.raises(
        ModelError, match=r"no TensorRT plan for the classifier; build the plans"
    ) as err:
        find_plan(tmp_path, tiny.classifier, tensorrt_version=TRT, gpu=H100)
    assert f"cxr build --models {tiny.classifier.directory} --out {tmp_path}" in str(err.value)


def test_unreadable_or_foreign_plan_manifest_is_a_model_error(tiny, tmp_path):
    (tmp_path / "classifier.fp16.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read this plan manifest"):
        find_plan(tmp_path, tiny.classifier, tensorrt_version=TRT, gpu=H100)
    pm = fake_plan(tmp_path, "classifier", "fp16", onnx_sha256=tiny.classifier.sha256)
    (tmp_path / "classifier.fp16.json").write_text(json.dumps({**pm.to_json(), "format": "x/9"}))
    with pytest.raises(ModelError, match="format 'x/9'"):
        find_plan(tmp_path, tiny.classifier, tensorrt_version=TRT, gpu=H100)


def test_auto_backend_stays_on_onnxruntime_without_a_usable_gpu(tiny):
    assert resolve_backend("auto") == "onnxruntime"
    assert resolve_backend("auto", models=tiny) == "onnxruntime"
    assert resolve_backend("tensorrt", models=tiny) == "tensorrt"
    plans = default_plans_dir(tiny.classifier.directory)
    try:
        for m in (tiny.segmenter, tiny.classifier):
            fake_plan(plans, m.role, "fp16", onnx_sha256=m.sha256)
        # plans exist, but this machine cannot run them (or they are for another GPU)
        expected = not missing_requirements() and plans_usable(tiny)
        assert resolve_backend("auto", models=tiny) == ("tensorrt" if expected else "onnxruntime")
    finally:
        for f in plans.glob("*"):
            f.unlink()
        plans.rmdir()
