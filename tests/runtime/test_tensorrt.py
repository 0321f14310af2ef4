"""engine.runtime.tensorrt (and `cxr build`): API names, refusals without a GPU, and (marked
``gpu``) real builds with parity against ONNX Runtime.

Without a GPU this still checks (a) that every TensorRT name our code uses exists in TensorRT
10.13's API (the ``tensorrt-stubs`` package) and (b) that `cxr build` and ``--backend tensorrt``
fail at once saying what is missing. The plan-manifest checks are in test_plans.py, the
cuda-python plumbing in test_cuda.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from gpu_utils import requires_cupy, requires_tensorrt

from engine.errors import BackendUnavailable, ModelError
from engine.models import ModelSet, Variant, init_models
from engine.runtime import cuda, resolve_backend
from engine.runtime.plans import (
    default_plans_dir,
    missing_requirements,
    read_plan_manifest,
)
from engine.runtime.tensorrt import TensorRTBackend

SCANNED = [
    REPO / "engine" / "runtime" / "tensorrt.py",
    REPO / "engine" / "runtime" / "plans.py",
    REPO / "engine" / "build.py",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelSet:
    return init_models(tmp_path_factory.mktemp("models"), size="tiny", seed=0)


# --------------------------------------------------------------------------- (a) API names

# Objects are recognised by the variable (or private ``self._<name>`` attribute) holding them; the
# code under test keeps to these names, and the test asserts that it found the calls it must.
OBJECT_CLASSES = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "config": "IBuilderConfig",
    "parser": "OnnxParser",
    "parser_error": "ParserError",
    "profile": "IOptimizationProfile",
    "tensor": "ITensor",
    "timing_cache": "ITimingCache",
    "serialized": "IHostMemory",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
}
MUST_USE = {
    ("module", "Builder"),
    ("module", "OnnxParser"),
    ("module", "Runtime"),
    ("module", "nptype"),
    ("module", "__version__"),
    ("BuilderFlag", "FP16"),
    ("MemoryPoolType", "WORKSPACE"),
    ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),
    ("TensorIOMode", "INPUT"),
    ("Builder", "create_network"),
    ("Builder", "create_builder_config"),
    ("Builder", "create_optimization_profile"),
    ("Builder", "build_serialized_network"),
    ("OnnxParser", "parse_from_file"),
    ("OnnxParser", "num_errors"),
    ("OnnxParser", "get_error"),
    ("ParserError", "desc"),
    ("IBuilderConfig", "set_memory_pool_limit"),
    ("IBuilderConfig", "set_flag"),
    ("IBuilderConfig", "add_optimization_profile"),
    ("IBuilderConfig", "create_timing_cache"),
    ("IBuilderConfig", "set_timing_cache"),
    ("ITimingCache", "serialize"),
    ("IOptimizationProfile", "set_shape"),
    ("INetworkDefinition", "num_inputs"),
    ("INetworkDefinition", "get_input"),
    ("Runtime", "deserialize_cuda_engine"),
    ("ICudaEngine", "num_io_tensors"),
    ("ICudaEngine", "get_tensor_name"),
    ("ICudaEngine", "get_tensor_mode"),
    ("ICudaEngine", "get_tensor_shape"),
    ("ICudaEngine", "get_tensor_dtype"),
    ("ICudaEngine", "create_execution_context"),
    ("IExecutionContext", "set_input_shape"),
    ("IExecutionContext", "set_tensor_address"),
    ("IExecutionContext", "execute_async_v3"),
}


def stub_files() -> tuple[Path, Path]:
    """(tensorrt/__init__.pyi, tensorrt_bindings/tensorrt.pyi) of the installed tensorrt-stubs."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    files = {str(f): Path(str(dist.locate_file(f))) for f in dist.files or []}
    init = files.get("tensorrt/__init__.pyi")
    classes = files.get("tensorrt_bindings/tensorrt.pyi")
    if init is None or classes is None:
        pytest.skip(f"tensorrt-stubs {dist.version} has an unexpected layout: {sorted(files)}")
    return init, classes


