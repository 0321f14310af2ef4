"""Model manifests: every model is an ONNX file plus a sidecar JSON that says how to feed it.

The pipeline reads input size, channels, mean/std, intensity normalisation, crop margin,
thresholds and tensor names from here; nothing downstream hard-codes them. The manifest
records the sha256 of its ONNX file, and loading refuses a mismatch.

A models directory holds ``segmenter.json`` and ``classifier.json`` (each naming its ONNX).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from engine.cpu import INT8_FLAGS, CpuInfo, this_cpu
from engine.errors import ModelError

MANIFEST_FORMAT = "cxr-engine-model/1"
ROLES: tuple[Literal["segmenter", "classifier"], ...] = ("segmenter", "classifier")
Role = Literal["segmenter", "classifier"]
INTENSITY_MODES = ("minmax", "fullrange")

# Where trained default models ship inside the package (filled by `cxr train`, issue 3).
PACKAGED_MODELS = Path(__file__).with_name("models")


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # "N" marks the dynamic batch dimension
    dtype: str = "float32"


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How to turn a decoded grayscale image into this network's input."""

    size: tuple[int, int]  # (height, width) of the network input
    channels: int  # gray is replicated into this many channels
    mean: tuple[float, ...]  # per channel, on the [0, 1] intensity scale
    std: tuple[float, ...]
    # "minmax": stretch each image to its own [min, max] (robust to 12-bit data in 16-bit
    # PNGs and to exposure); "fullrange": divide by the bit depth's maximum.
    intensity: str = "minmax"


@dataclass(frozen=True, kw_only=True)
class CropSpec:
    """Classifier only: how the lung crop is cut before the classifier sees it."""

    source_size: int  # side of the square working image the crop is cut from
    margin: float  # fraction of the lung box size added on every side


@dataclass(frozen=True, kw_only=True)
class Variant:
    """Another export of the same model (e.g. INT8 QDQ) and its measured parity with `onnx`."""

    onnx: str
    sha256: str
    parity: dict[str, Any] = field(default_factory=dict)


# A variant is used by precision "auto" only if it agrees with the reference this well
# (ARCHITECTURE.md habit 2; the same bar as the throughput issue's parity rule).
AUTO_MIN_SAME_DECISION = 0.99
AUTO_MAX_AUC_DIFF = 0.01
SEG_MIN_BOX_IOU = 0.95  # a segmenter export's lung box against the FP32 one, on every image
SEG_MAX_DICE_DROP = 0.005
# fp16 / w8: the FP32 model's weights stored as float16 / per-channel INT8, computed in float32
# (what TensorRT's float plans build from when no FP32 export ships); int8: the QDQ export.
PRECISIONS = ("auto", "fp32", "fp16", "w8", "int8")
FLOAT_COMPUTE = ("fp32", "fp16", "w8")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    role: Role
    architecture: str
    onnx: str  # file name, relative to the manifest's directory
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: Preprocess
    threshold: float  # classifier: decision threshold on prob; segmenter: on the mask prob
    trained: bool
    crop: CropSpec | None = None
    card: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # of `onnx`
    variants: dict[str, Variant] = field(default_factory=dict)  # precision -> other export
    format: str = MANIFEST_FORMAT
    directory: Path = Path(".")

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.onnx

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise ModelError(f"{self.directory / (self.role + '.json')}: no output named {name!r}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory")
        return d


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_path(models_dir: Path, role: Role) -> Path:
    return Path(models_dir) / f"{role}.json"


def _tensors(raw: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name=t["name"], shape=tuple(t["shape"]), dtype=t.get("dtype", "float32"))
        for t in raw
    )


