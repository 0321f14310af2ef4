"""`cxr build`: compile the segmenter and classifier ONNX into TensorRT plans for this GPU.

Per model: explicit-batch network from TensorRT's ONNX parser (every parser error collected
and reported together, naming the file), one optimization profile over the batch (min 1,
opt, max), a workspace limit, a persistent timing cache (loaded if present, saved after each
plan), and the precision:

- fp32: TensorRT's default;
- fp16: BuilderFlag.FP16 (a TensorRT 10 "weak typing" flag; TensorRT 11 removed it);
- int8: the model's explicitly quantized QDQ export (the manifest's ``int8`` variant) in a
  strongly typed network, with no precision flags, as TensorRT's "Explicit Quantization" docs
  advise ("Use explicit quantization with Strong Typing. Precision-control build flags are not
  required and should not be specified.", docs.nvidia.com/deeplearning/tensorrt/latest/
  inference-library/quantized-types-explicit-quantization.html). TensorRT needs symmetric
  quantization (zero points 0), which build checks first. A model without an INT8 export is
  built FP16.

Timing cache: "Optimizing Builder Performance / Timing Cache" in the TensorRT docs
(create_timing_cache from the saved bytes, set_timing_cache, serialize after the build).

Each plan gets a ``PlanManifest`` sidecar (engine/runtime/plans.py): sha256 of its ONNX and
of the plan, TensorRT version, GPU name and compute capability, precision, profile shapes,
tensor names; the TensorRT backend refuses a plan whose record does not match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.console import config_from_options, fatal_errors, out_console
from engine.errors import BackendUnavailable, ConfigError, EngineError, ModelError
from engine.io.atomic import write_atomically
from engine.models import (
    FLOAT_COMPUTE,
    Manifest,
    TensorSpec,
    choose_precision,
    load_manifest,
    sha256_file,
)
from engine.runtime import cuda
from engine.runtime.plans import (
    GPU_EXTRA_HINT,
    PLAN_PRECISIONS,
    PlanManifest,
    default_plans_dir,
    import_tensorrt,
    missing_requirements,
    plan_stem,
    sha256_bytes,
    trt_logger,
)

DEFAULT_PRECISION = "fp16"
DEFAULT_MAX_BATCH = 64
DEFAULT_OPT_BATCH = 16
DEFAULT_WORKSPACE_MIB = 4096
TIMING_CACHE_NAME = "timing.cache"
ROLES = ("segmenter", "classifier")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    models: Path
    precision: str = DEFAULT_PRECISION
    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH
    out: Path | None = None  # default: <models>/plans
    timing_cache: Path | None = None  # default: <out>/timing.cache
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    device: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PLAN_PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PLAN_PRECISIONS)}, not {self.precision!r}"
            )
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, not {self.max_batch}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"--opt-batch must be between 1 and --max-batch ({self.max_batch}), "
                f"not {self.opt_batch}"
            )
        if self.workspace_mib < 1:
            raise ConfigError(f"--workspace-mib must be positive, not {self.workspace_mib}")

    @property
    def plans_dir(self) -> Path:
        return Path(self.out) if self.out else default_plans_dir(self.models)

    @property
    def timing_cache_path(self) -> Path:
        return Path(self.timing_cache) if self.timing_cache else self.plans_dir / TIMING_CACHE_NAME


@dataclass(frozen=True, kw_only=True)
class Target:
    """One plan to build: the model (pointing at the ONNX to compile) and the plan precision."""

    manifest: Manifest
    precision: str
    note: str = ""

    @property
    def strongly_typed(self) -> bool:
        return self.precision == "int8"


# --------------------------------------------------------------------------- pure helpers


def build_targets(models_dir: Path, precision: str) -> list[Target]:
    """Which ONNX each model compiles from at this precision; checks each ONNX's sha256."""
    targets = []
    for role in ROLES:
        m = load_manifest(Path(models_dir) / f"{role}.json", verify=False)
        note = ""
        plan_precision = precision
        if precision == "int8":
            if m.precision == "int8" or "int8" in m.variants:
                m = choose_precision(m, "int8")
            else:
                plan_precision = "fp16"
                note = f"the {role} has no INT8 (QDQ) export: built FP16"
        elif m.precision != "fp32":
            m = float_export(m)
        actual = sha256_file(m.onnx_path) if m.onnx_path.is_file() else None
        if actual is None:
            raise ModelError(f"{m.onnx_path}: ONNX file named by {role}.json is missing")
        if actual != m.sha256:
            raise ModelError(
                f"{m.onnx_path}: sha256 {actual[:16]}... does not match {role}.json "
                f"({m.sha256[:16]}...); restore the file or re-export the model"
            )
        targets.append(Target(manifest=m, precision=plan_precision, note=note))
    return targets


