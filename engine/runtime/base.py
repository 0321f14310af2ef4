"""The backend interface: load / infer / close, a context manager, lazy library imports.

One Backend instance serves one model. ``infer`` takes and returns named float32 arrays with
the batch first; the caller never sees the library behind it.

A backend is one module in engine/runtime/ whose Backend subclass is decorated with
``@register``: engine.runtime finds it there, and --backend, its help, the config check and
the error messages list it (engine.runtime.backend_names).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from engine.errors import ModelError
from engine.models import Manifest

REGISTRY: dict[str, type[Backend]] = {}  # name -> class, filled by @register


class Backend(ABC):
    name: str = "abstract"
    # Where the name stands in lists (--backend help, error messages): lower first.
    rank: int = 50

    def __init__(self, manifest: Manifest, *, threads: int = 1) -> None:
        self.manifest = manifest
        self.threads = threads

    @abstractmethod
    def load(self) -> None:
        """Prepare the model; raises ModelError naming the file if it cannot be loaded."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output named in the manifest."""

    def check_names(
        self,
        where: Path,
        inputs: Iterable[str],
        outputs: Iterable[str],
        *,
        loaded: str = "model",
        hint: str = "",
    ) -> None:
        """ModelError unless the loaded `where` has every input and output the manifest names
        (it may have more); `loaded` says what it is in the message, `hint` how to fix it."""
        got_in, got_out = set(inputs), set(outputs)
        want_in = {t.name for t in self.manifest.inputs}
        want_out = {t.name for t in self.manifest.outputs}
        if not want_in <= got_in or not want_out <= got_out:
            raise ModelError(
                f"{where}: tensors do not match the manifest: {loaded} has inputs "
                f"{sorted(got_in)} / outputs {sorted(got_out)}, manifest names {sorted(want_in)} / "
                f"{sorted(want_out)}" + (f"; {hint}" if hint else "")
            )

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to free
        pass

    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class DeviceBackend(Backend):
    """A backend whose tensors can stay in GPU memory: device pointers in and out.

    The Screener runs the GPU stages (engine/stages/gpu.py) when both of its backends are
    DeviceBackends, chaining the two models with the CUDA kernels without a copy to the host.
    """

    @property
    @abstractmethod
    def max_batch(self) -> int:
        """The largest batch one ``infer_device`` call takes (0 until loaded)."""

    @abstractmethod
    def infer_device(
        self, inputs: dict[str, int], batch: int, *, stream: int | None = None
    ) -> dict[str, int]:
        """Input name -> device pointer (`batch` samples) in, output name -> device pointer
        out; queued on `stream`, without a synchronisation."""

    @abstractmethod
    def output_shape(self, name: str, batch: int) -> tuple[int, ...]:
        """The shape of tensor `name` (an input or an output) for `batch` samples."""

    @abstractmethod
    def tensor_dtype(self, name: str) -> np.dtype[Any]: ...


B = TypeVar("B", bound=type[Backend])


def register(cls: B) -> B:
    """Class decorator: `cls` serves --backend `cls.name`."""
    taken = REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"backend name {cls.name!r} taken by {taken.__module__}.{taken.__name__}")
    if cls.name in ("auto", Backend.name):
        raise ValueError(f"{cls.__module__}.{cls.__name__}: {cls.name!r} cannot name a backend")
    REGISTRY[cls.name] = cls
    return cls