def parse_manifest(raw: dict[str, Any], directory: Path) -> Manifest:
    """Build a Manifest from its JSON form; raises KeyError/TypeError/ValueError on bad shape."""
    pre = raw["preprocess"]
    crop = raw.get("crop")
    return Manifest(
        format=raw.get("format", MANIFEST_FORMAT),
        role=raw["role"],
        architecture=raw["architecture"],
        onnx=raw["onnx"],
        sha256=raw["sha256"],
        inputs=_tensors(raw["inputs"]),
        outputs=_tensors(raw["outputs"]),
        preprocess=Preprocess(
            size=(int(pre["size"][0]), int(pre["size"][1])),
            channels=int(pre["channels"]),
            mean=tuple(float(m) for m in pre["mean"]),
            std=tuple(float(s) for s in pre["std"]),
            intensity=pre.get("intensity", "minmax"),
        ),
        threshold=float(raw["threshold"]),
        trained=bool(raw["trained"]),
        crop=CropSpec(source_size=int(crop["source_size"]), margin=float(crop["margin"]))
        if crop
        else None,
        card=dict(raw.get("card") or {}),
        precision=raw.get("precision", "fp32"),
        variants={
            name: Variant(onnx=v["onnx"], sha256=v["sha256"], parity=dict(v.get("parity") or {}))
            for name, v in (raw.get("variants") or {}).items()
        },
        directory=directory,
    )


def _validate(m: Manifest, where: Path) -> None:
    problems = []
    if m.format != MANIFEST_FORMAT:
        problems.append(f"format is {m.format!r}, this engine reads {MANIFEST_FORMAT!r}")
    if m.role not in ROLES:
        problems.append(f"role is {m.role!r}, expected one of {ROLES}")
    p = m.preprocess
    if len(p.mean) != p.channels or len(p.std) != p.channels:
        problems.append("preprocess.mean and .std need one value per channel")
    if any(s <= 0 for s in p.std):
        problems.append("preprocess.std must be positive")
    if p.intensity not in INTENSITY_MODES:
        problems.append(f"preprocess.intensity {p.intensity!r} is not one of {INTENSITY_MODES}")
    if not m.inputs or tuple(m.input.shape[1:]) != (p.channels, *p.size):
        problems.append("inputs[0].shape must be [N, channels, height, width] of preprocess")
    if m.role == "classifier":
        names = {o.name for o in m.outputs}
        if not {"logit", "embedding"} <= names:
            problems.append("a classifier needs outputs named 'logit' and 'embedding'")
        if m.crop is None:
            problems.append("a classifier needs a 'crop' section (source_size, margin)")
    if not 0.0 <= m.threshold <= 1.0:
        problems.append(f"threshold {m.threshold} is not a probability")
    if problems:
        raise ModelError(f"{where}: invalid manifest: " + "; ".join(problems))


