"""`cxr serve`: the JSON API over a real screening run (FastAPI's TestClient, no sockets).

One run per module: real CXRs from ../shared/data (PNG and JPEG), a 16-bit PNG and a DICOM made
from real images, one image inside a tar, one file that is no image (an error row), screened
with the tiny models in parts of 8 rows, then scored by `cxr evaluate` into OUT/report. Expected
tables are computed here in plain Python from the Parquet rows, independently of the app.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from conftest import dev_images, dicom_file, screen_at_median, screen_folder

pytest.importorskip("fastapi")
pytest.importorskip("httpx2", reason="FastAPI's TestClient needs httpx2")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

PATIENT_ID = "SERVE-PAT-42"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
SOP_UID = "1.2.826.0.1.3680043.8.498.4243"
SEARCHED = ("source", "member", "patient_id", "study_uid", "sop_uid")


def make_dicom(pixels: np.ndarray) -> bytes:
    """A 12-bit MONOCHROME2 DX DICOM of a real image's pixels, with ids to search for."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    return dicom_file(
        (pixels.astype(np.uint16) * 16).astype("<u2"),
        sop_uid=SOP_UID,
        study_uid=STUDY_UID,
        patient_id=PATIENT_ID,
        sop_class=DigitalXRayImageStorageForPresentation,
        bits_stored=12,
    )