def stub_api() -> tuple[set[str], dict[str, set[str]], str]:
    """Module-level names, class -> members (inherited included), and the stubs' version.

    The class stub does not parse as Python (some signatures put a required parameter after
    defaulted ones), so classes are read line by line: ``class X(Base):`` then, indented by
    four spaces, ``def name``, ``name: ...`` (attributes, enum members) and ``name = ...``.
    """
    init, classes_pyi = stub_files()
    tree = ast.parse(init.read_text())
    module: set[str] = set()
    version = ""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            module.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            module.add(node.target.id)
            if node.target.id == "__version__" and isinstance(node.value, ast.Constant):
                version = str(node.value.value)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "__all__":
                    module.update(ast.literal_eval(node.value))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            module.add(node.name)
    members: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    current = None
    member = re.compile(r"^    (?:def (\w+)|(\w+)\s*[:=])")
    for line in classes_pyi.read_text().splitlines():
        if m := re.match(r"^class (\w+)(?:\(([^)]*)\))?:", line):
            current = m.group(1)
            members.setdefault(current, set())
            bases[current] = [b.strip().split(".")[-1] for b in (m.group(2) or "").split(",")]
        elif current and (m := member.match(line)):
            members[current].add(m.group(1) or m.group(2))
    for cls in list(members):  # fold in base classes (Logger(ILogger) ...)
        todo, seen = list(bases.get(cls, [])), set()
        while todo:
            base = todo.pop()
            if base in seen or base not in members:
                continue
            seen.add(base)
            members[cls] |= members[base]
            todo += bases.get(base, [])
    return module, members, version


def used_api(paths: list[Path]) -> set[tuple[str, str]]:
    """(owner, name) of every TensorRT name used: ("module", X) for trt.X, (X, Y) for trt.X.Y,
    (Class, method) for attributes of the objects named in OBJECT_CLASSES."""
    used: set[tuple[str, str]] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id == "trt":
                used.add(("module", node.attr))
            elif (
                isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and value.value.id == "trt"
            ):
                used.add((value.attr, node.attr))
            else:
                holder = None
                if isinstance(value, ast.Name):
                    holder = value.id
                elif (
                    isinstance(value, ast.Attribute)
                    and isinstance(value.value, ast.Name)
                    and value.value.id == "self"
                    and value.attr.startswith("_")
                ):
                    holder = value.attr[1:]
                if holder in OBJECT_CLASSES:
                    used.add((OBJECT_CLASSES[holder], node.attr))
    return used


def test_every_tensorrt_name_we_use_exists_in_tensorrt_10_13():
    module, members, version = stub_api()
    assert version.startswith("10."), f"stubs of TensorRT {version}, expected 10.x"
    used = used_api(SCANNED)
    missing_must = MUST_USE - used
    assert not missing_must, (
        f"the scan did not find these calls (renamed variables?): {missing_must}"
    )
    unknown = sorted(
        f"trt.{name}" if owner == "module" else f"{owner}.{name}"
        for owner, name in used
        if (owner == "module" and name not in module)
        or (owner != "module" and name not in members.get(owner, set()))
    )
    assert not unknown, f"not in TensorRT {version}'s API: {unknown}"


def test_the_api_scan_catches_a_wrong_name(tmp_path):
    module, members, _ = stub_api()
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(trt, context, engine):\n"
        "    context.execute_async_v2(0)\n"  # TensorRT 8 name, gone in 10
        "    engine.get_binding_shape(0)\n"
        "    trt.BuilderFlag.STRICT_TYPES\n"
    )
    used = used_api([bad])
    assert ("IExecutionContext", "execute_async_v2") in used
    assert "execute_async_v2" not in members["IExecutionContext"]
    assert "get_binding_shape" not in members["ICudaEngine"]
    assert "STRICT_TYPES" not in members["BuilderFlag"]
    assert "execute_async_v3" in members["IExecutionContext"]
    assert "WARNING" in members["Logger"]  # via ILogger.Severity members listed on Logger
    assert {"Builder", "Runtime", "OnnxParser", "nptype"} <= module


# --------------------------------------------------------------------------- (b) refusals


