"""`GET /api/image/<key>` on what the run refused or what changed since (issue 16 #4).

The run reads an archive member once; serving must not read it again on every request when the
run refused it (a zip bomb of zeros, a PNG header claiming billions of pixels), nor inflate a
member in full that no longer looks like the image the run screened.
"""

from __future__ import annotations

import shutil
import struct
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_images, dev_images, screen_folder

pytest.importorskip("fastapi")
pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2")

from fastapi.testclient import TestClient  # noqa: E402

BOMB_BYTES = 64 << 20  # zeros: deflate makes 64 KB of them
BOMB_SIDE = 60_000  # a 60000 x 60000 PNG: 3.6e9 pixels, far above --max-pixels


def png_claiming(side: int) -> bytes:
    """A small PNG whose header claims side x side 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adv-refused")
    real = dev_images(2)
    src = copy_images(root / "in", real[:1])
    members = {
        "scans/zeros.png": bytes(BOMB_BYTES),
        "scans/giant.png": png_claiming(BOMB_SIDE),
        "scans/real.png": real[1].read_bytes(),
    }
    write_zip(src / "archive.zip", members)
    (src / "zeros-file.png").write_bytes(bytes(1 << 20))
    out = root / "out"
    rows = screen_folder([src], out, tiny_models_dir)
    by_name = {(r["member"] or r["source"]).rsplit("/", 1)[-1]: r for r in rows}
    return {"out": out, "zip": src / "archive.zip", "members": members, "rows": by_name}


@pytest.fixture
def zip_reads(monkeypatch) -> dict[str, int]:
    """How many archive members are opened, and how many of their bytes are read."""
    seen = {"opened": 0, "bytes": 0}
    real_open, real_read = zipfile.ZipFile.open, zipfile.ZipExtFile.read

    def counting_open(self, *args, **kwargs):
        seen["opened"] += 1
        return real_open(self, *args, **kwargs)

    def counting_read(self, n=-1):
        data = real_read(self, n)
        seen["bytes"] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    return seen


@pytest.mark.parametrize("name", ["zeros.png", "giant.png", "zeros-file.png"])
def test_error_rows_are_not_read_again(served, zip_reads, name):
    """issue 16 #4: an error row re-inflated its member on every request (22 s, 4 GB for 4)."""
    from engine.serve.app import create_app

    row = served["rows"][name]
    assert row["status"] == "error" and row["sha256"]  # read once by the run, then refused
    client = TestClient(create_app(served["out"]))
    answers: list[Any] = []

    def get() -> None:
        answers.append(client.get(f"/api/image/{row['key']}"))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == 4
    assert zip_reads["opened"] == 0
    for r in answers:
        assert r.status_code == 422, r.text
        assert row["error"] in r.json()["detail"]  # the run's reason, not a new decode's


def test_a_member_swapped_for_a_bomb_is_refused_from_its_header(served, zip_reads, tmp_path):
    """issue 16 #4: a member that no longer looks like the screened image is not inflated."""
    from engine.serve.app import create_app

    row = served["rows"]["real.png"]
    assert row["status"] == "ok"
    out = tmp_path / "out"
    shutil.copytree(served["out"], out)
    client = TestClient(create_app(out))
    original = served["zip"].read_bytes()
    try:
        assert client.get(f"/api/image/{row['key']}").status_code == 200
        for swapped in (bytes(BOMB_BYTES), png_claiming(BOMB_SIDE) + bytes(BOMB_BYTES)):
            write_zip(served["zip"], {**served["members"], "scans/real.png": swapped})
            zip_reads["bytes"] = 0
            r = client.get(f"/api/image/{row['key']}")
            assert r.status_code == 409 and "changed" in r.json()["detail"], r.text
            assert zip_reads["bytes"] < 1 << 20, "the swapped member was inflated"
    finally:
        served["zip"].write_bytes(original)
