"""Crop cache: each labelled image decoded, segmented and cropped once, kept on disk.

Decoding and segmenting thousands of images costs more than an epoch, and a run that takes
several sittings (or the leave-one-source-out runs beside it) would pay it every time. One
cache entry per labelled set holds, memory-mapped:

- work.u8      (n, S, S) uint8: the engine's working image (Preprocessor output, [0, 1] * 255,
               rounded); training crops are cut from it with a jittered box, so the
               quantisation (at most 0.5/255) sits far below the augmentation;
- inputs.f32   (n, C, h, w) float32: the unaugmented classifier input cut from the float
               working image, i.e. exactly what `cxr screen` feeds the classifier; validation,
               threshold, metrics and INT8 parity use these;
- mask.u8.npy  (n, m, m) uint8 0/1: the lung mask at the segmenter's resolution (logit >=
               the manifest's threshold, as `cxr screen`'s lung_mask), for augmentations that
               treat the lungs and their surroundings differently (context swap);
- boxes.npy (n, 4), fraction.npy (n,), ok.npy (n,) bool, errors.json.

The entry's name is a hash of what decides its content: the labels CSV's bytes, the image
folder, the segmenter's sha256, threshold and box rule, the classifier's preprocessing and crop.
Anything else gives a new entry. Building is resumable by chunk (progress.json); meta.json is written last and marks
the entry complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.models import Manifest, ModelSet
from engine.pipeline import Preprocessor
from engine.runtime.onnxrt import OnnxRuntimeBackend
from engine.stages.crop import lung_crops
from engine.stages.segment import logit_threshold, segment
from engine.train.data import LabelledImage, decode_all, log
from engine.train.datasets import LabelSet
from engine.train.loop import write_json

CACHE_VERSION = 2  # 2: the lung mask (mask.u8.npy)
CHUNK = 128


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def entry_key(label_set: LabelSet, seg: Manifest, clf: Manifest) -> str:
    """Hash of everything the cached arrays depend on."""
    spec = {
        "version": CACHE_VERSION,
        "labels_sha256": _file_sha256(label_set.labels),
        "images": str(Path(label_set.images).resolve()),
        "segmenter_sha256": seg.sha256,
        "segmenter_threshold": seg.threshold,
        "classifier_preprocess": asdict(clf.preprocess),
        "crop": asdict(clf.crop) if clf.crop else None,
    }
    if seg.box_min_region:  # only when set, so the keys of existing caches stay valid
        spec["segmenter_box_min_region"] = seg.box_min_region
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CachedCrops:
    """One labelled set's images (in CSV order); rows with ok False could not be decoded."""

    directory: Path
    ok: np.ndarray  # (n,) bool
    work: np.ndarray  # (n, S, S) uint8 memmap
    inputs: np.ndarray  # (n, C, h, w) float32 memmap
    masks: np.ndarray  # (n, m, m) uint8 0/1 memmap, at the segmenter's resolution
    boxes: np.ndarray  # (n, 4) float32
    fraction: np.ndarray  # (n,) float32
    errors: dict[int, str]


def _memmap(path: Path, dtype: type, shape: tuple[int, ...], mode: str) -> np.ndarray:
    return np.lib.format.open_memmap(
        path, mode=mode, dtype=dtype, shape=shape if mode != "r" else None
    )


def open_or_build(
    cache_dir: Path,
    label_set: LabelSet,
    images: list[LabelledImage],
    seg: Manifest,
    clf: Manifest,
    *,
    threads: int,
) -> CachedCrops:
    """The set's cache entry, built (or finished) first where needed."""
    if clf.crop is None:
        raise ValueError("classifier manifest has no crop section")
    entry = Path(cache_dir) / f"{label_set.name}-{entry_key(label_set, seg, clf)}"
    if not (entry / "meta.json").is_file():
        _build(entry, images, seg, clf, threads)
    return _open(entry, len(images))