def load_manifest(path: Path, *, verify: bool = True) -> Manifest:
    """Read and check one manifest; with verify, also check the ONNX file's sha256."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        m = parse_manifest(raw, path.parent)
    except FileNotFoundError:
        raise ModelError(f"{path}: model manifest not found") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelError(
            f"{path}: cannot read model manifest ({type(exc).__name__}: {exc})"
        ) from None
    _validate(m, path)
    return _verify_onnx(m, path) if verify else m


def _at(m: Manifest, precision: str) -> Manifest:
    if precision not in ("auto", "fp32") and precision not in (m.precision, *m.variants):
        return m
    return choose_precision(m, precision)


def _verify_onnx(m: Manifest, path: Path) -> Manifest:
    """Check that the ONNX file the manifest points at exists and has its sha256."""
    if not m.onnx_path.is_file():
        raise ModelError(f"{m.onnx_path}: ONNX file named by {path.name} is missing")
    actual = sha256_file(m.onnx_path)
    if actual != m.sha256:
        raise ModelError(
            f"{m.onnx_path}: sha256 {actual[:16]}... does not match {path.name} "
            f"({m.sha256[:16]}...); the file is corrupt or was replaced: restore it or "
            "re-export the model"
        )
    return m


def save_manifest(m: Manifest, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = manifest_path(directory, m.role)
    _atomic_write_text(path, json.dumps(m.to_json(), indent=2) + "\n")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True, kw_only=True)
class ModelSet:
    segmenter: Manifest
    classifier: Manifest
    # role -> why that export runs (why_precision), filled by load_models
    precision_why: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def model_id(self) -> str:
        s, c = self.segmenter, self.classifier
        return (
            f"{c.architecture}-{c.precision}@{c.sha256[:8]}"
            f"+{s.architecture}-{s.precision}@{s.sha256[:8]}"
        )

    @property
    def trained(self) -> bool:
        return self.segmenter.trained and self.classifier.trained

    def with_threshold(self, threshold: float | None) -> ModelSet:
        if threshold is None:
            return self
        return replace(self, classifier=replace(self.classifier, threshold=threshold))


def choose_precision(m: Manifest, precision: str, cpu: CpuInfo | None = None) -> Manifest:
    """The manifest re-pointed at the export of the wanted precision.

    "auto" takes the INT8 variant only where its recorded parity meets the bar above AND the
    CPU has an 8-bit dot-product instruction (VNNI/AMX; elsewhere INT8 runs slower than float),
    else the reference export. `why_precision` says which rule decided.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        int8 = m.variants.get("int8")
        if m.precision == "int8" or int8 is None or not _parity_ok(int8.parity):
            return m
        if not (cpu or this_cpu()).int8_fast:
            return m
        precision = "int8"
    if precision == m.precision:
        return m
    v = m.variants.get(precision)
    if v is None:
        have = sorted({m.precision, *m.variants})
        raise ModelError(
            f"{m.directory / (m.role + '.json')}: no {precision} export of the {m.role} "
            f"(available: {', '.join(have)})"
        )
    return replace(m, onnx=v.onnx, sha256=v.sha256, precision=precision, variants={})


def _why(raw: Manifest, chosen: Manifest, precision: str) -> str:
    if precision == "auto":
        return why_precision(raw, "auto")
    if chosen.precision == precision:
        return f"{precision}: asked for with --precision {precision}"
    return f"{chosen.precision}: the {raw.role} has no {precision} export (--precision {precision})"


def why_precision(m: Manifest, precision: str, cpu: CpuInfo | None = None) -> str:
    """One sentence: why `choose_precision(m, precision, cpu)` runs the export it runs."""
    chosen = choose_precision(m, precision, cpu).precision
    if precision != "auto":
        return f"{chosen}: asked for with --precision {precision}"
    int8 = m.variants.get("int8")
    if m.precision == "int8":
        return "int8: the model's only export"
    if int8 is None:
        return f"{chosen}: the model has no INT8 export"
    if not _parity_ok(int8.parity):
        return f"{chosen}: its INT8 export does not meet the parity bar"
    cpu = cpu or this_cpu()
    if chosen == "int8":
        return f"int8: parity bar met and the CPU has {', '.join(sorted(cpu.flags & INT8_FLAGS))}"
    return f"{chosen}: the CPU has no VNNI/AMX (INT8 would run slower than float here)"


def meets_parity_bar(same_decision: float, roc_auc_diff: float | None) -> bool:
    """The parity bar of a faster export against FP32; a None AUC diff (no labels of both
    classes) is judged on decisions alone."""
    return same_decision >= AUTO_MIN_SAME_DECISION and (
        roc_auc_diff is None or abs(roc_auc_diff) <= AUTO_MAX_AUC_DIFF
    )


def segmenter_parity_ok(parity: dict[str, Any]) -> bool:
    """A segmenter export's bar (engine/train/segmenter_int8.py measures it): the lung box's
    IoU with the FP32 box on every labelled image, and the Dice drop on held-out masks."""
    try:
        return (
            float(parity["box_iou_min"]) >= SEG_MIN_BOX_IOU
            and float(parity["dice_drop"]) <= SEG_MAX_DICE_DROP
        )
    except (KeyError, TypeError, ValueError):
        return False


