"""ONNX Runtime's optimised graphs, kept on disk so a run does not redo the optimisation.

Making an ONNX Runtime session at the full optimisation level (constant folding, fusions, the
NCHWc layout of the CPU kernels) is most of a small run's model loading: for the shipped
ResNet50, whose float16 weights are folded to float32 then, it takes several times as long as
loading the graph it produces. ONNX Runtime can save that optimised graph
(SessionOptions.optimized_model_filepath) and load it again with optimisation off; the outputs
are the same (tests/runtime/test_ort_cache.py checks it bit for bit).

The saved graph depends on the machine (the layout transforms pick kernels for this CPU's
instruction sets), so its key is the model file's sha256, the ONNX Runtime version and this
CPU's model name and full flag set. Files are written to a temporary name and renamed, so two
runs that start together both end with a whole file. Where the folder cannot be written the run
goes on without it (the session is made as before).

Off unless CXR_CACHE_DIR names a folder (the graphs go to $CXR_CACHE_DIR/ort): a run writes
nothing outside its --out by default (docs/screen.md), and an optimised ResNet50 takes about
90 MB, so where it goes is the user's choice, e.g. one folder for every nightly job of a host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from engine.cpu import this_cpu

CACHE_ENV = "CXR_CACHE_DIR"
OFF = frozenset({"off", "0", "none", "false"})


def cache_root() -> Path | None:
    """The engine's cache folder ($CXR_CACHE_DIR), or None: not set, empty or off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if not value or value.lower() in OFF:
        return None
    return Path(value).expanduser()


def optimized_path(model_sha256: str, ort_version: str) -> Path | None:
    """Where the optimised graph of this model, ORT version and CPU lives (None: cache off)."""
    root = cache_root()
    if root is None:
        return None
    cpu = this_cpu()
    machine = hashlib.sha256(f"{cpu.model}|{' '.join(sorted(cpu.flags))}".encode()).hexdigest()[:12]
    return root / "ort" / f"{model_sha256[:16]}-ort{ort_version}-{machine}.onnx"


def temporary_path(final: Path) -> Path | None:
    """A temporary name beside `final` for ORT to write to, or None if the folder is not
    writable (then nothing is cached)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(final.parent, os.W_OK):
        return None
    return final.with_name(f".{final.stem}.tmp-{os.getpid()}.onnx")


def publish(tmp: Path, final: Path) -> None:
    """Move a written graph into place; a failure leaves no partial file behind."""
    try:
        if tmp.is_file() and tmp.stat().st_size > 0:
            os.replace(tmp, final)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def discard(path: Path) -> None:
    """Remove a saved graph that cannot be loaded (a read-only cache keeps it; no error)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
