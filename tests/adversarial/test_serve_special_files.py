"""A FIFO where `cxr serve` expects a regular file (issue 16 #10, the serve part).

Opening a FIFO for reading blocks until a writer comes; a recorded source (or the run's own
files) replaced by one hung a server thread for good, and usearch even blocks holding the GIL.
Each request therefore runs in a child process with a timeout, so a regression fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_images, dev_images, replace_with_fifo, run_child, screen_folder

pytest.importorskip("fastapi")
pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2")
if not hasattr(os, "mkfifo"):
    pytest.skip("needs os.mkfifo", allow_module_level=True)

TIMEOUT_S = 60  # a child imports the engine and answers one request in a few seconds

CHILD = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from engine.errors import EngineError
from engine.serve.app import create_app
try:
    client = TestClient(create_app(Path(sys.argv[1])), raise_server_exceptions=False)
except EngineError as exc:
    print(json.dumps({"status": None, "text": str(exc)}))
else:
    r = client.get(sys.argv[2])
    print(json.dumps({"status": r.status_code, "text": r.text[:100_000]}))
"""


@pytest.fixture(scope="module")
def screened(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adv-fifo")
    real = dev_images(4)
    src = copy_images(root / "in", real[:2])
    with tarfile.open(src / "scans.tar", "w") as tar:
        tar.add(real[2], arcname=f"t/{real[2].name}")
    with zipfile.ZipFile(src / "scans.zip", "w") as z:
        z.write(real[3], arcname=f"z/{real[3].name}")
    out = root / "out"
    rows = screen_folder([src], out, tiny_models_dir, shard_size=2)
    assert {r["status"] for r in rows} == {"ok"}
    keys = {(r["member"] or Path(r["source"]).name).rsplit("/", 1)[-1]: r["key"] for r in rows}
    return {"root": root, "src": src, "out": out, "real": real, "keys": keys}


def ask(out: Path, url: str) -> dict[str, Any]:
    """Build the app over `out` and GET `url` in a child process; fail if it does not answer."""
    done = run_child(["-c", CHILD, out, url], timeout=TIMEOUT_S, what=f"GET {url} on a FIFO")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["file", "tar", "zip"])
def test_a_fifo_in_place_of_a_recorded_source_is_refused(screened, tmp_path, which):
    """issue 16 #10: GET /api/image/<key> waited forever on a FIFO at the recorded source."""
    src, real, keys = screened["src"], screened["real"], screened["keys"]
    source, key = {
        "file": (src / real[0].name, keys[real[0].name]),
        "tar": (src / "scans.tar", keys[real[2].name]),
        "zip": (src / "scans.zip", keys[real[3].name]),
    }[which]
    original = source.read_bytes()
    replace_with_fifo(source)
    try:
        got = ask(screened["out"], f"/api/image/{key}")
    finally:
        source.unlink()
        source.write_bytes(original)
    assert got["status"] == 404, got
    assert "not a regular file" in got["text"], got


@pytest.mark.parametrize(
    "relative", ["run.json", "predictions/part-00000.parquet", "index.usearch"]
)
def test_a_fifo_in_place_of_the_runs_own_files_is_refused(screened, tmp_path, relative):
    """issue 16 #10: run.json, a Parquet part or index.usearch as a FIFO hung the server too."""
    out = tmp_path / "out"
    shutil.copytree(screened["out"], out)
    replace_with_fifo(out / relative)
    if relative == "run.json":  # `cxr serve` stops with the message
        got = ask(out, "/api/run")
        assert got["status"] is None and "run.json: not a regular file" in got["text"], got
    elif relative.startswith("predictions"):  # not a part: the table shows the others
        got = ask(out, "/api/images")
        assert got["status"] == 200, got
        assert json.loads(got["text"])["total"] == len(screened["keys"]) - 2  # shard_size 2
    else:
        got = ask(out, f"/api/similar/{next(iter(screened['keys'].values()))}")
        assert got["status"] == 422 and "not a regular file" in got["text"], got
