"""engine.runtime.base: the Backend interface (abstract methods, the tensor-name check and its
message, the context manager), DeviceBackend's extra methods, and `register` (names taken,
names no backend may have). The registry as engine.runtime lists it is in test_runtime.py."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.config import ScreenConfig
from engine.errors import ModelError
from engine.runtime import backend_choices, backend_names, get_backend
from engine.runtime.base import REGISTRY, Backend, DeviceBackend, register
from engine.runtime.null import NullBackend


class Recorder(Backend):
    """Not registered: records what is called."""

    name = "recorder"

    def __init__(self, manifest, **kw) -> None:
        super().__init__(manifest, **kw)
        self.calls: list[str] = []

    def load(self) -> None:
        self.calls.append("load")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append("infer")
        return {}

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture(scope="module")
def clf():
    """What a backend reads of a classifier manifest: its tensor names."""
    return SimpleNamespace(
        inputs=[SimpleNamespace(name="image")],
        outputs=[SimpleNamespace(name="logit"), SimpleNamespace(name="embedding")],
    )


def test_the_interface_is_abstract():
    assert inspect.isabstract(Backend) and inspect.isabstract(DeviceBackend)
    assert Backend.__abstractmethods__ == {"load", "infer"}
    assert DeviceBackend.__abstractmethods__ == {
        "load", "infer", "max_batch", "infer_device", "output_shape", "tensor_dtype",
    }  # fmt: skip
    with pytest.raises(TypeError, match="abstract"):
        Backend(None)  # type: ignore[abstract]

    class Half(Backend):
        def load(self) -> None: ...

    with pytest.raises(TypeError, match="infer"):
        Half(None)  # type: ignore[abstract]


def test_a_backend_keeps_its_manifest_and_threads(clf):
    b = Recorder(clf, threads=3)
    assert b.manifest is clf and b.threads == 3
    assert Recorder(clf).threads == 1
    assert (Backend.name, Backend.rank) == ("abstract", 50)


def test_the_context_manager_loads_and_always_closes(clf):
    with Recorder(clf) as b:
        assert isinstance(b, Recorder) and b.calls == ["load"]
        b.infer({})
    assert b.calls == ["load", "infer", "close"]
    b = Recorder(clf)
    with pytest.raises(RuntimeError, match="boom"), b:
        raise RuntimeError("boom")
    assert b.calls == ["load", "close"]  # closed, and the error not swallowed


def test_close_is_optional(clf):
    class Plain(Backend):
        def load(self) -> None: ...

        def infer(self, feeds):
            return {}

    Plain(clf).close()  # the base hook does nothing


def test_check_names_accepts_extra_tensors(clf):
    b = Recorder(clf)
    b.check_names(Path("/m.onnx"), ["image"], ["logit", "embedding"])
    b.check_names(Path("/m.onnx"), ["image", "aux"], ["embedding", "extra", "logit"])


def test_check_names_says_what_the_file_has_and_the_manifest_names(clf):
    b = Recorder(clf)
    with pytest.raises(ModelError) as err:
        b.check_names(Path("/m/x.plan"), ["input"], ["logit"], loaded="plan", hint="rebuild it")
    assert str(err.value) == (
        "/m/x.plan: tensors do not match the manifest: plan has inputs ['input'] / outputs "
        "['logit'], manifest names ['image'] / ['embedding', 'logit']; rebuild it"
    )
    with pytest.raises(ModelError) as err:
        b.check_names(Path("/m/x.onnx"), ["image"], [])  # a missing output is enough
    assert str(err.value).endswith("model has inputs ['image'] / outputs [], manifest names "
                                   "['image'] / ['embedding', 'logit']")  # fmt: skip


def test_register_returns_the_class_and_is_idempotent():
    class Once(NullBackend):
        name = "once"

    try:
        assert register(Once) is Once
        assert register(Once) is Once  # the same class again (a module imported twice)
        assert REGISTRY["once"] is Once
    finally:
        del REGISTRY["once"]


@pytest.mark.parametrize("name", ["auto", "abstract"])
def test_register_refuses_names_no_backend_may_have(name):
    with pytest.raises(ValueError, match=rf"'{name}' cannot name a backend"):
        register(type("Bad", (NullBackend,), {"name": name}))
    assert name not in REGISTRY


def test_a_registered_backend_is_listed_and_chosen_by_name():
    @register
    class EchoBackend(NullBackend):
        name = "echo"
        rank = 15

    try:
        assert backend_names() == ("onnxruntime", "echo", "tensorrt", "null")
        assert get_backend("echo") is EchoBackend
        ScreenConfig(inputs=(Path("x"),), out=Path("o"), backend="echo")
        with pytest.raises(ValueError, match="taken by"):
            register(type("Other", (NullBackend,), {"name": "echo"}))
        with pytest.raises(ValueError, match="cannot name a backend"):
            register(type("Auto", (NullBackend,), {"name": "auto"}))
    finally:
        del REGISTRY["echo"]
    assert "echo" not in backend_choices()


def test_a_taken_name_names_the_class_that_has_it():
    with pytest.raises(
        ValueError, match=r"backend name 'null' taken by engine\.runtime\.null\.NullBackend"
    ):
        register(type("Impostor", (Backend,), {"name": "null"}))
    assert REGISTRY["null"] is NullBackend