def build_inputs(root: Path, n_plain: int) -> dict[str, Path]:
    """root/in: n_plain real CXRs, a 16-bit PNG, a DICOM, a tar with one member, a copy to be
    changed later, and a text file named .png. Returns the special files by role."""
    real = dev_images(n_plain + 4)
    src = root / "in"
    src.mkdir(parents=True)
    for p in real[:n_plain]:
        shutil.copy(p, src / p.name)
    gray = np.asarray(Image.open(real[n_plain]).convert("L"), np.uint16)
    sixteen = src / "sixteen-bit.png"
    Image.fromarray(gray * 200 + 1000).save(sixteen)  # 16-bit, not 0-based: min-max matters
    dicom = src / "study.dcm"
    dicom.write_bytes(make_dicom(np.asarray(Image.open(real[n_plain + 1]).convert("L"))))
    archive = src / "archive.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(real[n_plain + 2], arcname=f"nested/dir/{real[n_plain + 2].name}")
    changed = src / "to-be-changed.png"
    shutil.copy(real[n_plain + 3], changed)
    broken = src / "broken.png"
    broken.write_text("this is not an image\n")
    labels = root / "labels.csv"
    all_labels = pl.read_csv(real[0].parent.parent / "labels.csv")
    by_name = dict(
        zip(all_labels["path"].str.split("/").list.last(), all_labels["label"], strict=True)
    )
    rows = [(p.name, by_name[p.name]) for p in real[:n_plain]]
    rows += [(sixteen.name, by_name[real[n_plain].name])]
    pl.DataFrame(rows, schema=["path", "label"], orient="row").write_csv(labels)
    return {
        "dir": src,
        "sixteen": sixteen,
        "dicom": dicom,
        "archive": archive,
        "changed": changed,
        "broken": broken,
        "labels": labels,
        "query": real[1],
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("serve")
    files = build_inputs(root, n_plain=18)
    out = screen_at_median(files["dir"], root, tiny_models_dir, shard_size=8, batch_size=8)
    from engine.eval.evaluate import EvalConfig, evaluate

    evaluate(
        EvalConfig(
            out=out,
            labels=files["labels"],
            images=files["dir"],
            report=out / "report",
            bootstrap=20,
        )
    )
    rows = pl.read_parquet(sorted((out / "predictions").glob("part-*.parquet")))
    return {"out": out, "files": files, "rows": rows.to_dicts(), "models": tiny_models_dir}


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    from engine.serve.app import create_app

    return TestClient(create_app(run["out"]))


def key_of(run: dict[str, Any], *, source: Path | None = None, member: str | None = None) -> str:
    for r in run["rows"]:
        if (source is None or r["source"] == str(source)) and (
            member is None or member in (r["member"] or "")
        ):
            return str(r["key"])
    raise AssertionError(f"no row for {source} {member}")


# ------------------------------------------------------------------------------------ table


def expected_keys(rows: list[dict[str, Any]], params: dict[str, Any]) -> list[str]:
    """The table's contract, in plain Python: filter, sort (nulls last, key breaks ties)."""
    picked = []
    for r in rows:
        if params.get("decision") and r["decision"] != (params["decision"] == "positive"):
            continue
        if params.get("status") and r["status"] != params["status"]:
            continue
        if "prob_min" in params and (r["prob"] is None or r["prob"] < params["prob_min"]):
            continue
        if "prob_max" in params and (r["prob"] is None or r["prob"] > params["prob_max"]):
            continue
        needle = params.get("q", "").strip().lower()
        if needle and not (
            any(needle in (r[c] or "").lower() for c in SEARCHED)
            or (needle.isdigit() and needle in str(r["key"]))
        ):
            continue
        picked.append(r)
    sort, desc = params.get("sort", "key"), params.get("desc", False)
    present = sorted((r for r in picked if r[sort] is not None), key=lambda r: r["key"])
    present.sort(key=lambda r: r[sort], reverse=desc)  # stable: ties keep key order
    missing = sorted((r for r in picked if r[sort] is None), key=lambda r: r["key"])
    return [str(r["key"]) for r in present + missing]


def all_pages(client: TestClient, params: dict[str, Any], limit: int = 4) -> tuple[int, list[str]]:
    keys: list[str] = []
    offset, total = 0, None
    while True:
        query = {**params, "offset": offset, "limit": limit}
        if "desc" in query:
            query["desc"] = str(query["desc"]).lower()
        r = client.get("/api/images", params=query)
        assert r.status_code == 200, r.text
        page = r.json()
        total = page["total"] if total is None else total
        assert page["total"] == total and len(page["rows"]) <= limit
        keys += [row["key"] for row in page["rows"]]
        offset += limit
        if offset >= total:
            return total, keys


TABLE_CASES = [
    {},
    {"sort": "prob", "desc": True},
    {"sort": "prob"},
    {"sort": "source"},
    {"sort": "member", "desc": True},
    {"sort": "lung_fraction", "desc": True},
    {"sort": "patient_id"},
    {"sort": "status", "desc": True},
    {"decision": "positive", "sort": "prob", "desc": True},
    {"decision": "negative"},
    {"status": "error"},
    {"status": "ok", "prob_min": 0.2, "prob_max": 0.4, "sort": "prob"},
    {"q": "NESTED/dir"},
    {"q": "serve-pat"},
    {"q": STUDY_UID[-6:]},
    {"q": ".jpg", "sort": "source", "desc": True},
    {"q": "no such thing"},
]


@pytest.mark.parametrize(
    "params", TABLE_CASES, ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()) or "all"
)
def test_table_pages_match_independent_sort_and_filter(client, run, params):
    total, keys = all_pages(client, params)
    want = expected_keys(run["rows"], params)
    assert total == len(want)
    assert keys == want


def test_table_has_both_decisions_an_error_and_several_parts(run):
    rows = run["rows"]
    assert {r["decision"] for r in rows} == {True, False, None}
    assert sum(r["status"] == "error" for r in rows) == 1
    assert len(list((run["out"] / "predictions").glob("part-*.parquet"))) >= 3