def _open(entry: Path, n: int) -> CachedCrops:
    meta = json.loads((entry / "meta.json").read_text())
    if meta["images"] != n:
        raise ValueError(f"{entry}: holds {meta['images']} images, the labels CSV {n}")
    errors = {int(k): v for k, v in json.loads((entry / "errors.json").read_text()).items()}
    return CachedCrops(
        entry,
        np.load(entry / "ok.npy"),
        np.load(entry / "work.u8.npy", mmap_mode="r"),
        np.load(entry / "inputs.f32.npy", mmap_mode="r"),
        np.load(entry / "mask.u8.npy", mmap_mode="r"),
        np.load(entry / "boxes.npy"),
        np.load(entry / "fraction.npy"),
        errors,
    )


def _build(
    entry: Path, images: list[LabelledImage], seg: Manifest, clf: Manifest, threads: int
) -> None:
    assert clf.crop is not None  # checked by open_or_build
    entry.mkdir(parents=True, exist_ok=True)
    n, side = len(images), clf.crop.source_size
    pre_c = clf.preprocess
    shapes = {
        "work.u8.npy": (np.uint8, (n, side, side)),
        "inputs.f32.npy": (np.float32, (n, pre_c.channels, *pre_c.size)),
        "mask.u8.npy": (np.uint8, (n, *seg.preprocess.size)),
    }
    progress_file = entry / "progress.json"
    done = json.loads(progress_file.read_text())["done"] if progress_file.is_file() else 0
    if done == 0:
        arrays = {k: _memmap(entry / k, dt, shp, "w+") for k, (dt, shp) in shapes.items()}
        small = {"boxes": np.zeros((n, 4), np.float32), "fraction": np.zeros(n, np.float32)}
        ok, errors = np.zeros(n, bool), {}
    else:
        arrays = {k: np.load(entry / k, mmap_mode="r+") for k in shapes}
        small = {k: np.load(entry / f"{k}.partial.npy") for k in ("boxes", "fraction")}
        ok = np.load(entry / "ok.partial.npy")
        errors = {int(k): v for k, v in json.loads((entry / "errors.json").read_text()).items()}
        log(f"cache {entry.name}: resuming at image {done} of {n}")
    models = ModelSet(segmenter=seg, classifier=clf)
    pre = Preprocessor(models, device="cpu", batch_size=16, threads=threads)
    t0 = time.perf_counter()
    with OnnxRuntimeBackend(seg, threads=threads) as backend:
        for start in range(done, n, CHUNK):
            stop = min(start + CHUNK, n)
            dec = decode_all(
                [im.path for im in images[start:stop]],
                models,
                threads=threads,
                pre=pre,
                require_any=False,
            )
            errors.update({start + i: msg for i, msg in dec.errors.items()})
            if dec.ok:
                logits = np.concatenate(
                    [
                        segment(backend, seg, dec.seg_input[s : s + 16])
                        for s in range(0, len(dec.ok), 16)
                    ]
                )
                crops = lung_crops(dec.work, logits, seg, clf)
                rows = np.asarray(dec.ok) + start
                arrays["work.u8.npy"][rows] = np.rint(np.clip(dec.work, 0, 1) * 255).astype(
                    np.uint8
                )
                arrays["inputs.f32.npy"][rows] = crops.classifier_input
                arrays["mask.u8.npy"][rows] = logits >= logit_threshold(seg.threshold)
                small["boxes"][rows], small["fraction"][rows] = crops.boxes, crops.fraction
                ok[rows] = True
            for a in arrays.values():
                a.flush()  # type: ignore[attr-defined]  # np.memmap
            _save_partial(entry, small, ok, errors)
            write_json(progress_file, {"done": stop})
            rate = (stop - done) / max(time.perf_counter() - t0, 1e-9)
            log(f"cache {entry.name}: {stop}/{n} images ({rate:.1f} img/s)")
    del arrays
    np.save(entry / "boxes.npy", small["boxes"])
    np.save(entry / "fraction.npy", small["fraction"])
    np.save(entry / "ok.npy", ok)
    write_json(entry / "meta.json", {"images": n, "ok": int(ok.sum()), "version": CACHE_VERSION})


def _save_partial(
    entry: Path, small: dict[str, np.ndarray], ok: np.ndarray, errors: dict[int, str]
) -> None:
    for name, v in [*small.items(), ("ok", ok)]:
        tmp = entry / f".{name}.partial.tmp-{os.getpid()}.npy"
        np.save(tmp, v)
        os.replace(tmp, entry / f"{name}.partial.npy")
    write_json(entry / "errors.json", {str(k): v for k, v in errors.items()})
