"""Teacher targets for `cxr train segmenter --teacher` (issue 17: a cheaper segmenter whose boxes
stay today's).

A small U-Net trained on the ~100 human masks alone finds lung boxes that differ from the
shipped U-Net's on a third of the dev images. With a teacher it also learns, on thousands of
unlabelled CXRs, to reproduce the teacher's masks, which is what the boxes are judged against.

Both networks see what `cxr screen` would feed each of them: every image goes through the
engine's Preprocessor once with the teacher's manifest and once with the student's (the same
work image, each at its own segmenter size). The target is the teacher's lung probability,
centred on its own decision threshold (sigmoid(logit - logit(threshold)), so 0.5 is its mask's
edge), area-resized to the student's size. Nothing here reads a label: the images are a pool,
and they must not be images the results are measured on (the mask pairs, the classifier's labels
CSV): `check_disjoint` refuses an overlap.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from engine.models import Manifest, ModelSet, load_manifest, manifest_path
from engine.stages.segment import logit_threshold
from engine.train.data import IMAGE_SUFFIXES, decode_all, log, read_table
from engine.train.export import ort_run, ort_session
from engine.train.specs import classifier_for_segmenter, classifier_manifest

CHUNK = 256  # pool images decoded at a time (their 512 px work images are dropped after)
HELD_OUT_SHARE = 0.05  # of the pool, never trained on: the teacher agreement logged per epoch


@dataclass(frozen=True, slots=True)
class TeacherData:
    paths: list[Path]
    x: np.ndarray  # (n, 1, h, w) student inputs, normalised as served
    target: np.ndarray  # (n, 1, h, w) float32 teacher lung probability at the student's size
    teacher: dict[str, str]  # architecture, sha256 (for the card)


def pool_images(spec: Path) -> list[Path]:
    """The images of --teacher-images: a CSV with a `path` column (relative to the CSV's folder,
    as the labels CSVs are) or a folder searched recursively."""
    spec = Path(spec)
    if spec.is_dir():
        paths = sorted(
            p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    elif spec.is_file():
        paths = [spec.parent / row["path"] for row in read_table(spec, ("path",))]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise ConfigError(
                f"{spec}: {len(absent)} image(s) not found (e.g. {absent[0]}); the 'path' column "
                "must be relative to the CSV's folder"
            )
    else:
        raise ConfigError(f"--teacher-images {spec}: no such file or folder")
    if not paths:
        raise ConfigError(f"--teacher-images {spec}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def check_disjoint(pool: list[Path], measured: dict[str, list[Path]]) -> None:
    """Refuse a pool that holds images the segmenter is measured on (by resolved path)."""
    inside = {p.resolve() for p in pool}
    for what, paths in measured.items():
        both = sorted(str(p) for p in paths if p.resolve() in inside)
        if both:
            raise ConfigError(
                f"--teacher-images holds {len(both)} image(s) of {what} (e.g. {both[0]}); the "
                "teacher's pool must not contain the images the segmenter is measured on"
            )


def held_out(n: int, seed: int) -> np.ndarray:
    """Boolean (n,): the seeded slice of the pool kept out of training."""
    rng = np.random.default_rng([seed, 17])
    keep = np.zeros(n, bool)
    keep[rng.choice(n, size=max(1, round(n * HELD_OUT_SHARE)), replace=False)] = True
    return keep


def teacher_targets(
    teacher_dir: Path,
    student: Manifest,
    pool: list[Path],
    *,
    threads: int,
    cache: Path | None = None,
) -> TeacherData:
    """Student inputs and teacher targets for every pool image that decodes (cached under
    cache/ by the teacher's sha256, the student's preprocessing and the pool's files)."""
    teacher = load_manifest(manifest_path(Path(teacher_dir), "segmenter"))
    if teacher.role != "segmenter":
        raise ConfigError(f"--teacher {teacher_dir}: its segmenter.json is not a segmenter")
    about = {"architecture": teacher.architecture, "sha256": teacher.sha256}
    key = _key(teacher, student, pool)
    cached = Path(cache) / f"teacher-{key}.npz" if cache is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            kept = [pool[i] for i in z["ok"]]
            log(f"teacher targets of {len(kept)} images from {cached}")
            return TeacherData(kept, z["x"], z["target"], about)
    log(f"teacher targets: {len(pool)} images through the teacher ({teacher.architecture})")
    session = ort_session(teacher.onnx_path, threads)
    ok: list[int] = []
    xs, targets = [], []
    for start in range(0, len(pool), CHUNK):  # chunks: the 512 px work images are not kept
        part = pool[start : start + CHUNK]
        t_dec = decode_all(part, _models(teacher), threads=threads, require_any=False)
        if not t_dec.ok:
            continue
        logits = ort_run(session, t_dec.seg_input, batch=16)[teacher.outputs[0].name]
        prob = _sigmoid(logits - logit_threshold(teacher.threshold))
        s_dec = decode_all([part[i] for i in t_dec.ok], _models(student), threads=threads)
        ok += [start + t_dec.ok[j] for j in s_dec.ok]
        xs.append(s_dec.seg_input)
        targets.append(area_resize(prob[s_dec.ok], student.preprocess.size))
        log(f"  teacher targets: {min(start + CHUNK, len(pool))}/{len(pool)} images")
    if not ok:
        raise ConfigError(f"none of the {len(pool)} --teacher-images could be decoded")
    data = TeacherData([pool[i] for i in ok], np.concatenate(xs), np.concatenate(targets), about)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.tmp.npz")
        np.savez(tmp, ok=np.asarray(ok, np.int64), x=data.x, target=data.target)
        tmp.replace(cached)
    return data


def area_resize(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, 1, H, W) -> (n, 1, h, w) by area averaging (the share of each student pixel that the
    teacher calls lung); the identity at the same size."""
    import torch
    import torch.nn.functional as F

    if tuple(prob.shape[-2:]) == tuple(size):
        return prob.astype(np.float32)
    out = F.interpolate(torch.from_numpy(prob.astype(np.float32)), size=size, mode="area")
    return out.numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)


def _models(seg: Manifest) -> ModelSet:
    clf = classifier_manifest(classifier_for_segmenter(seg.architecture), trained=False)
    return ModelSet(segmenter=seg, classifier=clf)


def _key(teacher: Manifest, student: Manifest, pool: list[Path]) -> str:
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in pool]
    spec = {
        "teacher": teacher.sha256,
        "threshold": teacher.threshold,
        "student": [student.architecture, asdict(student.preprocess)],
        "files": files,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