def _parity_ok(parity: dict[str, Any]) -> bool:
    """`--precision auto` takes a variant only with its numbers recorded and within the bar
    (a classifier's decisions and ROC AUC, a segmenter's boxes and Dice)."""
    if "box_iou_min" in parity:
        return segmenter_parity_ok(parity)
    try:
        same = float(parity["same_decision"])
        auc_diff = float(parity["roc_auc_diff"])
    except (KeyError, TypeError, ValueError):
        return False
    return meets_parity_bar(same, auc_diff)


def load_models(models_dir: Path | None, *, precision: str = "auto") -> ModelSet:
    """Load the segmenter and classifier manifests of a models directory (default: packaged)."""
    directory = Path(models_dir) if models_dir is not None else PACKAGED_MODELS
    if models_dir is None and not manifest_path(directory, "classifier").is_file():
        raise ModelError(
            "no models given and no trained default models are installed in "
            f"{directory}. Export the (untrained) architectures with "
            "`cxr models init --out models` and pass `--models models`; trained default "
            "models ship with the package once `cxr train` has produced them."
        )
    if not directory.is_dir():
        raise ModelError(f"{directory}: models directory not found")
    raw = {role: load_manifest(manifest_path(directory, role), verify=False) for role in ROLES}
    # An explicit precision applies to every model exported at it; the others keep their
    # reference export (today only the classifier has an INT8 variant).
    explicit = precision not in ("auto", "fp32")
    if explicit and not any(precision in (m.precision, *m.variants) for m in raw.values()):
        choose_precision(raw["classifier"], precision)  # raises, listing what exists
    seg = _verify_onnx(_at(raw["segmenter"], precision), manifest_path(directory, "segmenter"))
    clf = _verify_onnx(_at(raw["classifier"], precision), manifest_path(directory, "classifier"))
    roles: tuple[tuple[Manifest, Role], ...] = ((seg, "segmenter"), (clf, "classifier"))
    for m, role in roles:
        if m.role != role:  # a manifest copied under the other role's name
            raise ModelError(f"{manifest_path(directory, role)}: role is {m.role!r}, not {role!r}")
    why: dict[str, str] = {role: _why(raw[role], m, precision) for m, role in roles}
    return ModelSet(segmenter=seg, classifier=clf, precision_why=why)


# Preprocessing of the architectures `cxr models init` exports. Trained models record their own.
def _gray(n: int) -> Preprocess:
    return Preprocess(size=(n, n), channels=1, mean=(0.5,), std=(0.25,), intensity="minmax")


INIT_SPECS: dict[str, dict[str, Any]] = {
    "full": {
        "segmenter": {"architecture": "unet", "size": 256},
        "classifier": {
            "architecture": "resnet50",
            "size": 224,
            "source_size": 512,
            "embedding_dim": 2048,
        },
    },
    "tiny": {
        "segmenter": {"architecture": "tiny-unet", "size": 64},
        "classifier": {
            "architecture": "tiny-classifier",
            "size": 64,
            "source_size": 128,
            "embedding_dim": 64,
        },
    },
}


def export_model(model: Any, directory: Path, manifest: Manifest) -> Manifest:
    """Write an onnx.ModelProto and its manifest (with the file's sha256) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / manifest.onnx
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, onnx_path)
    final = replace(manifest, sha256=sha256_file(onnx_path), directory=directory)
    save_manifest(final, directory)
    return final


# Classifiers that only `cxr train` makes (they start from pretrained torch weights, so `cxr models
# init` has no ONNX builder for them); same input, crop and preprocessing as the full family.
TRAIN_ONLY_CLASSIFIERS: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": {
        "architecture": "efficientnet-lite0",
        "size": 224,
        "source_size": 512,
        "embedding_dim": 1280,
    },
}


def architecture_spec(role: str, architecture: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this role's spec, the classifier spec of the same size family)."""
    for family in INIT_SPECS.values():
        if family[role]["architecture"] == architecture:
            return family[role], family["classifier"]
    if role == "classifier" and architecture in TRAIN_ONLY_CLASSIFIERS:
        spec = TRAIN_ONLY_CLASSIFIERS[architecture]
        return spec, spec
    choices = sorted(f[role]["architecture"] for f in INIT_SPECS.values())
    if role == "classifier":
        choices += sorted(TRAIN_ONLY_CLASSIFIERS)
    raise ModelError(f"unknown {role} architecture {architecture!r}: choose one of {choices}")


