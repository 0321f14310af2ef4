"""engine/errors.py: what a caller can catch. Every fatal error of the engine is an EngineError
(a message and exit code 1 at the command line); an ImageError is one image's, never fatal."""

from __future__ import annotations

import pytest
import typer

from engine import errors
from engine.console import fatal_errors


@pytest.mark.parametrize(
    "cls",
    [
        errors.ConfigError,
        errors.ModelError,
        errors.BackendUnavailable,
        errors.OutputLocked,
        errors.OutputError,
    ],
)
def test_every_fatal_error_is_an_engine_error(cls):
    assert issubclass(cls, errors.EngineError)
    with pytest.raises(typer.Exit) as done, fatal_errors():
        raise cls("what went wrong, and the fix")
    assert done.value.exit_code == 1


def test_an_image_error_is_not_an_engine_error():
    assert not issubclass(errors.ImageError, errors.EngineError)
    with pytest.raises(errors.ImageError), fatal_errors():  # not turned into an exit
        raise errors.ImageError("cannot decode")
