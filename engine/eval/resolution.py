"""Does sharpness decide? The same images screened at full size and downscaled.

cxr-train's images are 224 px, the dev images and real archives 1024-3000 px; a model that
learnt "blurry means COVID-19" (or the reverse) would change its decisions when an archive's
image is downscaled. This measurement screens each selected labelled image twice through the
engine (`Screener`: decode, segment, crop, classify), once as it is and once downscaled
(Lanczos) so that its long side is `side` pixels, saved as PNG, and reports how many decisions
agree and the ROC AUC of each.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.eval.metrics import roc_auc
from engine.io.archive import ImageRef, Item, image_key
from engine.io.probe import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from engine.io.reader import prepare
from engine.models import load_models
from engine.screener import Screener


def downscale(src: Path, dst: Path, side: int) -> None:
    """src -> dst (PNG) with its long side `side` px (never upscaled), 8-bit grey or 16-bit."""
    from PIL import Image

    with Image.open(src) as opened:
        im: Image.Image = opened.convert("L") if opened.mode not in ("L", "I", "I;16") else opened
        scale = side / max(im.size)
        if scale < 1:
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.LANCZOS)
        im.save(dst, format="PNG")


def screen_probs(screener: Screener, paths: list[Path], batch_size: int = 16) -> np.ndarray:
    """Probability per path (nan where the image failed)."""
    out = np.full(len(paths), np.nan)
    for start in range(0, len(paths), batch_size):
        idx, samples = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            ref = ImageRef(key=image_key(str(paths[i]), None), source=str(paths[i]), member=None)
            item = Item(ref, Path(paths[i]).read_bytes(), None)
            prepared = prepare(item, max_pixels=DEFAULT_MAX_PIXELS, min_side=DEFAULT_MIN_SIDE)
            if prepared.sample is not None:
                idx.append(i)
                samples.append(prepared.sample)
        if not samples:
            continue
        pre = screener.preprocess(samples)
        if pre.ok:
            preds = screener.infer(pre)
            out[[idx[j] for j in pre.ok]] = preds.prob
    return out


def downscale_agreement(
    models_dir: Path | None,
    paths: list[Path],
    labels: np.ndarray,
    *,
    side: int = 224,
    threads: int = 2,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Decisions and ROC AUC of the engine on the images as they are and downscaled."""
    if not paths:
        raise ConfigError("no images to measure the downscale agreement on")
    models = load_models(models_dir)
    threshold = float(models.classifier.threshold or 0.5)
    screener = Screener(models, backend="onnxruntime", batch_size=batch_size, threads=threads)
    try:
        full = screen_probs(screener, paths, batch_size)
        with tempfile.TemporaryDirectory(prefix="cxr-downscale-") as tmp:
            small_paths = []
            for i, p in enumerate(paths):
                dst = Path(tmp) / f"{i:06d}.png"
                try:
                    downscale(p, dst, side)
                except OSError:  # not an image Pillow opens (e.g. DICOM): counted as failed
                    dst.write_bytes(b"")
                small_paths.append(dst)
            small = screen_probs(screener, small_paths, batch_size)
    finally:
        screener.close()
    ok = ~(np.isnan(full) | np.isnan(small))
    y = np.asarray(labels)[ok]
    same = (full[ok] >= threshold) == (small[ok] >= threshold)

    def auc(p: np.ndarray) -> float | None:
        return roc_auc(y, p[ok]) if len(set(y.tolist())) == 2 else None

    return {
        "side": side,
        "images": int(ok.sum()),
        "failed": int((~ok).sum()),
        "threshold": threshold,
        "same_decision": float(same.mean()) if ok.any() else None,
        "roc_auc_full": auc(full),
        "roc_auc_downscaled": auc(small),
        "mean_abs_prob_diff": float(np.abs(full[ok] - small[ok]).mean()) if ok.any() else None,
        "model_id": models.model_id,
    }