def test_table_row_shape(client, run):
    rows = client.get("/api/images", params={"q": "serve-pat"}).json()["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert isinstance(row["key"], str) and row["key"].isdigit()  # uint64 stays exact in JS
    assert row["patient_id"] == PATIENT_ID and row["format"] == "dicom"
    assert row["name"] == "study.dcm" and row["status"] == "ok"
    assert len(row["lung_bbox"]) == 4 and 0 <= row["lung_fraction"] <= 1


@pytest.mark.parametrize(
    "query",
    [
        {"sort": "sha256; drop"},
        {"limit": 0},
        {"limit": 501},
        {"offset": -1},
        {"decision": "maybe"},
        {"status": "all"},
        {"prob_min": 1.5},
    ],
)
def test_table_refuses_bad_parameters(client, query):
    assert client.get("/api/images", params=query).status_code in (400, 422)


# ------------------------------------------------------------------------------------- case


def test_case_returns_the_recorded_row(client, run):
    for r in run["rows"]:
        got = client.get(f"/api/case/{r['key']}").json()
        assert got["key"] == str(r["key"])
        for name in ("source", "member", "status", "error", "sha256", "patient_id", "width"):
            assert got[name] == r[name], name
        if r["prob"] is not None:
            assert got["prob"] == pytest.approx(r["prob"])
            assert got["lung_bbox"] == list(r["lung_bbox"])


def decode(content: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(content))
    im.load()
    return im


@pytest.mark.parametrize("which", ["plain-png", "plain-jpeg", "sixteen", "dicom", "tar-member"])
def test_image_endpoint_renders_each_source_kind(client, run, which):
    files = run["files"]
    if which == "plain-png":
        key = next(
            str(r["key"]) for r in run["rows"] if r["format"] == "png" and r["bit_depth"] == 8
        )
    elif which == "plain-jpeg":
        key = next(str(r["key"]) for r in run["rows"] if r["format"] == "jpeg" and not r["member"])
    elif which == "tar-member":
        key = key_of(run, source=files["archive"], member="nested/dir/")
    else:
        key = key_of(run, source=files[which])
    row = client.get(f"/api/case/{key}").json()
    r = client.get(f"/api/image/{key}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = decode(r.content)
    assert im.size == (row["width"], row["height"])
    assert im.mode in ("L", "RGB")
    if which in ("sixteen", "dicom"):  # stretched to the full 8-bit range
        px = np.asarray(im)
        assert px.min() == 0 and px.max() == 255


def test_sixteen_bit_is_min_max_stretched(client, run):
    key = key_of(run, source=run["files"]["sixteen"])
    source = np.asarray(Image.open(run["files"]["sixteen"]), np.float64)
    shown = np.asarray(decode(client.get(f"/api/image/{key}").content), np.float64)
    want = (source - source.min()) * 255.0 / (source.max() - source.min())
    assert np.abs(shown - want).max() <= 0.5 + 1e-9


def test_image_of_a_changed_file_is_refused(client, run):
    key = key_of(run, source=run["files"]["changed"])
    assert client.get(f"/api/image/{key}").status_code == 200
    path = run["files"]["changed"]
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-10] + b"0123456789")
        r = client.get(f"/api/image/{key}")
        assert r.status_code == 409 and "changed" in r.json()["detail"]
    finally:
        path.write_bytes(original)


def test_image_of_the_error_row_is_refused_with_a_reason(client, run):
    key = key_of(run, source=run["files"]["broken"])
    r = client.get(f"/api/image/{key}")
    assert r.status_code == 422 and r.json()["detail"]


def test_thumb_and_mask(client, run):
    key = key_of(run, source=run["files"]["dicom"])
    row = client.get(f"/api/case/{key}").json()
    thumb = client.get(f"/api/thumb/{key}")
    assert thumb.headers["content-type"] == "image/jpeg"
    im = decode(thumb.content)
    assert max(im.size) == 256
    assert im.size[0] / im.size[1] == pytest.approx(row["width"] / row["height"], rel=0.02)
    raw = decode(client.get(f"/api/mask/{key}", params={"overlay": "false"}).content)
    assert raw.size[0] == raw.size[1]  # the square work frame
    overlay = decode(client.get(f"/api/mask/{key}").content)
    assert overlay.mode == "RGBA" and overlay.size == raw.size
    alpha = np.asarray(overlay)[..., 3]
    lung = np.asarray(raw.convert("L")) > 0
    assert ((alpha > 0) == lung).all() and lung.any()
    assert lung.mean() == pytest.approx(row["lung_fraction"], abs=1e-6)
    broken = key_of(run, source=run["files"]["broken"])
    assert client.get(f"/api/thumb/{broken}").status_code == 404
    assert client.get(f"/api/mask/{broken}").status_code == 404


