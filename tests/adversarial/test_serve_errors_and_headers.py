"""Out-of-range numbers and the headers of error responses in `cxr serve` (issue 16 #8).

`GET /api/images?offset=99999999999999999999` was a 500 (OverflowError), and that 500, like the
400 of the Host check, came without the security headers every other response carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import copy_images, dev_images, screen_folder

pytest.importorskip("fastapi")
pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2")

from fastapi.testclient import TestClient  # noqa: E402

HUGE = "99999999999999999999"  # above 2**64


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adv-headers")
    src = copy_images(root / "in", dev_images(3))
    (src / "broken.png").write_text("not an image\n")
    out = root / "out"
    rows = pl.DataFrame(screen_folder([src], out, tiny_models_dir))
    ok = str(rows.filter(pl.col("status") == "ok")["key"][0])
    error = str(rows.filter(pl.col("status") == "error")["key"][0])
    return {"out": out, "ok": ok, "error": error, "image": next(src.glob("*.png"))}


def client_of(out: Path, **options: Any) -> TestClient:
    from engine.serve.app import create_app

    return TestClient(create_app(out, **options), raise_server_exceptions=False)


def _bad(route: str, param: str, *values: str) -> list[tuple[str, dict[str, str]]]:
    return [(route, {param: v}) for v in values]


BAD_NUMBERS = [
    *_bad("/api/images", "offset", HUGE, str(2**63), str(2**53), "-1", "1e3", "ten"),
    *_bad("/api/images", "limit", "0", "501", HUGE),
    *_bad("/api/images", "prob_min", "nan", "-0.5"),
    *_bad("/api/images", "prob_max", "inf", "1e400"),
    *_bad("/api/images", "desc", "maybe"),
    *_bad("/api/similar/{ok}", "k", "0", "101", HUGE, "nan"),
    *_bad("/api/mask/{ok}", "overlay", "maybe"),
    ("/api/case/" + HUGE, {}),
    ("/api/image/-1", {}),
]


@pytest.mark.parametrize(
    ("route", "params"),
    BAD_NUMBERS,
    ids=[f"{r.split('/')[2]}-{'&'.join(f'{k}={v}' for k, v in p.items())}" for r, p in BAD_NUMBERS],
)
def test_numbers_out_of_range_are_400_with_a_json_message(served, route, params):
    """issue 16 #8: every numeric parameter is range-checked: 400 and a message, never a 500."""
    client = client_of(served["out"])
    r = client.get(route.format(ok=served["ok"]), params=params)
    assert r.status_code == 400, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    for name in params:
        assert name in detail, detail


def test_an_upload_with_a_bad_k_is_400(served):
    """issue 16 #8: the same for the query string of the POST route."""
    client = client_of(served["out"])
    headers = {"Content-Type": "application/octet-stream", "X-CXR-Token": client.app.state.token}
    image = served["image"].read_bytes()
    for k in ("0", "101", HUGE):
        r = client.post("/api/query", params={"k": k}, content=image, headers=headers)
        assert r.status_code == 400 and "k" in r.json()["detail"], r.text


def assert_secured(response, what: str) -> None:
    h = response.headers
    assert h.get("x-content-type-options") == "nosniff", what
    assert h.get("referrer-policy") == "no-referrer", what
    csp = h.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, what


def test_every_response_carries_the_security_headers(served, monkeypatch):
    """issue 16 #8: 200, 400, 403, 404, 405, 413, 415, 422 and 500 answers alike."""
    client = client_of(served["out"], max_upload_bytes=1000)
    ok, error = served["ok"], served["error"]
    token = client.app.state.token
    octet = {"Content-Type": "application/octet-stream", "X-CXR-Token": token}

    def boom() -> dict[str, Any]:
        raise RuntimeError("a bug in a route")

    monkeypatch.setattr(client.app.state.store, "summary", boom)
    cases = [
        (200, "GET", "/", {}),
        (200, "GET", "/static/app.js", {}),
        (200, "GET", "/api/run", {}),
        (200, "GET", "/api/images", {}),
        (200, "GET", f"/api/images?offset={2**53 - 1}", {}),  # any offset a JS number holds
        (200, "GET", f"/api/case/{ok}", {}),
        (200, "GET", f"/api/image/{ok}", {}),
        (200, "GET", f"/api/thumb/{ok}", {}),
        (200, "GET", f"/api/mask/{ok}", {}),
        (200, "GET", f"/api/similar/{ok}?k=2", {}),
        (400, "GET", f"/api/images?offset={HUGE}", {}),
        (400, "GET", "/api/images?limit=0", {}),
        (400, "GET", "/api/case/not-a-key", {}),
        (400, "POST", "/api/query", {"headers": octet}),  # empty body
        (403, "POST", "/api/query", {"headers": {"Content-Type": "image/png"}, "content": b"x"}),
        (404, "GET", "/api/case/1", {}),
        (404, "GET", "/no/such/route", {}),
        (404, "GET", "/static/no-such.js", {}),
        (404, "GET", "/api/report/roc.png", {}),
        (404, "GET", f"/api/thumb/{error}", {}),
        (405, "DELETE", "/api/run", {}),
        (405, "GET", "/api/query", {}),
        (413, "POST", "/api/query", {"headers": octet, "content": bytes(2000)}),
        (415, "POST", "/api/query", {"headers": {"Content-Type": "text/plain"}, "content": b"x"}),
        (422, "GET", f"/api/image/{error}", {}),
        (422, "GET", f"/api/similar/{error}", {}),
        (500, "GET", "/api/summary", {}),
    ]
    for status, method, url, kwargs in cases:
        r = client.request(method, url, **kwargs)
        assert r.status_code == status, (method, url, r.status_code, r.text[:200])
        assert_secured(r, f"{method} {url} -> {status}")
        if status >= 400 and not url.startswith("/static"):
            assert isinstance(r.json()["detail"], str), (url, r.text)
    assert "a bug in a route" not in client.get("/api/summary").text  # no internals leak

    guarded = client_of(served["out"], allowed_hosts=["127.0.0.1"])
    r = guarded.get("/api/run", headers={"Host": "evil.example"})
    assert r.status_code == 400
    assert_secured(r, "Host check")
