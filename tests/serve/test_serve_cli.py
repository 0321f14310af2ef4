"""engine.serve.cli: `cxr serve` up to the server (uvicorn replaced by a recorder): its option
checks, the address it prints, the loopback notice or the no-authentication warning, the Host
check that loopback turns on, a port in use, and what is not a run directory."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import plain, run_cli
from fastapi.testclient import TestClient
from test_store import row

from engine.errors import EngineError
from engine.io import parquet
from engine.serve import cli as serve_cli
from engine.serve.cli import LOOPBACK_NAMES, build_app, is_loopback


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A hand-made run: two prediction rows."""
    out = tmp_path_factory.mktemp("serve") / "out"
    parquet.write_part(out, 0, parquet.rows_frame([row(1, 0.9), row(2, 0.2)]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(monkeypatch) -> list[dict]:
    """What uvicorn.run was asked to serve, instead of serving it."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def get(app, host: str):
    return TestClient(app, base_url="http://127.0.0.1:8000").get("/api/run", headers={"host": host})


def test_build_app_on_loopback_refuses_other_host_names(run_dir):
    app = build_app(run_dir, models=None, report=None, host="127.0.0.1", port=8000, max_upload_mb=3)
    for name in LOOPBACK_NAMES:
        assert get(app, f"{name}:8000").status_code == 200
    refused = get(app, "rebound.example:8000")
    assert refused.status_code == 400 and refused.json() == {"detail": "unknown Host header"}
    assert get(app, "localhost").json()["max_upload_bytes"] == 3 << 20


def test_build_app_on_the_network_takes_any_host_name(run_dir):
    app = build_app(run_dir, models=None, report=None, host="0.0.0.0", port=8000, max_upload_mb=1)
    assert get(app, "cxr.hospital.example").status_code == 200


def test_build_app_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(EngineError, match="nope: no such directory; pass the --out"):
        build_app(
            tmp_path / "nope", models=None, report=None, host="localhost", port=1, max_upload_mb=1
        )
    with pytest.raises(EngineError, match="no predictions/ folder"):
        build_app(tmp_path, models=None, report=None, host="localhost", port=1, max_upload_mb=1)


def test_a_port_in_use_is_refused_with_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(
            EngineError, match=rf"cannot listen on 127.0.0.1:{port} .*choose another --port"
        ):
            serve_cli._check_port_free("127.0.0.1", port)
    serve_cli._check_port_free("127.0.0.1", port)  # free again


def test_serve_on_loopback_prints_the_address_and_who_can_connect(run_dir, served):
    port = free_port()
    code, stdout, stderr = run_cli(["serve", run_dir, "--port", str(port), "--max-upload-mb", "5"])
    assert code == 0, stderr
    text = plain(stdout)
    assert f"cxr serve: http://127.0.0.1:{port}/ ({run_dir}) Ctrl-C to stop" in text
    assert "Only this machine can connect" in text and "--host 0.0.0.0" in text
    assert "WARNING" not in plain(stderr)
    (call,) = served
    assert (call["host"], call["port"], call["access_log"]) == ("127.0.0.1", port, False)
    assert get(call["app"], "evil.example").status_code == 400


def test_serve_on_all_addresses_warns_there_is_no_authentication(run_dir, served):
    port = free_port()
    code, stdout, stderr = run_cli(["serve", run_dir, "--host", "0.0.0.0", "--port", str(port)])
    assert code == 0, stderr
    assert f"http://127.0.0.1:{port}/" in plain(stdout)  # a browsable address, not 0.0.0.0
    warning = plain(stderr)
    assert "WARNING: listening on 0.0.0.0: anyone who can reach this machine" in warning
    assert "there is no authentication" in warning
    assert get(served[0]["app"], "elsewhere.example").status_code == 200


def test_serve_shows_an_ipv6_address_in_brackets(run_dir, served, monkeypatch):
    monkeypatch.setattr(serve_cli, "_check_port_free", lambda host, port: None)
    code, stdout, _ = run_cli(["serve", run_dir, "--host", "::1", "--port", "8123"])
    assert code == 0
    assert "http://[::1]:8123/" in plain(stdout)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "0"], "--port must be between 1 and 65535, not 0"),
        (["--port", "70000"], "--port must be between 1 and 65535, not 70000"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be at least 1, not 0"),
    ],
)
def test_serve_refuses_bad_options_with_exit_1(run_dir, served, args, words):
    code, _, stderr = run_cli(["serve", run_dir, *args])
    assert code == 1 and words in plain(stderr)
    assert served == []


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, served):
    code, _, stderr = run_cli(["serve", tmp_path / "missing", "--port", str(free_port())])
    assert code == 1 and "no such directory" in plain(stderr)
    assert served == []
