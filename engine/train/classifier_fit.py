"""The classifier's training loop: batches from the crop cache, epoch checkpoints, resume.

A batch: draws from the source-balanced sampler -> the cached uint8 working images -> the
context outside the lungs swapped between images (--context-swap, engine.train.augment.ContextSwap)
-> a jittered lung box cut by the serving crop code -> rotation and photometry -> the acquisition
look (engine.train.augment.Acquisition) -> the manifest's (x - mean) / std. Every random number
of epoch e comes from generators seeded by (seed, e) (engine.train.sampling), and a checkpoint
written after each epoch holds the model, optimiser, scheduler, early-stopping state and
history, so `--resume` continues a killed run exactly as the unbroken run would have gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models import Manifest
from engine.train import loop, sampling
from engine.train.augment import (
    Acquisition,
    ContextSwap,
    CropAugment,
    acquisition,
    augment_crops,
    swap_context,
)
from engine.train.classifier_config import ClassifierTrainConfig
from engine.train.data import LabelledImage, crops01, jitter_boxes, log, normalise
from engine.train.datasets import HOLDOUT
from engine.train.metrics import binary_metrics
from engine.train.resnet import build_classifier

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True, slots=True)
class CropData:
    images: list[LabelledImage]
    split: np.ndarray  # (n,) train | val | test (primary set) | holdout | unseen
    labels: np.ndarray  # (n,) 0/1
    work: np.ndarray  # (n, S, S) uint8 working images ([0, 1] * 255)
    boxes: np.ndarray  # (n, 4) lung boxes with margin (normalised)
    inputs: np.ndarray  # (n, C, h, w) unaugmented classifier inputs (the served ones)
    masks: np.ndarray  # (n, m, m) uint8 0/1 lung masks at the segmenter's resolution
    lung_fraction: np.ndarray  # (n,)
    dataset: np.ndarray  # (n,) index of the labelled set (0: the primary one)
    sources: np.ndarray  # (n,) each image's source, read per batch (so stored, not rebuilt)


def train_batch(
    data: CropData,
    idx: np.ndarray,
    clf: Manifest,
    aug: CropAugment,
    rng: np.random.Generator,
    gen: torch.Generator,
    acq: Acquisition | None = None,
    swap: ContextSwap | None = None,
) -> torch.Tensor:
    """Classifier input for a training batch: context swap (outside the lungs, optional) ->
    box jitter -> the serving crop code (in [0, 1]) -> rotation and photometry -> acquisition
    look -> the manifest's (x - mean) / std."""
    boxes = jitter_boxes(data.boxes[idx], rng, scale=aug.box_scale, shift=aug.box_shift)
    work = np.asarray(data.work[idx], np.float32)
    if data.work.dtype == np.uint8:
        work /= 255.0
    if swap is not None:
        work = swap_context(work, data.masks[idx], swap, gen)
    x = augment_crops(torch.from_numpy(crops01(work, boxes, clf)), aug, gen)
    if acq is not None:
        x = acquisition(x, data.sources[idx], acq, gen)
    return torch.from_numpy(normalise(x.numpy(), clf))


def predict(model: torch.nn.Module, x: np.ndarray, precision: str) -> np.ndarray:
    model.eval()
    logits = []
    with torch.no_grad(), loop.autocast(precision):
        for s in range(0, len(x), 32):
            xb = torch.from_numpy(np.asarray(x[s : s + 32])).contiguous(
                memory_format=torch.channels_last
            )
            logits.append(model(xb)[0].float().reshape(-1).numpy())
    return np.concatenate(logits) if logits else np.empty(0, np.float32)


def validate(
    model: torch.nn.Module,
    data: CropData,
    idx: np.ndarray,
    precision: str,
    select_source: str | None = None,
) -> tuple[float, float | None, float | None]:
    """Validation BCE loss, ROC AUC, and the ROC AUC the epoch is chosen on (all validation
    images, or those of one source) on the unaugmented (served) crops."""
    logit = predict(model, data.inputs[idx], precision)
    y = data.labels[idx]
    loss = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logit), torch.from_numpy(y.astype(np.float32))
    )
    probs = 1 / (1 + np.exp(-logit.astype(np.float64)))
    auc = binary_metrics(probs, y, 0.5)["roc_auc"]
    if select_source is None:
        return float(loss), auc, auc
    own = data.sources[idx] == select_source
    return float(loss), auc, binary_metrics(probs[own], y[own], 0.5)["roc_auc"]


def holdout_report(
    model: torch.nn.Module, data: CropData, precision: str
) -> dict[str, dict[str, Any]]:
    """Per source of the held-out slice: ROC AUC and mean probability per label."""
    idx = np.flatnonzero(data.split == HOLDOUT)
    if not len(idx):
        return {}
    probs = 1 / (1 + np.exp(-predict(model, data.inputs[idx], precision).astype(np.float64)))
    out: dict[str, dict[str, Any]] = {}
    sources, labels = data.sources[idx], data.labels[idx]
    for src in sorted(set(sources.tolist())):
        s = sources == src
        row: dict[str, Any] = {"n": int(s.sum())}
        row["roc_auc"] = binary_metrics(probs[s], labels[s], 0.5)["roc_auc"]
        for y in (0, 1):
            sel = s & (labels == y)
            if sel.any():
                row[f"mean_prob_label{y}"] = float(probs[sel].mean())
        out[src] = row
    return out


