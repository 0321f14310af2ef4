"""`cxr serve`: the web app over one `cxr screen` output directory (FastAPI, run by uvicorn).

JSON API (keys are strings in JSON: JavaScript numbers cannot hold a uint64):

    GET  /api/run                       run.json facts, and whether path queries are allowed
    GET  /api/images?offset&limit&sort&desc&decision&status&prob_min&prob_max&q&run
                                        one page of the table, and the filtered total
                                        (run: only the rows that run wrote)
    GET  /api/runs                      the runs recorded in run.json (as `cxr runs --json`)
    GET  /api/case/{key}                the row of one image
    GET  /api/image/{key}               the source image at full resolution, as an 8-bit PNG
    GET  /api/thumb/{key}               the thumbnail JPEG written by cxr screen
    GET  /api/mask/{key}?overlay=true   the lung mask (raw 1-bit PNG, or a coloured RGBA overlay)
    GET  /api/similar/{key}?k=8         the k most similar screened cases (the image excluded)
    POST /api/query?k=8                 body: an image file; runs the run's pipeline on it and
                                        answers its k most similar screened cases
    POST /api/query-path                {"path": ..., "k": 8}: the same for a file on this machine
                                        (only while the app listens on loopback)
    GET  /api/summary                   counts, score histogram, evaluation metrics if any
    GET  /api/report/{name}             report.html, roc.png, pr.png, reliability.png, metrics.json

Images are read only from the `source`/`member` recorded in the run's rows, by key; there is no
endpoint that takes a path to read an image back. The page itself is static HTML/JS/CSS served
from engine/serve/static (no build step, nothing from a CDN).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from engine.errors import ConfigError, EngineError
from engine.io.probe import sniff_format
from engine.serve import images
from engine.serve.store import Filters, RunStore, display_name, parse_key, row_json

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD = 64 << 20
_IMMUTABLE = {"Cache-Control": "private, max-age=86400"}  # a key's bytes never change (sha256)
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def create_app(
    out: Path,
    *,
    models_dir: Path | None = None,
    report_dir: Path | None = None,
    allowed_hosts: list[str] | None = None,
    allow_path_queries: bool = True,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> FastAPI:
    """The app over `out`. `allowed_hosts` guards against DNS rebinding (None: any Host)."""
    store = RunStore(out, report_dir=report_dir)
    max_pixels = int(store.run_info().get("max_pixels") or 100_000_000)
    app = FastAPI(title="cxr serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    allowed = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if allowed is not None and host_name(request.headers.get("host", "")) not in allowed:
            return JSONResponse({"detail": "unknown Host header"}, status_code=400)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    @app.exception_handler(ConfigError)
    async def bad_request(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(images.Unavailable)
    async def unavailable(request: Request, exc: images.Unavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def known_row(key: str) -> dict[str, Any]:
        row = store.row(parse_key(key))
        if row is None:
            raise HTTPException(404, f"no image with key {key} in this run")
        return row

    # -- pages -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- table -----------------------------------------------------------------------------

    @app.get("/api/run")
    def run() -> dict[str, Any]:
        info = store.run_info()
        info.pop("max_pixels", None)
        return {**info, "path_queries": allow_path_queries, "max_upload_bytes": max_upload_bytes}

    @app.get("/api/images")
    def table(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        sort: str = "key",
        desc: bool = False,
        decision: Annotated[str | None, Query(pattern="^(positive|negative)$")] = None,
        status: Annotated[str | None, Query(pattern="^(ok|error)$")] = None,
        prob_min: Annotated[float | None, Query(ge=0, le=1)] = None,
        prob_max: Annotated[float | None, Query(ge=0, le=1)] = None,
        q: Annotated[str | None, Query(max_length=200)] = None,
        run: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        filters = Filters(
            decision=decision,  # type: ignore[arg-type]  # checked by the pattern
            status=status,  # type: ignore[arg-type]
            prob_min=prob_min,
            prob_max=prob_max,
            text=q or None,
            run=run or None,
        )
        page = store.page(filters, sort=sort, descending=desc, offset=offset, limit=limit)
        return {"total": page.total, "offset": page.offset, "limit": page.limit, "rows": page.rows}

    @app.get("/api/runs")
    def recorded_runs() -> dict[str, Any]:
        from engine.nightly.runs import list_runs

        try:
            return {"runs": list_runs(store.out)}
        except EngineError:  # no run.json (yet): the table still works
            return {"runs": []}

    # -- one case --------------------------------------------------------------------------

    @app.get("/api/case/{key}")
    def case(key: str) -> dict[str, Any]:
        return row_json(known_row(key))

    @app.get("/api/image/{key}")
    def image(key: str) -> Response:
        row = known_row(key)
        png = images.render_png(images.read_recorded(row), max_pixels=max_pixels)
        return Response(png, media_type="image/png", headers=_IMMUTABLE)

    def previews(key: str) -> tuple[bytes, bytes]:
        k = parse_key(key)
        found = store.previews(k)
        if found is None:
            why = "no image with this key" if store.part_of(k) is None else "no preview (error row)"
            raise HTTPException(404, f"{key}: {why}")
        return found

    @app.get("/api/thumb/{key}")
    def thumb(key: str) -> Response:
        return Response(previews(key)[0], media_type="image/jpeg", headers=_IMMUTABLE)

    @app.get("/api/mask/{key}")
    def mask(key: str, overlay: bool = True) -> Response:
        png = previews(key)[1]
        if overlay:
            png = images.mask_overlay(png)
        return Response(png, media_type="image/png", headers=_IMMUTABLE)

    # -- similar cases ---------------------------------------------------------------------

    @app.get("/api/similar/{key}")
    def similar_to_key(key: str, k: Annotated[int, Query(ge=1, le=100)] = 8) -> dict[str, Any]:
        known_row(key)
        return _similar(store, str(parse_key(key)), k, models_dir)

    @app.post("/api/query")
    async def query_upload(
        request: Request, k: Annotated[int, Query(ge=1, le=100)] = 8
    ) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise HTTPException(413, f"the image is larger than {max_upload_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise HTTPException(413, f"the image is larger than {max_upload_bytes} bytes")
        if not body:
            raise HTTPException(400, "empty upload: send the image file as the request body")
        return await run_in_threadpool(_similar_bytes, store, bytes(body), k, models_dir)

    @app.post("/api/query-path")
    async def query_path(request: Request) -> dict[str, Any]:
        if not allow_path_queries:
            raise HTTPException(
                403, "path queries are off while the app is reachable from other machines"
            )
        try:
            doc = json.loads(await request.body())
            path, k = str(doc["path"]), int(doc.get("k", 8))
        except (ValueError, KeyError, TypeError):
            raise HTTPException(400, 'send JSON {"path": "/a/file.png", "k": 8}') from None
        if not 1 <= k <= 100:
            raise HTTPException(400, "k must be between 1 and 100")
        if not os.path.isfile(path):
            raise HTTPException(404, "no such file on the server")
        return await run_in_threadpool(_similar, store, os.path.abspath(path), k, models_dir)

    # -- summary ---------------------------------------------------------------------------

    @app.get("/api/summary")
    def summary() -> dict[str, Any]:
        return {**store.summary(), "run": store.run_info(), "report": store.report_metrics()}

    @app.get("/api/report/{name}")
    def report(name: str) -> FileResponse:
        path = store.report_file(name)
        if path is None:
            raise HTTPException(404, f"no {name} in the evaluation report folder")
        return FileResponse(path, media_type=store.REPORT_FILES[name])

    return app


def host_name(header: str) -> str:
    """The host of a Host header, without the port: "[::1]:8000" -> "[::1]"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.split(":", 1)[0]


