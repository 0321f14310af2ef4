"""`cxr serve`: the web app over one `cxr screen` output directory (FastAPI, run by uvicorn).

JSON API (keys are strings in JSON: JavaScript numbers cannot hold a uint64):

    GET  /api/run                       run.json facts and the upload limit
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
    GET  /api/summary                   counts, score histogram, evaluation metrics if any
    GET  /api/report/{name}             report.html, roc.png, pr.png, reliability.png, metrics.json

Errors are JSON {"detail": "a message"}: 400 for a parameter of the wrong type or out of range,
404, 405, 409 (a source changed since screening), 413, 415, 422 (an image that cannot be shown)
and 500 alike; every response, errors included, carries SECURITY_HEADERS.

Images are read only from the `source`/`member` recorded in the run's rows, by key; no endpoint
takes a path. The page itself is static HTML/JS/CSS served from engine/serve/static (no build
step, nothing from a CDN).

Cross-site requests: a page on another site can make the reviewer's browser send a POST that
needs no CORS preflight (a form, or a fetch with a text/plain body) to this loopback server. So
every POST needs a non-form content type (415 otherwise) and the header X-CXR-Token carrying the
token of this process, which only the page this server served holds (403 otherwise); reading
the page cross-origin is what the same-origin policy and the Host check forbid.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import ConfigError, EngineError
from engine.io.probe import sniff_format
from engine.serve import images
from engine.serve.store import MAX_OFFSET, Filters, RunStore, display_name, parse_key, row_json

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD = 64 << 20
_IMMUTABLE = {"Cache-Control": "private, max-age=86400"}  # a key's bytes never change (sha256)
TOKEN_HEADER = "X-CXR-Token"
_TOKEN_SLOT = "__CXR_TOKEN__"  # in static/index.html, replaced by the process's token
# What an image upload may be sent as; none is a CORS "simple" type, so a cross-site fetch
# needs a preflight this app never grants.
UPLOAD_TYPES = ("application/octet-stream", "image/png", "image/jpeg", "application/dicom")
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": _CSP,
}


def create_app(
    out: Path,
    *,
    models_dir: Path | None = None,
    report_dir: Path | None = None,
    allowed_hosts: list[str] | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> FastAPI:
    """The app over `out`. `allowed_hosts` guards against DNS rebinding (None: any Host)."""
    store = RunStore(out, report_dir=report_dir)
    max_pixels = int(store.run_info().get("max_pixels") or 100_000_000)
    app = FastAPI(title="cxr serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    token = secrets.token_urlsafe(32)
    app.state.token = token
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    if page.count(_TOKEN_SLOT) != 1:
        raise EngineError(f"{STATIC / 'index.html'}: no single {_TOKEN_SLOT} slot for the token")
    page = page.replace(_TOKEN_SLOT, token)
    allowed = frozenset(h.lower() for h in allowed_hosts) if allowed_hosts else None
    app.add_middleware(Guard, allowed_hosts=allowed)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette sends this from its outermost middleware, outside Guard: hence the headers.
        # It re-raises `exc` afterwards, so the server still logs the traceback.
        return JSONResponse(
            {"detail": "internal error: see the server's log"},
            status_code=500,
            headers=SECURITY_HEADERS,
        )

    @app.exception_handler(ConfigError)
    async def bad_request(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(images.Unavailable)
    async def unavailable(request: Request, exc: images.Unavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def guard_post(request: Request) -> None:
        """Refuse what a page on another site could send without a CORS preflight."""
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media not in UPLOAD_TYPES:
            raise HTTPException(
                415, f"send the image as {' or '.join(UPLOAD_TYPES)}, not {media or 'no type'}"
            )
        sent = request.headers.get(TOKEN_HEADER, "")
        if not secrets.compare_digest(sent.encode(), token.encode()):
            raise HTTPException(
                403, f"missing or wrong {TOKEN_HEADER} token: use the page this server serves"
            )

    def known_row(key: str) -> dict[str, Any]:
        row = store.row(parse_key(key))
        if row is None:
            raise HTTPException(404, f"no image with key {key} in this run")
        return row

    # -- pages -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})  # it holds the token

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- table -----------------------------------------------------------------------------

    @app.get("/api/run")
    def run() -> dict[str, Any]:
        info = store.run_info()
        info.pop("max_pixels", None)
        return {**info, "max_upload_bytes": max_upload_bytes}

    @app.get("/api/images")
    def table(
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
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
        if row.get("status") != "ok":
            # what the run refused (a bomb, a fake) is never read or decoded again
            why = row.get("error") or "no reason recorded"
            raise HTTPException(422, f"the run could not screen this image: {why}")
        data = images.read_recorded(row, max_pixels=max_pixels)
        png = images.render_png(data, max_pixels=max_pixels)
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

    @app.post("/api/query", dependencies=[Depends(guard_post)])
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


class Guard:
    """The Host check (against DNS rebinding) and the security headers, on every response the
    routes and exception handlers send. A plain ASGI middleware: it also sees the responses
    BaseHTTPMiddleware's call_next would turn into exceptions."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        host = host_name(Headers(scope=scope).get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            refused = JSONResponse({"detail": "unknown Host header"}, status_code=400)
            await refused(scope, receive, secured)
            return
        await self.app(scope, receive, secured)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: "offset: Input should be ..."."""
    parts = []
    for error in exc.errors():
        where = [str(x) for x in error.get("loc", ()) if x not in ("query", "path", "body")]
        parts.append(f"{'.'.join(where) or 'request'}: {error.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


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