def profile_shapes(
    spec: TensorSpec, network_shape: tuple[int, ...], *, max_batch: int, opt_batch: int
) -> dict[str, list[int]]:
    """min/opt/max shapes of one input: the batch varies, every other dimension is fixed.

    Dimensions the ONNX leaves dynamic (-1) besides the batch are taken from the manifest.
    """
    if len(network_shape) != len(spec.shape):
        raise ModelError(
            f"input {spec.name!r} has shape {network_shape} in the ONNX, {spec.shape} in the manifest"
        )
    rest = []
    for got, want in zip(network_shape[1:], spec.shape[1:], strict=True):
        if got >= 0:
            rest.append(int(got))
        elif isinstance(want, int):
            rest.append(want)
        else:
            raise ModelError(f"input {spec.name!r}: dimension {want!r} is dynamic; only N may be")
    return {"min": [1, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}


def format_parser_errors(onnx_path: Path, parser: Any) -> str:
    """All of the ONNX parser's errors (parser.num_errors / get_error(i)) in one message."""
    lines = []
    for i in range(parser.num_errors):
        parser_error = parser.get_error(i)  # a ParserError: code, desc, node, node_name, ...
        where = ""
        if parser_error.node() >= 0:
            op, name = parser_error.node_operator(), parser_error.node_name()
            where = f"node {parser_error.node()}" + (f" ({op} {name!r})" if op or name else "")
            where += ": "
        code = parser_error.code()
        lines.append(f"  {i + 1}. {where}{parser_error.desc()} [{getattr(code, 'name', code)}]")
    count = parser.num_errors
    return (
        f"{onnx_path}: TensorRT's ONNX parser reported {count} error{'s' if count != 1 else ''}:\n"
        + "\n".join(lines)
    )


def float_export(m: Manifest) -> Manifest:
    """The export fp32/fp16 plans build from: FP32 where it ships, else the FP32 weights stored
    as float16 or INT8 (w8), never the QDQ export (its activations are quantized)."""
    for precision in FLOAT_COMPUTE:
        if precision == m.precision or precision in m.variants:
            return choose_precision(m, precision)
    raise ModelError(
        f"{m.directory / (m.role + '.json')}: only its {m.precision} export ships, and float "
        "plans need the FP32 weights (fp32, fp16 or w8 export): pass --models a `cxr train` "
        "directory, or re-pack with `python -m engine.eval.release` (it adds a w8 export)"
    )


def parse_source(m: Manifest, plans_dir: Path) -> Path:
    """The ONNX file TensorRT parses for this manifest: the export itself, or for INT8-stored
    weights (w8) a copy with the weights folded to float32 in plans_dir, so that a float plan
    parses plain float weights and no DequantizeLinear (which TensorRT would treat as
    quantization of the network, not as storage)."""
    if m.precision != "w8":
        return m.onnx_path
    import onnx

    from engine.models import float_weights

    path = Path(plans_dir) / f"{m.onnx_path.stem}.float32.onnx"
    model = float_weights(onnx.load(str(m.onnx_path)))
    _atomic_write(path, model.SerializeToString())
    return path


def qdq_problems(onnx_path: Path) -> list[str]:
    """Why TensorRT would reject this QDQ model: it needs symmetric INT8 (zero points 0)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None:
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype.kind == "u" or (arr != 0).any():
            problems.append(
                f"{node.op_type} {node.name!r}: zero point {arr.dtype} {arr.ravel()[:4]}"
            )
    return problems


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """A plan, its manifest or the timing cache, whole or not at all (engine/io/atomic.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, bytes(data), what="a TensorRT build output")


# --------------------------------------------------------------------------- building


def build_plans(options: BuildConfig) -> list[PlanManifest]:
    """Build one plan per model into options.plans_dir; returns their manifests."""
    missing = missing_requirements()
    if missing:
        raise BackendUnavailable(
            f"cxr build cannot run here: missing {', '.join(missing)}. Plans are built on the "
            f"GPU that will run them: {GPU_EXTRA_HINT}"
        )
    targets = build_targets(options.models, options.precision)
    for t in targets:
        if t.strongly_typed and (bad := qdq_problems(t.manifest.onnx_path)):
            raise ModelError(
                f"{t.manifest.onnx_path}: TensorRT needs symmetric INT8 quantization (int8 zero "
                f"points of 0), but {len(bad)} Q/DQ nodes of this export have others, e.g. "
                f"{'; '.join(bad[:2])}. Re-export it symmetric (onnxruntime quantize_static: "
                "extra_options ActivationSymmetric=True, WeightSymmetric=True)"
            )
    trt = import_tensorrt(builder=True)
    cuda.use_device(options.device)
    gpu = cuda.device_info(options.device)
    builder = trt.Builder(trt_logger(trt))
    cache_path = options.timing_cache_path
    timing_cache = None
    built = []
    for t in targets:
        pm, timing_cache = _build_one(trt, builder, t, options, gpu, timing_cache)
        built.append(pm)
        # saved after every plan, so a failure in the next one keeps what was timed
        _atomic_write(cache_path, memoryview(timing_cache.serialize()))
    return built


def _build_one(
    trt: Any,
    builder: Any,
    target: Target,
    options: BuildConfig,
    gpu: cuda.GpuInfo,
    timing_cache: Any,
) -> tuple[PlanManifest, Any]:
    # Variable names matter here: tests/runtime/test_tensorrt.py checks every method called on
    # `builder`, `network`, `config`, `parser`, `profile`, `tensor`, `timing_cache`, ...
    # against TensorRT's API stubs.
    m = target.manifest
    flags = 0
    if target.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, trt_logger(trt))
    # parse_from_file resolves external weights next to the ONNX file
    source = parse_source(m, options.plans_dir)
    if not parser.parse_from_file(str(source)):
        raise ModelError(format_parser_errors(source, parser))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if target.precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ConfigError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (removed in TensorRT 11): "
                "use --precision fp32 or int8, or install TensorRT 10"
            )
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    shapes: dict[str, dict[str, list[int]]] = {}
    specs = {s.name: s for s in m.inputs}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        spec = specs.get(tensor.name)
        if spec is None:
            raise ModelError(
                f"{m.onnx_path}: input {tensor.name!r} is not in {m.role}.json "
                f"(inputs {sorted(specs)})"
            )
        s = profile_shapes(
            spec, tuple(tensor.shape), max_batch=options.max_batch, opt_batch=options.opt_batch
        )
        profile.set_shape(tensor.name, s["min"], s["opt"], s["max"])
        shapes[tensor.name] = s
    config.add_optimization_profile(profile)

    # "Optimizing Builder Performance / Timing Cache": create_timing_cache from the saved
    # bytes, attach with set_timing_cache, serialize after the build. One cache serves both
    # models. ignore_mismatch=False: a cache from another GPU/TensorRT is refused (returns
    # False), and then an empty one is used instead.
    if timing_cache is None:
        timing_cache = _load_timing_cache(config, options.timing_cache_path)
    if not config.set_timing_cache(timing_cache, False):
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"{m.onnx_path}: TensorRT could not build a {target.precision} plan for this GPU "
            "(see TensorRT's messages above)"
        )
    plans_dir = options.plans_dir
    stem = plan_stem(m.role, target.precision)
    plan_bytes = memoryview(serialized)
    _atomic_write(plans_dir / f"{stem}.plan", plan_bytes)
    pm = PlanManifest(
        role=m.role,
        plan=f"{stem}.plan",
        plan_sha256=sha256_bytes(plan_bytes),
        onnx=str(m.onnx_path.resolve()),
        onnx_sha256=m.sha256,
        precision=target.precision,
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        profile=shapes,
        inputs=[_tensor_json(trt, network.get_input(i)) for i in range(network.num_inputs)],
        outputs=[_tensor_json(trt, network.get_output(i)) for i in range(network.num_outputs)],
        strongly_typed=target.strongly_typed,
        built_at=datetime.now(UTC).isoformat(),
        builder={
            "max_batch": options.max_batch,
            "opt_batch": options.opt_batch,
            "workspace_mib": options.workspace_mib,
            "onnx_precision": m.precision,
            "note": target.note,
        },
    )
    _atomic_write(plans_dir / f"{stem}.json", (json.dumps(pm.to_json(), indent=2) + "\n").encode())
    return pm, timing_cache


