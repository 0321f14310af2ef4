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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.errors import ModelError

MANIFEST_FORMAT = "cxr-engine-model/1"
ROLES: tuple[Literal["segmenter", "classifier"], ...] = ("segmenter", "classifier")
Role = Literal["segmenter", "classifier"]
INTENSITY_MODES = ("minmax", "fullrange")


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
    # segmenter: connected mask regions below this share of the mask's pixels do not count for
    # the lung box (kernels.reference.lung_bbox min_region); 0 = every pixel counts
    box_min_region: float = 0.0
    crop: CropSpec | None = None
    # classifier: box transforms (sx, sy, dx, dy) of the lung box, one crop each; its outputs are
    # the mean over them (engine.stages.crop, test-time augmentation); () = the box alone
    tta: tuple[tuple[float, float, float, float], ...] = ()
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

    @property
    def onnx_files(self) -> list[str]:
        """The ONNX files the manifest names: its own export, then its variants'."""
        return [self.onnx, *(v.onnx for v in self.variants.values())]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory")
        for key in ("box_min_region", "tta"):  # written only when set: older manifests stay
            if not d[key]:
                d.pop(key)
        if "tta" in d:
            d["tta"] = [list(t) for t in d["tta"]]
        return d


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tta_digest(tta: tuple[tuple[float, ...], ...]) -> str:
    """8 hex digits that name a set of box transforms (in model ids)."""
    return hashlib.sha256(json.dumps([list(t) for t in tta]).encode()).hexdigest()[:8]


def manifest_path(models_dir: Path, role: Role) -> Path:
    return Path(models_dir) / f"{role}.json"


def _tensors(raw: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name=t["name"], shape=tuple(t["shape"]), dtype=t.get("dtype", "float32"))
        for t in raw
    )


def _transform(t: Any) -> tuple[float, float, float, float]:
    if not isinstance(t, list | tuple) or len(t) != 4:
        raise ValueError(f"tta: each box transform is [sx, sy, dx, dy], not {t!r}")
    return (float(t[0]), float(t[1]), float(t[2]), float(t[3]))


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
        box_min_region=float(raw.get("box_min_region", 0.0)),
        tta=tuple(_transform(t) for t in raw.get("tta") or ()),
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
    if not 0.0 <= m.box_min_region < 1.0:
        problems.append(f"box_min_region {m.box_min_region} is not in [0, 1)")
    if m.box_min_region and m.role != "segmenter":
        problems.append("box_min_region belongs to the segmenter's manifest")
    if m.tta and m.role != "classifier":
        problems.append("tta belongs to the classifier's manifest")
    if any(not (0.5 <= sx <= 2.0 and 0.5 <= sy <= 2.0) for sx, sy, _, _ in m.tta):
        problems.append("tta: each transform's scales (sx, sy) must be in [0.5, 2]")
    if any(not (abs(dx) <= 0.5 and abs(dy) <= 0.5) for _, _, dx, dy in m.tta):
        problems.append("tta: each transform's shifts (dx, dy) must be within +-0.5 of the box")
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
    return verify_onnx(m, path) if verify else m


def verify_onnx(m: Manifest, path: Path) -> Manifest:
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


@dataclass(frozen=True, slots=True)
class UNetShape:
    """A U-Net segmenter: engine.arch (ONNX) and engine.train.unet (torch) build it from this."""

    base_channels: int
    depth: int
    size: int  # input side: the manifest's preprocess and mask_logit size
    family: str  # INIT_SPECS family whose work image (crop source) and classifier it serves


# The one table of segmenter architectures. A family's cheaper segmenters (issue 17) read the same
# work image as its own and only derive a smaller input from it, so the classifier's crop is cut
# exactly as before given the same box.
UNET_SEGMENTERS: dict[str, UNetShape] = {
    "unet": UNetShape(base_channels=16, depth=4, size=256, family="full"),
    "tiny-unet": UNetShape(base_channels=4, depth=2, size=64, family="tiny"),
    "unet-s8": UNetShape(base_channels=8, depth=4, size=256, family="full"),
    "unet-128": UNetShape(base_channels=16, depth=4, size=128, family="full"),
    "unet-s8-128": UNetShape(base_channels=8, depth=4, size=128, family="full"),
}