def segmenter_manifest(
    architecture: str, *, card: dict[str, Any] | None = None, trained: bool = True
) -> Manifest:
    """The manifest of a segmenter architecture (sha256 filled in by export_model)."""
    n = int(architecture_spec("segmenter", architecture)[0]["size"])
    return Manifest(
        role="segmenter",
        architecture=architecture,
        onnx="segmenter.onnx",
        sha256="",
        inputs=(TensorSpec(name="image", shape=("N", 1, n, n)),),
        outputs=(TensorSpec(name="mask_logit", shape=("N", 1, n, n)),),
        preprocess=_gray(n),
        threshold=0.5,
        trained=trained,
        card=card or {},
    )


def classifier_manifest(
    architecture: str,
    *,
    threshold: float = 0.5,
    card: dict[str, Any] | None = None,
    trained: bool = True,
) -> Manifest:
    """The manifest of a classifier architecture (sha256 filled in by export_model)."""
    spec = architecture_spec("classifier", architecture)[0]
    n, dim = int(spec["size"]), int(spec["embedding_dim"])
    return Manifest(
        role="classifier",
        architecture=architecture,
        onnx="classifier.onnx",
        sha256="",
        inputs=(TensorSpec(name="image", shape=("N", 1, n, n)),),
        outputs=(
            TensorSpec(name="logit", shape=("N", 1)),
            TensorSpec(name="embedding", shape=("N", dim)),
        ),
        preprocess=_gray(n),
        threshold=threshold,
        trained=trained,
        crop=CropSpec(source_size=int(spec["source_size"]), margin=0.05),
        card=card or {},
    )


def init_models(
    out_dir: Path, *, size: Literal["full", "tiny"] = "full", seed: int = 0
) -> ModelSet:
    """Export the two architectures UNTRAINED (random weights, fixed seed) with manifests."""
    from engine import arch  # onnx graph builders; only needed here

    spec = INIT_SPECS[size]
    seg_s, clf_s = spec["segmenter"], spec["classifier"]
    untrained_card = {
        "status": "UNTRAINED: random weights from `cxr models init`; predictions are meaningless",
        "seed": seed,
    }
    seg_model = arch.ARCHITECTURES[seg_s["architecture"]](seed=seed, size=seg_s["size"])
    seg = segmenter_manifest(seg_s["architecture"], card=untrained_card, trained=False)
    clf_model = arch.ARCHITECTURES[clf_s["architecture"]](
        seed=seed, in_channels=1, size=clf_s["size"], embedding_dim=clf_s["embedding_dim"]
    )
    clf = classifier_manifest(clf_s["architecture"], card=untrained_card, trained=False)
    return ModelSet(
        segmenter=export_model(seg_model, out_dir, seg),
        classifier=export_model(clf_model, out_dir, clf),
    )


def _stored_weights(model: Any, store: Any) -> Any:
    """The same graph with each initializer for which store(init) gives (stored initializers,
    decoding node) replaced by those: the node, put first, turns them back into a tensor of the
    initializer's name, so the rest of the graph is unchanged."""
    import onnx

    graph = model.graph
    kept, decoders = [], []
    for init in graph.initializer:
        stored = store(init)
        if stored is None:
            kept.append(init)
            continue
        inits, node = stored
        kept += inits
        decoders.append(node)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(decoders + nodes)
    onnx.checker.check_model(model)
    return model