def _tensor_json(trt: Any, tensor: Any) -> dict[str, Any]:
    import numpy as np

    return {
        "name": tensor.name,
        "shape": [int(d) for d in tensor.shape],
        "dtype": np.dtype(trt.nptype(tensor.dtype)).name,
    }


def _load_timing_cache(config: Any, path: Path) -> Any:
    """The timing cache saved at path (IBuilderConfig.create_timing_cache), or an empty one."""
    data = path.read_bytes() if path.is_file() else b""
    timing_cache = config.create_timing_cache(data)
    if timing_cache is None and data:  # unreadable: start afresh
        timing_cache = config.create_timing_cache(b"")
    return timing_cache


# --------------------------------------------------------------------------- the command


def build(
    ctx: typer.Context,
    models: Annotated[
        Path, typer.Option("--models", help="Models directory (segmenter.json, classifier.json).")
    ],
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 | fp16 | int8 (int8: the models' QDQ exports, strongly typed; a model "
            "without one is built fp16)."
        ),
    ] = DEFAULT_PRECISION,
    max_batch: Annotated[int, typer.Option(help="Largest batch the plans accept.")] = (
        DEFAULT_MAX_BATCH
    ),
    opt_batch: Annotated[int, typer.Option(help="Batch size TensorRT tunes for.")] = (
        DEFAULT_OPT_BATCH
    ),
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", metavar="DIR", help="Plans directory (default: MODELS/plans)."),
    ] = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option(
            help="Timing cache, loaded if present, saved after (default: OUT/timing.cache)."
        ),
    ] = None,
    workspace_mib: Annotated[
        int, typer.Option(help="TensorRT workspace memory limit in MiB.")
    ] = DEFAULT_WORKSPACE_MIB,
) -> None:
    """Compile the segmenter and classifier ONNX into TensorRT plans for this GPU."""
    from engine.config import output_path

    with fatal_errors():
        out_dir = None if out is None else output_path(out)
        options = config_from_options(BuildConfig, ctx, out=out_dir)
        plans = build_plans(options)
    for pm in plans:
        note = pm.builder.get("note")
        out_console.print(
            f"{pm.role:10s} {pm.precision:5s} {options.plans_dir / pm.plan}  "
            f"(TensorRT {pm.tensorrt_version}, {pm.gpu_name}, batch 1..{pm.max_batch})"
            + (f"  [yellow]{note}[/]" if note else ""),
            highlight=False,
        )
    out_console.print(f"timing cache: {options.timing_cache_path}", highlight=False)


def main() -> None:
    """Entry point of build_engine.py: the same command as `cxr build`."""
    typer.run(build)
