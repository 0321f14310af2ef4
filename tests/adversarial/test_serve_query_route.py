"""Hostile requests to the query routes of `cxr serve` (issue 16 #3).

A web page on another site can make the reviewer's browser send "simple" cross-site requests
(text/plain, form encodings, no custom header) to the loopback server without a CORS preflight.
None of them may read a file named by the request, tell whether a path exists, echo a file's
bytes, or start the pipeline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_images, dev_images, screen_folder

pytest.importorskip("fastapi")
pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2")

from fastapi.testclient import TestClient  # noqa: E402

SECRET = "root:*:19000:0:99999:7:::\nTOPSECRET-5f1c\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adv-query")
    images = dev_images(3)
    src = copy_images(root / "in", images)
    out = root / "out"
    screen_folder([src], out, tiny_models_dir)
    secret = root / "shadow"
    secret.write_text(SECRET)
    return {"out": out, "secret": secret, "image": src / images[0].name, "root": root}


def page_token(client: TestClient) -> str:
    """The token the served page carries, found the way the page's script finds it ("" if none:
    the requests below must be refused even when they carry the right token)."""
    found = re.search(r'<meta name="cxr-token" content="([^"]+)"', client.get("/").text)
    return found.group(1) if found else ""


def answer(response) -> tuple[int, bytes]:
    return response.status_code, response.content


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_no_route_reads_a_path_sent_by_the_client(served, content_type):
    """issue 16 #3: POST /api/query-path leaked a file's first bytes and whether it existed."""
    from engine.serve.app import create_app

    client = TestClient(create_app(served["out"]))
    headers = {"Content-Type": content_type, "X-CXR-Token": page_token(client)}
    answers = {}
    for name, path in {
        "secret": served["secret"],
        "missing": served["root"] / "no-such-file",
        "directory": served["root"],
        "image": served["image"],
    }.items():
        body = f'{{"path": "{path}", "k": 2}}'.encode()
        r = client.post("/api/query-path", content=body, headers=headers)
        assert r.status_code >= 400, (name, r.status_code)
        for leak in (b"root:", b"TOPSECRET", b"first bytes"):
            assert leak not in r.content, (name, r.text)
        answers[name] = answer(r)
    # the same answer whatever the path: no oracle for which files exist or are images
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ],
)
def test_upload_refuses_content_types_that_skip_the_cors_preflight(served, content_type):
    """issue 16 #3: a cross-site form or text/plain fetch could start the pipeline (415 now)."""
    from engine.serve.app import create_app

    client = TestClient(create_app(served["out"]))
    headers = {"X-CXR-Token": page_token(client)}
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = client.post("/api/query", content=served["image"].read_bytes(), headers=headers)
    assert r.status_code == 415, r.text
    assert "application/octet-stream" in r.json()["detail"]


def test_upload_needs_the_token_of_the_page_this_process_served(served):
    """issue 16 #3: state-changing routes need a per-process token from the served page."""
    from engine.serve.app import create_app

    client = TestClient(create_app(served["out"]))
    image = served["image"].read_bytes()
    plain = {"Content-Type": "application/octet-stream"}
    r = client.post("/api/query", content=image, headers=plain)
    assert r.status_code == 403 and "token" in r.json()["detail"]
    other = TestClient(create_app(served["out"]))
    assert page_token(client) and page_token(other) != page_token(client)
    wrong = {**plain, "X-CXR-Token": page_token(other)}
    assert client.post("/api/query", content=image, headers=wrong).status_code == 403
    good = {**plain, "X-CXR-Token": page_token(client)}
    r = client.post("/api/query", params={"k": 2}, content=image, headers=good)
    assert r.status_code == 200, r.text
    assert Path(r.json()["neighbours"][0]["source"]) == served["image"]
    # the token is not in any static file a cross-origin page could load as a script
    for name in ("app.js", "app.css"):
        assert page_token(client) not in client.get(f"/static/{name}").text