def no_gpu_stack() -> str | None:
    missing = missing_requirements()
    return None if missing else "this machine has a GPU, TensorRT and cuda-python"


def test_tensorrt_backend_without_gpu_refuses_at_once(tiny):
    if no_gpu_stack():
        pytest.skip(no_gpu_stack())
    with pytest.raises(BackendUnavailable) as err:
        TensorRTBackend(tiny.classifier).load()
    msg = str(err.value)
    assert "--backend tensorrt cannot run here: missing" in msg
    for item in missing_requirements():
        assert item in msg
    assert "pip install 'cxr-engine[gpu]'" in msg
    assert "tensorrt" not in sys.modules or hasattr(sys.modules["tensorrt"], "Builder")


def test_stubs_are_not_mistaken_for_tensorrt():
    # tensorrt-stubs installs a code-less `tensorrt` namespace package
    from engine.runtime.plans import _module_present

    try:
        importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed")
    real = importlib.util.find_spec("tensorrt")
    if real is not None and real.origin not in (None, "namespace"):
        pytest.skip("the real tensorrt is installed too")
    assert not _module_present("tensorrt")
    assert "the Python package tensorrt" in missing_requirements()


def _build_app():
    import typer

    from engine.build import build

    app = typer.Typer()
    app.command()(build)
    return app