# ---------------------------------------------------------------------------------- similar


def test_similar_by_key_excludes_itself_and_matches_the_engine(client, run):
    from engine.similar import similar

    key = key_of(run, source=run["files"]["dicom"])
    got = client.get(f"/api/similar/{key}", params={"k": 5}).json()
    keys = [n["key"] for n in got["neighbours"]]
    assert len(keys) == 5 and key not in keys and len(set(keys)) == 5
    sims = [n["similarity"] for n in got["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    engine = similar(run["out"], key, k=5)
    assert keys == [str(n.key) for n in engine.neighbours]
    in_run = {str(r["key"]): r for r in run["rows"]}
    for n in got["neighbours"]:
        assert in_run[n["key"]]["status"] == "ok"
        assert n["prob"] == pytest.approx(in_run[n["key"]]["prob"])


def test_similar_of_unknown_or_error_keys(client, run):
    assert client.get("/api/similar/12345").status_code == 404
    broken = key_of(run, source=run["files"]["broken"])
    assert client.get(f"/api/similar/{broken}").status_code == 422  # no embedding


def upload(client: TestClient, data: bytes, **params: Any):
    """POST an image as the page does: octet-stream, with the token of the page it served."""
    headers = {"Content-Type": "application/octet-stream", "X-CXR-Token": client.app.state.token}
    return client.post("/api/query", params=params, content=data, headers=headers)


def test_upload_runs_the_pipeline_and_finds_the_same_image_first(client, run):
    query = run["files"]["query"]  # a real CXR that was also screened (a copy in in/)
    r = upload(client, query.read_bytes(), k=3)
    assert r.status_code == 200, r.text
    got = r.json()["neighbours"]
    assert len(got) == 3
    assert got[0]["key"] == key_of(run, source=run["files"]["dir"] / query.name)
    assert got[0]["similarity"] > 0.999


def test_upload_refusals(run):
    from engine.serve.app import create_app

    small = TestClient(create_app(run["out"], max_upload_bytes=1000))
    image = run["files"]["query"].read_bytes()
    assert upload(small, image).status_code == 413
    assert upload(small, b"").status_code == 400
    r = upload(small, b"not an image at all")
    assert r.status_code == 422 and "cannot screen" in r.json()["detail"]


# --------------------------------------------------------------------------------- security

TRAVERSALS = [
    "/api/image/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/image/%2Fetc%2Fpasswd",
    "/api/image/..",
    "/api/image/-1",
    "/api/image/1e3",
    "/api/image/18446744073709551616",  # 2**64
    "/api/image/99999999999999999999999999",
    "/api/image/1",  # a key, but not in this run
    "/api/thumb/..%2Frun.json",
    "/api/mask/%2E%2E",
    "/api/case/..%2F..%2Fetc%2Fpasswd",
    "/api/similar/%2Fetc%2Fpasswd",
    "/api/report/..%2Frun.json",
    "/api/report/run.json",
    "/api/report/%2Fetc%2Fpasswd",
    "/static/..%2F..%2Frun.json",
    "/static/%2E%2E/%2E%2E/store.py",
    "/api/image?path=/etc/passwd",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_paths_and_unknown_keys_are_refused(client, url):
    r = client.get(url)
    assert r.status_code in (400, 404, 405, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"run_id" not in r.content


def test_foreign_host_header_is_refused(run):
    from engine.serve.app import create_app

    guarded = TestClient(create_app(run["out"], allowed_hosts=["127.0.0.1", "localhost"]))
    assert guarded.get("/api/run", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert guarded.get("/api/run", headers={"Host": "evil.example:8000"}).status_code == 400


def test_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_missing_run_directory_is_an_engine_error(tmp_path):
    from engine.errors import EngineError
    from engine.serve.app import create_app

    with pytest.raises(EngineError, match="predictions"):
        create_app(tmp_path)


# ---------------------------------------------------------------------------------- summary


def test_summary_counts_histogram_and_report(client, run):
    s = client.get("/api/summary").json()
    rows = run["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert s["counts"] == {
        "total": len(rows),
        "ok": len(ok),
        "error": len(rows) - len(ok),
        "positive": sum(bool(r["decision"]) for r in ok),
        "negative": sum(not r["decision"] for r in ok),
    }
    hist = s["histogram"]["counts"]
    assert sum(hist) == len(ok)
    for r in ok:
        assert hist[min(int(r["prob"] * 20), 19)] > 0
    assert s["run"]["trained"] is False
    report = s["report"]
    assert report is not None and set(report["plots"]) == {"roc.png", "pr.png"}
    assert "roc_auc" in report["overall"]["metrics"]
    png = client.get("/api/report/roc.png")
    assert png.status_code == 200 and decode(png.content).size[0] > 100
    assert client.get("/api/report/report.html").status_code == 200


def test_summary_without_report_and_report_dir_option(run, tmp_path):
    from engine.serve.app import create_app

    bare = TestClient(create_app(run["out"], report_dir=tmp_path / "none"))
    assert bare.get("/api/summary").json()["report"] is None
    assert bare.get("/api/report/roc.png").status_code == 404
    moved = tmp_path / "elsewhere"
    shutil.copytree(run["out"] / "report", moved)
    elsewhere = TestClient(create_app(run["out"], report_dir=moved))
    assert elsewhere.get("/api/summary").json()["report"]["plots"] == ["roc.png", "pr.png"]


def test_new_parts_are_picked_up_while_serving(run, tmp_path):
    """A `cxr screen` still adding to the directory: the next request sees the new rows."""
    from engine.serve.app import create_app

    out = tmp_path / "growing"
    shutil.copytree(run["out"], out)
    app = TestClient(create_app(out))
    before = app.get("/api/images").json()["total"]
    extra = tmp_path / "extra"
    extra.mkdir()
    new = dev_images(26)[-1]
    shutil.copy(new, extra / new.name)
    # the run's own threshold: another one on the same directory is refused (issue 16)
    threshold = run["rows"][0]["threshold"]
    screen_folder([extra], out, run["models"], threshold=threshold)
    got = app.get("/api/images", params={"q": new.name}).json()
    assert app.get("/api/images").json()["total"] == before + 1
    assert got["total"] == 1
    assert app.get(f"/api/thumb/{got['rows'][0]['key']}").status_code == 200


# -------------------------------------------------------------------------------------- cli


def test_cli_serve_checks_and_builds_the_app(run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from engine.serve import cli as serve_cli

    app = typer.Typer()
    app.command()(serve_cli.serve)
    runner = CliRunner()
    missing = runner.invoke(app, [str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such directory" in missing.stderr
    bad_port = runner.invoke(app, [str(run["out"]), "--port", "0"])
    assert bad_port.exit_code == 1 and "--port" in bad_port.stderr
    built = serve_cli.build_app(
        run["out"], models=None, report=None, host="127.0.0.1", port=8000, max_upload_mb=1
    )
    local = TestClient(built, base_url="http://127.0.0.1:8000")
    assert local.get("/api/run").json()["max_upload_bytes"] == 1 << 20
    assert serve_cli.is_loopback("::1") and not serve_cli.is_loopback("0.0.0.0")
    exposed = serve_cli.build_app(
        run["out"], models=None, report=None, host="0.0.0.0", port=8000, max_upload_mb=1
    )
    remote = TestClient(exposed, base_url="http://192.0.2.7:8000")
    assert remote.get("/api/run").status_code == 200  # no Host check off loopback
    assert TestClient(built, base_url="http://evil.example").get("/api/run").status_code == 400
