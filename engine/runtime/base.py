"""The backend interface: load / infer / close, a context manager, lazy library imports.

One Backend instance serves one model. ``infer`` takes and returns named float32 arrays with
the batch first; the caller never sees the library behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

import numpy as np

from engine.models import Manifest


class Backend(ABC):
    name: str = "abstract"

    def __init__(self, manifest: Manifest, *, threads: int = 1) -> None:
        self.manifest = manifest
        self.threads = threads

    @abstractmethod
    def load(self) -> None:
        """Prepare the model; raises ModelError naming the file if it cannot be loaded."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output named in the manifest."""

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
