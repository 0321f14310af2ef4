"""What both trainers share: seeding, precision, optimiser schedule, early stopping, logs."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from engine.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """AVX512-BF16 or AMX-BF16 among the CPU's flags (/proc/cpuinfo, or the text given): bf16
    autocast then runs these CNNs much faster than FP32 (docs/model-eval has the measurement);
    elsewhere (AVX2 only) bf16 is emulated and slower, and where the flags cannot be read we
    assume the worst."""
    from engine.cpu import parse_cpuinfo, this_cpu

    return (this_cpu() if cpuinfo is None else parse_cpuinfo(cpuinfo)).bf16_fast


def resolve_precision(precision: str, cpuinfo: str | None = None) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16(cpuinfo) else "fp32"
    return precision


def autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def seed_everything(seed: int, threads: int) -> tuple[np.random.Generator, torch.Generator]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


def optimiser(
    model: torch.nn.Module, *, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW; linear warm-up over the first 5% of steps, then cosine decay to 1% of lr."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(0.05 * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled batches; a last batch of one is dropped (BatchNorm needs two samples)."""
    order = rng.permutation(indices)
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        if len(part) > 1 or len(order) == 1:
            yield part


class EarlyStopping:
    """Keeps the best weights by score (higher is better), ties broken by lower loss."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_score = -math.inf
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, score: float, loss: float, model: torch.nn.Module) -> bool:
        better = score > self.best_score + 1e-9 or (
            abs(score - self.best_score) <= 1e-9 and loss < self.best_loss
        )
        if better:
            self.best_score, self.best_loss, self.best_epoch = score, loss, epoch
            self.best_state = copy.deepcopy(model.state_dict())
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Everything update() reads, for an epoch checkpoint."""
        keys = ("best_score", "best_loss", "best_epoch", "best_state", "bad_epochs")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Schedule(Protocol):
    """The options both trainers' configs have (SegmenterTrainConfig, ClassifierTrainConfig)."""

    @property
    def arch(self) -> str: ...
    @property
    def epochs(self) -> int: ...
    @property
    def max_steps(self) -> int | None: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def patience(self) -> int: ...


def check_common(cfg: Schedule, archs: tuple[str, ...]) -> None:
    """The option checks both trainers share; ConfigError names the option."""
    if cfg.arch not in archs:
        raise ConfigError(f"--arch must be one of {', '.join(archs)}, not {cfg.arch!r}")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, not {cfg.epochs}")
    if cfg.batch_size < 2:
        raise ConfigError(f"--batch-size must be at least 2 (BatchNorm), not {cfg.batch_size}")
    if cfg.patience < 1:
        raise ConfigError(f"--patience must be at least 1, not {cfg.patience}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, not {cfg.max_steps}")


def schedule_card(cfg: Schedule, stopper: EarlyStopping, epochs_run: int) -> dict[str, Any]:
    """The first entries of both trainers' training card: the schedule that ran."""
    return {
        "epochs_max": cfg.epochs,
        "epochs_run": epochs_run,
        "best_epoch": stopper.best_epoch,
        "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "optimizer": f"AdamW lr {cfg.lr} wd {cfg.weight_decay}, warm-up + cosine",
    }


@dataclass(frozen=True, slots=True)
class EpochStats:
    images: int
    steps: int
    loss: float  # mean training loss per image
    seconds: float

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "img_per_s": self.img_per_s, "train_s": self.seconds}


def train_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    batches: Iterable[np.ndarray],
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    max_steps: int,
) -> EpochStats:
    """One pass over the batches (at most max_steps optimiser steps)."""
    model.train()
    t0, seen, steps, total = time.perf_counter(), 0, 0, 0.0
    for idx in batches:
        if steps >= max_steps:
            break
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen, steps, total = seen + len(idx), steps + 1, total + loss.item() * len(idx)
    return EpochStats(seen, steps, total / max(seen, 1), time.perf_counter() - t0)
