"""Inference backends behind one interface, in one registry.

Each module of this package may hold a backend: a Backend subclass decorated with
``engine.runtime.base.register``. ``backend_names`` imports the package's modules once (cheap:
a backend imports its library only when it loads a model) and lists what registered, so adding
a backend is adding its module (and its tests); --backend, its help text, the config check and
the error messages all read the registry. ``get_backend`` picks one by name, ``resolve_backend``
maps "auto" to one.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.runtime.base import REGISTRY, Backend

if TYPE_CHECKING:
    from engine.models import ModelSet

__all__ = [
    "AUTO",
    "Backend",
    "backend_choices",
    "backend_names",
    "choices_text",
    "get_backend",
    "resolve_backend",
]

AUTO = "auto"
_found = False


def _find_backends() -> None:
    global _found
    if not _found:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _found = True


def backend_names() -> tuple[str, ...]:
    """The registered backends, in their listing order (Backend.rank, then name)."""
    _find_backends()
    return tuple(sorted(REGISTRY, key=lambda name: (REGISTRY[name].rank, name)))


def backend_choices() -> tuple[str, ...]:
    """What --backend accepts: "auto", then every registered backend."""
    return (AUTO, *backend_names())


def choices_text(joiner: str = " | ") -> str:
    """The choices for a help text ("auto | onnxruntime | ...")."""
    return joiner.join(backend_choices())


def resolve_backend(
    name: str, *, models: ModelSet | None = None, plans_dir: Path | None = None
) -> str:
    """Map "auto" to a concrete backend.

    TensorRT when ``models`` are given and a GPU, TensorRT, cuda-python and plans built from
    these very models for this GPU and TensorRT version exist (in ``plans_dir``, default
    ``<models dir>/plans``); else ONNX Runtime. So "auto" never picks a backend that would then
    refuse to load. Without ``models`` (or without plans) nothing GPU-related is imported.
    """
    if name != AUTO:
        return name
    if models is not None:
        from engine.runtime.plans import plans_usable

        if plans_usable(models, plans_dir):
            return "tensorrt"
    return "onnxruntime"


def get_backend(name: str) -> type[Backend]:
    names = backend_names()
    if name not in names:
        choices = [AUTO, *names]
        raise ConfigError(
            f"unknown backend {name!r}: choose {', '.join(choices[:-1])} or {choices[-1]}"
        )
    return REGISTRY[name]
