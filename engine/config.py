"""Run configuration: frozen, keyword-only dataclasses. CLI options map onto them one to one."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.drift import DriftThresholds
from engine.errors import ConfigError
from engine.io.probe import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from engine.models import PRECISIONS
from engine.runtime import backend_choices

Device = Literal["cpu", "gpu"]

DECODERS: tuple[str, ...] = ("auto", "dali", "pillow", "pillow-draft")
# What `--decoder auto` uses on the CPU (DALI always decodes on the GPU path). Measured in
# benchmarks/results/screen.jsonl: see docs/performance.md.
CPU_DECODER = "pillow-draft"


def resolve_decoder(decoder: str, device: str) -> str:
    """The preprocessing a run uses: DALI on the GPU; on the CPU the named one, auto -> CPU_DECODER."""
    if device == "gpu":
        return "dali"
    return CPU_DECODER if decoder == "auto" else decoder


def output_path(value: str | os.PathLike[str], option: str = "--out") -> Path:
    """`value` as a path, refusing an empty or blank one: `--out "$UNSET"` reaches us as "",
    which pathlib reads as ".", the current directory."""
    text = os.fspath(value)
    if not text.strip():
        raise ConfigError(
            f"{option} is empty{'' if not text else ' (only blanks)'}: name a directory "
            "(an unset shell variable?)"
        )
    return Path(text)


# --threads above this many per usable core is refused: each stage sizes its pools from it
# (ONNX Runtime's intra-op pool per session, the decoder's), so a huge value starts tens of
# thousands of threads (docs/measurements.md); more threads than cores only add switching once
# a few cover I/O waits.
MAX_THREADS_PER_CORE = 4


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def max_threads() -> int:
    return MAX_THREADS_PER_CORE * default_threads()


def check_threads(threads: int, option: str = "--threads") -> int:
    """`threads` if it is between 1 and max_threads(), else a ConfigError giving the bound."""
    cap = max_threads()
    if not 1 <= threads <= cap:
        raise ConfigError(
            f"{option} must be between 1 and {cap} ({MAX_THREADS_PER_CORE} per CPU core; this "
            f"process may use {default_threads()}), not {threads}"
        )
    return threads


@dataclass(frozen=True, kw_only=True)
class ScreenConfig:
    inputs: tuple[Path, ...]
    out: Path
    models: Path | None = None
    backend: str = "auto"  # "auto" or a registered backend (engine.runtime.backend_names)
    precision: str = "auto"  # auto | fp32 | int8: which export of each model (see models.py)
    # Preprocessing on the CPU: the DALI pipeline, or the Pillow/NumPy one with the same
    # numbers (engine/pipeline_pil.py); "pillow-draft" lets libjpeg downscale huge JPEGs;
    # "auto": CPU_DECODER on the CPU, DALI on the GPU.
    decoder: str = "auto"
    batch_size: int = 16
    threshold: float | None = None  # None: the classifier manifest's threshold
    embeddings_in_parquet: bool = False
    shard_size: int = 256  # rows per Parquet part
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    threads: int = field(default_factory=default_threads)
    # Threads that read each image (sha256, header, DICOM tags and pixels) and, with the Pillow
    # decoders, decode and resize it, side by side (engine/screening.py); 0: `threads`.
    decode_workers: int = 0
    progress: bool = True
    # Nightly runs (engine/nightly/, docs/nightly.md): screen files whose content changed since
    # their row was written again; the run whose images drift is measured against (None: the
    # first); the thresholds of the drift flag; whether a flag fails the command (exit code 5).
    rescreen_changed: bool = False
    reference: str | None = None
    drift_thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    fail_on_drift: bool = False
    # None: this process screens (the default). Else a Ray cluster does, the same per-shard
    # work in actor pools (engine/distributed): "auto" (RAY_ADDRESS, else a running
    # `ray start` cluster), "local" (a Ray instance started here) or a cluster address.
    ray: str | None = None
    ray_actor_cpus: int = 0  # CPUs (and ONNX Runtime threads) per actor; 0: a CPU node's cores

    def __post_init__(self) -> None:
        output_path(self.out)
        if not self.inputs:
            raise ConfigError("no INPUT given: name image files, directories or archives to screen")
        if self.backend not in backend_choices():
            raise ConfigError(
                f"--backend must be one of {', '.join(backend_choices())}, not {self.backend!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.decoder not in DECODERS:
            raise ConfigError(
                f"--decoder must be one of {', '.join(DECODERS)}, not {self.decoder!r}"
            )
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"--batch-size must be between 1 and 4096, not {self.batch_size}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a probability in [0, 1], not {self.threshold}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ConfigError("--max-pixels and --min-side must be positive")
        check_threads(self.threads)
        if self.decode_workers < 0:
            raise ConfigError(
                "--decode-workers must be 0 (as many as --threads) or more, "
                f"not {self.decode_workers}"
            )
        if self.decode_workers:
            check_threads(self.decode_workers, "--decode-workers")
        if self.ray is not None and not self.ray.strip():
            raise ConfigError("--ray needs a value: auto, local or a cluster address (host:port)")
        if self.ray_actor_cpus < 0:
            raise ConfigError(
                f"--ray-actor-cpus must be 0 (auto) or more, not {self.ray_actor_cpus}"
            )

    @property
    def workers(self) -> int:
        """The decode workers this configuration runs: decode_workers, else threads."""
        return self.decode_workers or self.threads

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [str(p) for p in self.inputs]
        d["out"] = str(self.out)
        d["models"] = str(self.models) if self.models else None
        return d