def fp16_weights(model: Any, *, min_elements: int = 1024) -> Any:
    """The same graph with large float32 weights stored as float16 + a Cast back to float32.

    Halves the file; compute stays float32 (ONNX Runtime folds the Casts into float32 weights
    when it loads the model), so outputs differ from the original only by the weights' rounding.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def store(init: Any) -> Any:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < min_elements:
            return None
        half = numpy_helper.from_array(
            numpy_helper.to_array(init).astype(np.float16), f"{init.name}__fp16"
        )
        return [half], helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT)

    return _stored_weights(model, store)


def w8_weights(model: Any, *, min_elements: int = 1024) -> Any:
    """The same graph with the large Conv/Gemm weights stored as symmetric per-output-channel
    INT8 + a DequantizeLinear back to float32 (about a quarter of the file; compute stays
    float32). `float_weights` undoes the storage for consumers that want plain float weights."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    axis_of: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            axis_of[node.input[1]] = 0
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis_of[node.input[1]] = 0 if trans_b else 1

    def store(init: Any) -> Any:
        axis = axis_of.get(init.name)
        if axis is None or init.data_type != TensorProto.FLOAT or np.prod(init.dims) < min_elements:
            return None
        w = numpy_helper.to_array(init).astype(np.float64)
        other = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.abs(w).max(axis=other) / 127.0
        scale[scale == 0] = 1.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        names = [f"{init.name}__w8", f"{init.name}__w8_scale", f"{init.name}__w8_zero_point"]
        stored = [
            numpy_helper.from_array(q, names[0]),
            numpy_helper.from_array(scale.astype(np.float32), names[1]),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), names[2]),
        ]
        return stored, helper.make_node("DequantizeLinear", names, [init.name], axis=axis)

    return _stored_weights(model, store)


def float_weights(model: Any) -> Any:
    """The same graph with every DequantizeLinear of a stored initializer (w8 weights) folded
    into a float32 initializer: what TensorRT's float plans parse. Activation Q/DQ pairs are
    left alone (a QDQ export is not a float model)."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded, nodes = [], []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
            nodes.append(node)
            continue
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zp = (
            numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(())
        )
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim else zp
        folded.append(
            numpy_helper.from_array(((q - zp) * scale).astype(np.float32), node.output[0])
        )
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + folded)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def pack_models(src: Path, out: Path, *, classifier_precision: str) -> ModelSet:
    """A lean copy of a models directory for shipping: the chosen classifier export
    (``int8``: its QDQ variant, with a w8 variant, the FP32 weights stored as INT8, that
    TensorRT's float plans build from; ``fp16``: float16-stored weights), the segmenter as is.

    The manifests keep the training card, including the INT8 parity measured against FP32.
    """
    import shutil

    import onnx

    models = load_models(src, precision="fp32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg = models.segmenter
    shutil.copy2(seg.onnx_path, out / seg.onnx)
    save_manifest(replace(seg, directory=out), out)
    clf = models.classifier
    # as given (relative paths stay relative: a shipped card names no build machine's folders)
    card = dict(clf.card) | {"packed_from": str(src), "reference": "fp32"}
    if classifier_precision == "int8":
        variant = clf.variants.get("int8")
        if variant is None:
            raise ModelError(f"{src}: the classifier has no int8 export to pack")
        shutil.copy2(clf.directory / variant.onnx, out / variant.onnx)
        w8 = replace(clf, onnx="classifier.w8.onnx", precision="w8", variants={}, card=card)
        w8 = export_model(w8_weights(onnx.load(str(clf.onnx_path))), out, w8)
        packed = replace(
            clf,
            onnx=variant.onnx,
            sha256=variant.sha256,
            precision="int8",
            variants={"w8": Variant(onnx=w8.onnx, sha256=w8.sha256)},
            card=card,
            directory=out,
        )
        save_manifest(packed, out)
    elif classifier_precision == "fp16":
        proto = fp16_weights(onnx.load(str(clf.onnx_path)))
        half = replace(clf, onnx="classifier.fp16.onnx", precision="fp16", variants={}, card=card)
        export_model(proto, out, half)
    else:
        raise ModelError(
            f"pack: classifier precision must be int8 or fp16, not {classifier_precision!r}"
        )
    return load_models(out, precision="auto")
