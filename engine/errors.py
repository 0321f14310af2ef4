"""Typed errors. Library code raises these; only commands turn them into exit codes
(engine/console.py's `fatal_errors`).

Messages name the file involved and, where there is one, the fix.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a fatal problem with the run as a whole (exit code 1)."""


class ConfigError(EngineError):
    """A bad option value or combination."""


class ModelError(EngineError):
    """A model file or manifest is missing, corrupt or inconsistent."""


class BackendUnavailable(EngineError):
    """The requested inference backend cannot run on this machine."""


class OutputLocked(EngineError):
    """Another process is writing to the same output directory."""


class OutputError(EngineError):
    """A file of the output cannot be written (disk full, quota spent, read-only, ...)."""


class ImageError(Exception):
    """One image cannot be screened. Never fatal: it becomes a row with status="error".

    The message says what is wrong; the runner adds which file.
    """