def _with_progress(batches: list[np.ndarray], epoch: int, every: int = 32) -> Iterator[np.ndarray]:
    """The batches, with a progress line every `every` of them (an epoch takes minutes)."""
    t0 = time.perf_counter()
    seen = 0
    for i, b in enumerate(batches, 1):
        yield b
        seen += len(b)
        if i % every == 0 and i < len(batches):
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            log(f"  epoch {epoch}: batch {i}/{len(batches)}, {rate:.1f} img/s")


def _fingerprint(cfg: ClassifierTrainConfig, n_train: int) -> str:
    """What a checkpoint must agree with to be resumed (threads and --resume may differ)."""
    spec = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "resume")}
    if not spec["consistency"]:  # off: the checkpoints of runs from before the option resume
        spec.pop("consistency")
    spec["train_images"] = n_train
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; start the run without --resume")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"--resume: {path} was written by a run with other options or data; resume with "
            "the same command (only --threads may differ), or use another --out"
        )
    return state


def two_view_loss(logit: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """logit (2B,): the B crops of a batch, then their second views. The mean BCE of both views
    plus weight x the mean squared difference of each crop's two logits."""
    first, second = logit.chunk(2)
    bce = F.binary_cross_entropy_with_logits(logit, torch.cat([y, y]))
    return bce + weight * (first - second).pow(2).mean()


def fit(
    cfg: ClassifierTrainConfig, data: CropData, clf: Manifest, precision: str
) -> tuple[torch.nn.Module, loop.EarlyStopping, list[dict[str, Any]], float]:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    dim = int(clf.output("embedding").shape[-1])
    model = build_classifier(cfg.arch, dim, standardize=cfg.standardize)
    model = model.to(memory_format=torch.channels_last)
    train_idx, val_idx = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "val")
    weights = sampling.sample_weights(
        data.labels[train_idx], data.sources[train_idx], cfg.source_balance
    )
    per_epoch = cfg.epoch_images or len(train_idx)
    y = torch.from_numpy(data.labels.astype(np.float32))
    steps_per_epoch = max(1, per_epoch // cfg.batch_size)
    total = min(cfg.max_steps or 10**9, steps_per_epoch * cfg.epochs)
    opt, sched = loop.optimiser(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total)
    acq = Acquisition() if cfg.acquisition else None
    swap = ContextSwap(p=cfg.context_swap) if cfg.context_swap > 0 else None
    stopper, history, step, first = loop.EarlyStopping(cfg.patience), [], 0, 1
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    ckpt, fingerprint = Path(cfg.out) / CHECKPOINT, _fingerprint(cfg, len(train_idx))
    if cfg.resume:
        state = load_checkpoint(ckpt, fingerprint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stopper.load_state_dict(state["stopper"])
        history, step, first = state["history"], state["step"], state["epoch"] + 1
        log(f"resuming from {ckpt} after epoch {state['epoch']} (step {step})")

    for epoch in range(first, cfg.epochs + 1):
        if stopper.should_stop or step >= total:
            break
        rng, gen = sampling.epoch_rngs(cfg.seed, epoch)
        batches = sampling.epoch_batches(train_idx, weights, per_epoch, cfg.batch_size, rng)

        def batch_loss(
            idx: np.ndarray, rng: np.random.Generator = rng, gen: torch.Generator = gen
        ) -> torch.Tensor:
            xb = train_batch(data, idx, clf, cfg.augment, rng, gen, acq, swap)
            if cfg.consistency > 0:  # a second view of each crop: another jitter, augmentation
                xb = torch.cat([xb, train_batch(data, idx, clf, cfg.augment, rng, gen, acq, swap)])
            with loop.autocast(precision):
                logit = model(xb.contiguous(memory_format=torch.channels_last))[0]
            logit = logit.float().reshape(-1)
            if cfg.consistency <= 0:
                return F.binary_cross_entropy_with_logits(logit, y[idx])
            return two_view_loss(logit, y[idx], cfg.consistency)

        stats = loop.train_epoch(
            model, opt, sched, _with_progress(batches, epoch), batch_loss, total - step
        )
        step += stats.steps
        val_loss, auc, score = validate(model, data, val_idx, precision, cfg.select_source)
        stopper.update(epoch, score if score is not None else -val_loss, val_loss, model)
        record: dict[str, Any] = {
            "epoch": epoch,
            **stats.as_dict(),
            "val_loss": val_loss,
            "val_roc_auc": auc,
        }
        record |= {"val_select_roc_auc": score, "steps": step}
        if held := holdout_report(model, data, precision):
            record["holdout"] = held
        history.append(record)
        shown = "n/a" if score is None else f"{score:.4f}"
        log(
            f"classifier epoch {epoch}/{cfg.epochs}  loss {stats.loss:.4f}  val loss "
            f"{val_loss:.4f}  val AUC {'n/a' if auc is None else f'{auc:.4f}'}  selection AUC "
            f"{shown}  {stats.img_per_s:.1f} img/s"
        )
        state = {
            "epoch": epoch,
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "stopper": stopper.state_dict(),
            "history": history,
            "fingerprint": fingerprint,
        }
        save_checkpoint(ckpt, state)
    stopper.restore(model)
    return model, stopper, history, 1.0