def test_build_command_without_gpu_exits_1_naming_what_is_missing(tiny):
    if no_gpu_stack():
        pytest.skip(no_gpu_stack())
    from typer.testing import CliRunner

    result = CliRunner().invoke(_build_app(), ["--models", str(tiny.classifier.directory)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "cxr build cannot run here: missing" in text
    for item in missing_requirements():
        assert item in text
    assert "pip install 'cxr-engine[gpu]'" in text  # not eaten as a rich markup tag


def test_build_command_checks_its_options_first(tiny):
    from typer.testing import CliRunner

    runner = CliRunner()
    models = str(tiny.classifier.directory)
    for args, expected in (
        (["--precision", "fp8"], "--precision must be one of fp32, fp16, int8"),
        (["--opt-batch", "65"], "--opt-batch must be between 1 and --max-batch (64)"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
    ):
        result = runner.invoke(_build_app(), ["--models", models, *args])
        assert result.exit_code == 1 and expected in " ".join(result.stderr.split())


def test_build_engine_script_without_gpu(tiny):
    if no_gpu_stack():
        pytest.skip(no_gpu_stack())
    proc = subprocess.run(
        [sys.executable, str(REPO / "build_engine.py"), "--models", str(tiny.classifier.directory)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "cxr build cannot run here: missing" in " ".join(proc.stderr.split())


def test_cxr_build_when_registered(tiny, cli):
    from engine.cli import app

    names = {c.name or getattr(c.callback, "__name__", "") for c in app.registered_commands}
    if "build" not in names:
        pytest.skip("`cxr build` is not registered in engine/cli.py yet")
    if no_gpu_stack():
        pytest.skip(no_gpu_stack())
    code, _, err = cli(["build", "--models", tiny.classifier.directory])
    assert code == 1 and "cxr build cannot run here: missing" in " ".join(err.split())


# --------------------------------------------------------------------------- (c) on the GPU

FP16_PROB_ATOL = 1e-2
FP16_MIN_COSINE = 0.999
INT8_PROB_ATOL = 0.05  # untrained tiny model, per-tensor QDQ: a loose, stated bound
INT8_MIN_COSINE = 0.98


def _ort(manifest, x):
    from engine.runtime.onnxrt import OnnxRuntimeBackend

    with OnnxRuntimeBackend(manifest) as b:
        return b.infer({manifest.input.name: x})


def _cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64).reshape(-1)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tiny models with fp32 and fp16 plans (max batch 8, so batch 20 runs in chunks)."""
    from engine.build import BuildConfig, build_plans

    models = init_models(tmp_path_factory.mktemp("trt-models"), size="tiny", seed=0)
    directory = models.classifier.directory
    for precision in ("fp32", "fp16"):
        build_plans(BuildConfig(models=directory, precision=precision, max_batch=8, opt_batch=4))
    return models


@pytest.mark.gpu
@requires_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_onnxruntime(built, precision):
    rng = np.random.default_rng(0)
    x_seg = rng.normal(size=(20, 1, 64, 64)).astype(np.float32)
    x_clf = rng.normal(size=(20, 1, 64, 64)).astype(np.float32)
    with TensorRTBackend(built.segmenter, precision=precision) as seg:
        got = seg.infer({"image": x_seg})["mask_logit"]
    want = _ort(built.segmenter, x_seg)["mask_logit"]
    assert np.abs(got - want).max() <= (1e-3 if precision == "fp32" else 5e-2)
    with TensorRTBackend(built.classifier, precision=precision) as clf:
        out = clf.infer({"image": x_clf})
        assert clf.plan is not None and clf.plan.precision == precision
    ref = _ort(built.classifier, x_clf)
    assert np.abs(_sigmoid(out["logit"]) - _sigmoid(ref["logit"])).max() <= FP16_PROB_ATOL
    assert _cosine(out["embedding"], ref["embedding"]).min() >= FP16_MIN_COSINE


@pytest.mark.gpu
@requires_tensorrt
def test_plans_record_what_they_were_built_from_and_timing_cache_persists(built):
    plans = default_plans_dir(built.classifier.directory)
    pm = read_plan_manifest(plans / "classifier.fp16.json")
    import tensorrt as trt

    assert pm.onnx_sha256 == built.classifier.sha256 and pm.tensorrt_version == trt.__version__
    assert pm.gpu_name == cuda.device_info(0).name
    assert pm.profile["image"] == {
        "min": [1, 1, 64, 64],
        "opt": [4, 1, 64, 64],
        "max": [8, 1, 64, 64],
    }
    assert {t["name"] for t in pm.outputs} == {"logit", "embedding"}
    assert (plans / "timing.cache").stat().st_size > 0
    assert resolve_backend("auto", models=built) == "tensorrt"


@pytest.mark.gpu
@requires_tensorrt
def test_tampered_plan_manifest_is_refused_on_the_gpu(built, tmp_path):
    import shutil

    plans = tmp_path / "plans"
    shutil.copytree(default_plans_dir(built.classifier.directory), plans)
    path = plans / "classifier.fp16.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "onnx_sha256": "0" * 64}))
    (plans / "classifier.fp32.json").unlink()
    with pytest.raises(ModelError, match="rebuild the plans on this machine"):
        TensorRTBackend(built.classifier, plans_dir=plans).load()


@pytest.mark.gpu
@requires_tensorrt
@requires_cupy
def test_infer_device_matches_infer(built):
    import cupy as cp

    x = np.random.default_rng(1).normal(size=(8, 1, 64, 64)).astype(np.float32)
    with TensorRTBackend(built.classifier, precision="fp32") as clf:
        host = clf.infer({"image": x})
        d_x = cp.asarray(x)
        emb = cp.empty((8, 64), cp.float32)
        stream = cp.cuda.Stream()
        ptrs = clf.infer_device(
            {"image": d_x.data.ptr}, 8, outputs={"embedding": emb.data.ptr}, stream=stream.ptr
        )
        stream.synchronize()
        assert ptrs["embedding"] == emb.data.ptr
        np.testing.assert_allclose(cp.asnumpy(emb), host["embedding"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_tensorrt
def test_int8_plan_from_symmetric_qdq_export(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from engine.build import BuildConfig, build_plans
    from engine.models import load_manifest, save_manifest, sha256_file

    models = init_models(tmp_path / "m", size="tiny", seed=0)
    clf = models.classifier
    calib = np.random.default_rng(2).normal(size=(32, 1, 64, 64)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": calib[i : i + 8]} for i in range(0, 32, 8)])

        def get_next(self):
            return next(self.it, None)

    int8 = clf.directory / "classifier.int8.onnx"
    quantize_static(
        str(clf.onnx_path),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    m = load_manifest(clf.directory / "classifier.json", verify=False)

    save_manifest(
        replace(m, variants={"int8": Variant(onnx=int8.name, sha256=sha256_file(int8))}),
        clf.directory,
    )
    plans = build_plans(
        BuildConfig(models=clf.directory, precision="int8", max_batch=8, opt_batch=8)
    )
    by_role = {p.role: p for p in plans}
    assert by_role["classifier"].precision == "int8" and by_role["classifier"].strongly_typed
    assert by_role["segmenter"].precision == "fp16"  # no INT8 export of the segmenter
    from engine.models import choose_precision

    int8_manifest = choose_precision(load_manifest(clf.directory / "classifier.json"), "int8")
    x = calib[:8]
    with TensorRTBackend(int8_manifest) as b:
        out = b.infer({"image": x})
    ref = _ort(clf, x)
    assert np.abs(_sigmoid(out["logit"]) - _sigmoid(ref["logit"])).max() <= INT8_PROB_ATOL
    assert _cosine(out["embedding"], ref["embedding"]).min() >= INT8_MIN_COSINE


@pytest.mark.gpu
@requires_tensorrt
def test_gpu_stages_match_the_same_plans_with_reference_kernels(built):
    """GpuStages (masks never leave the device) == TensorRT plans + kernels.reference on host."""
    from engine.stages.crop import lung_crops
    from engine.stages.gpu import GpuStages

    rng = np.random.default_rng(5)
    work = rng.uniform(0, 1, (11, 128, 128)).astype(np.float32)
    seg_input = rng.normal(size=(11, 1, 64, 64)).astype(np.float32)
    with (
        TensorRTBackend(built.segmenter, precision="fp32") as seg,
        TensorRTBackend(built.classifier, precision="fp32") as clf,
    ):
        masks = seg.infer({"image": seg_input})["mask_logit"][:, 0]
        crops = lung_crops(work, masks, built.segmenter, built.classifier)
        want = clf.infer({"image": crops.classifier_input})
        stages = GpuStages(built, seg, clf)  # max batch 8: 11 images run in two chunks
        try:
            got = stages.infer(work, seg_input)
        finally:
            stages.close()
    np.testing.assert_array_equal(got.boxes, crops.boxes)
    np.testing.assert_array_equal(got.fraction, crops.fraction)
    np.testing.assert_array_equal(got.lung_mask, masks >= 0.0)  # threshold 0.5 = logit 0
    np.testing.assert_allclose(got.embedding, want["embedding"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.prob, _sigmoid(want["logit"]), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@requires_tensorrt
def test_gpu_stages_consume_dalis_device_output(built):
    """DALI (device="gpu") -> DeviceBatch -> stage (device to device) -> plans: the same
    predictions as the host round trip, and the work images come back for the previews."""
    import io

    from PIL import Image

    from engine.pipeline import DeviceBatch, Preprocessor, Sample
    from engine.stages.gpu import GpuStages

    rng = np.random.default_rng(6)
    samples = []
    for _ in range(11):
        img = (rng.uniform(0, 1, (90, 120)) * np.linspace(40, 255, 120)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, format="PNG")
        samples.append(Sample(encoded=np.frombuffer(buf.getvalue(), np.uint8)))
    pipe = Preprocessor(built, device="gpu", batch_size=16, threads=2)
    with (
        TensorRTBackend(built.segmenter, precision="fp32") as seg,
        TensorRTBackend(built.classifier, precision="fp32") as clf,
    ):
        stages = GpuStages(built, seg, clf)
        try:
            host = pipe.run(samples)
            want = stages.infer(host.work, host.seg_input)
            batch = pipe.run_device(samples, cuda_stream=stages.ingest_stream)
            assert isinstance(batch, DeviceBatch), "DALI's GPU output was not dense"
            staged = stages.stage(batch)
            pipe.run_device(samples[:3], cuda_stream=stages.ingest_stream)  # DALI reuses
            got = stages.infer(staged)
        finally:
            stages.close()
    assert got.work is not None
    np.testing.assert_array_equal(got.work, host.work)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.lung_mask, want.lung_mask)
    np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.prob, want.prob, rtol=1e-6, atol=1e-7)