def _similar(store: RunStore, query: str, k: int, models_dir: Path | None) -> dict[str, Any]:
    from engine.similar import similar

    try:
        result = similar(store.out, query, k=k, models_dir=models_dir)
    except ConfigError as exc:
        raise HTTPException(400, str(exc)) from None
    except EngineError as exc:
        raise HTTPException(422, str(exc)) from None
    neighbours = []
    for n in result.neighbours:
        row = store.row(n.key) or {}
        neighbours.append(
            {
                "rank": n.rank,
                "key": str(n.key),
                "similarity": n.similarity,
                "prob": n.prob,
                "decision": n.decision,
                "status": row.get("status"),
                "source": n.source,
                "member": n.member,
                "name": display_name(n.source, n.member),
            }
        )
    return {
        "query_key": None if result.query_key is None else str(result.query_key),
        "neighbours": neighbours,
    }


def _similar_bytes(store: RunStore, data: bytes, k: int, models_dir: Path | None) -> dict[str, Any]:
    """Write an uploaded image to a private temp folder and query with it like a file."""
    suffix = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}.get(sniff_format(data) or "", ".bin")
    with tempfile.TemporaryDirectory(prefix="cxr-serve-") as tmp:
        path = Path(tmp) / f"query{suffix}"
        path.write_bytes(data)
        result = _similar(store, str(path), k, models_dir)
    result["query_key"] = None  # the temp file's key means nothing to the page
    return result
