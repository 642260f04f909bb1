"""The web face of an index: a FastAPI app with the JSON search API and the search page.

:func:`create_app` wraps an already loaded :class:`vsl.retrieval.Index` (the model and the index
are loaded once, before the app starts); every search runs on a thread pool sized to the cores,
through a :class:`~vsl.serve.batching.QueryBatcher` that merges queries arriving within a few
milliseconds into one batched search call.

Routes: ``GET /`` (the page, plain HTML/CSS/JS from ``static/``), ``GET /api/search`` (``q`` for
text -> image, ``image_id`` for image -> text, with ``k`` and ``shortlist``), ``GET /api/health``,
``GET /api/info``, ``GET /api/thumbnail/{image_id}`` (the gallery image's picture when the
gallery has one) and the OpenAPI page ``/docs`` (Swagger UI from the files that the
``fastapi-offline`` package ships, so it works offline; FastAPI's default loads it from a CDN).
Bad input is answered with HTTP 4xx and the JSON body ``{"error": "<one line>", "parameter":
"<name>"}``; nothing a client sends produces a 500 or a stack trace, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Dict, Optional
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
import fastapi_offline

from ..errors import VSLError
from .admin import WATCH_S, Swapper, add_admin_routes
from .batching import QueryBatcher

STATIC = Path(__file__).with_name("static")
#: Swagger UI's script, style and icon (a build that reads OpenAPI 3.1, which FastAPI writes).
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")
#: Longest accepted text query, in characters (the model's captions are a few dozen words; a longer
#: "query" is a mistake or an abuse, and tokenising it would only cost time).
MAX_QUERY_CHARS = 1000
#: Results and shortlist size when a request does not say (``k`` beyond the gallery is an error).
DEFAULT_K, DEFAULT_SHORTLIST = 10, 100

log = logging.getLogger("vsl.serve")


class ParameterError(Exception):
    """A request parameter is invalid: answered as ``status`` with ``{"error", "parameter"}``."""

    def __init__(self, parameter: str, message: str, status: int = 422):
        super().__init__(message)
        self.parameter, self.message, self.status = parameter, message, status


def _error(status: int, message: str, parameter: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": message, "parameter": parameter}, status_code=status)


def _check_utf8(query_string: bytes) -> None:
    """Raise :class:`ParameterError` naming the first parameter whose name or value is not UTF-8
    (Starlette would silently replace the bad bytes with U+FFFD)."""
    for pair in query_string.split(b"&"):
        name, _, value = pair.partition(b"=")
        raw_name = unquote_to_bytes(name.replace(b"+", b" "))
        try:
            shown = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ParameterError(repr(raw_name)[2:-1], "a parameter name is not valid UTF-8", 400) from None
        try:
            unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise ParameterError(shown, f"{shown}: the value is not valid UTF-8 text", 400) from None


class _Utf8Parameters:
    """ASGI middleware: a request whose query string is not UTF-8 is answered 400 before routing."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            try:
                _check_utf8(scope.get("query_string", b""))
            except ParameterError as exc:
                await _error(exc.status, exc.message, exc.parameter)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(index: Any, *, workers: Optional[int] = None, batch_window_ms: float = 2.0,
               max_batch: int = 32, thumbnails: Optional[Path] = None,
               admin_token: Optional[str] = None, watch_s: float = WATCH_S) -> FastAPI:
    """The app serving ``index`` (a loaded :class:`vsl.retrieval.Index`).

    Args:
        workers: threads that run searches (default: the CPU cores).
        batch_window_ms: how long a query waits for others to share its batch; 0 = only queries
            that arrive while every worker is busy are batched.
        max_batch: largest batch (1 = no batching).
        thumbnails: folder of ``{image_id}.png`` pictures of the gallery images (optional).
        admin_token: enables the admin routes (:mod:`.admin`: reload, add, remove) for requests
            sending ``Authorization: Bearer TOKEN`` (None: they answer 403; a wrong or missing token 401).
        watch_s: seconds between looks at the index's manifest; a new generation written by another
            process is swapped in (0: only ``POST /api/reload`` does).
    """
    workers = workers or os.cpu_count() or 1
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vsl-search")
    batcher = QueryBatcher(executor, workers, window_s=batch_window_ms / 1000.0, max_batch=max_batch)
    thumbs = Path(thumbnails) if thumbnails is not None and Path(thumbnails).is_dir() else None

    def picture(index, image_id: int) -> Optional[Path]:
        """The picture of a gallery image: ``--thumbnails``' ``{id}.png``, else the index's own."""
        if thumbs is not None:
            path = thumbs / f"{image_id}.png"
            return path if path.is_file() else None
        find = getattr(index, "picture", None)
        return find(image_id) if find is not None else None

    info = dict(index.info())
    num_images, num_captions = int(index.num_images), int(index.num_captions)
    # Captions per image: caption j of an image->text result belongs to image j // per_image.
    per_image = int(getattr(index, "captions_per_image", 0) or 0) or (
        num_captions // num_images if num_images and num_captions % num_images == 0 else 0)
    explainable = bool(getattr(index, "can_explain", False))
    started = time.time()
    # Example queries for the page's empty state: the first caption of a few spread-out images.
    examples = [index.captions_of_image(i)[:1] for i in range(0, num_images, max(1, num_images // 4))][:4]
    examples = [e[0] for e in examples if e]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(swapper.watch()) if watch_s > 0 else None
        yield
        if watcher is not None:
            watcher.cancel()
        swapper.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vsl search", version=str(info.get("vsl_version", "")), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Image-text retrieval over a `vsl index`: a vector shortlist, then the "
                              "exact SGR/SAF score on the shortlist.")
    app.state.batcher, app.state.index = batcher, index
    swapper = Swapper(app, watch_s)
    has_pictures = thumbs is not None or (num_images > 0 and picture(index, 0) is not None)

    # -- errors: always JSON, one line, no traceback -----------------------------------------------
    @app.exception_handler(ParameterError)
    async def _parameter_error(request: Request, exc: ParameterError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.parameter)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
        name = loc[-1] if loc else None
        return _error(422, f"{name}: {first.get('msg', 'invalid value')}" if name else "invalid request", name)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(VSLError)
    async def _user_error(request: Request, exc: VSLError) -> JSONResponse:
        return _error(422, " ".join(str(exc).split()))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal server error")

    app.add_middleware(_Utf8Parameters)

    # -- API ---------------------------------------------------------------------------------------
    @app.get("/api/health", summary="liveness: the index is loaded and searches are served")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - started, 3)}

    @app.get("/api/info", summary="the model, checkpoint hash, gallery size and index type")
    async def get_info() -> Dict[str, Any]:
        index = app.state.index
        return {**info, **index.info(), "num_images": int(index.num_images), "num_captions": int(index.num_captions),
                "thumbnails": has_pictures, "explain": explainable, "examples": examples,
                "server": {"workers": workers, "batch_window_ms": batch_window_ms, "max_batch": max_batch,
                           "max_query_chars": MAX_QUERY_CHARS, "batches": batcher.batches,
                           "queries": batcher.queries}}

    add_admin_routes(app, swapper, admin_token, ParameterError)

    @app.get("/api/search", summary="text -> image (q) or image -> text (image_id)", response_class=JSONResponse)
    async def search(
        q: Optional[str] = Query(None, description=f"text query (1 to {MAX_QUERY_CHARS} characters)"),
        image_id: Optional[int] = Query(None, description="gallery image to search captions for"),
        k: Optional[int] = Query(None, description=f"results to return (1 to the gallery size; "
                                                     f"default {DEFAULT_K} or the gallery size if smaller)"),
        shortlist: int = Query(DEFAULT_SHORTLIST,
                               description="shortlist size re-ranked by the exact model; 0 = exhaustive"),
        explain: bool = Query(False, description="text -> image: add to each result the regions each query word "
                                                 "attends to ({words, boxes, attention, image_size})"),
    ) -> JSONResponse:
        t0 = time.perf_counter()
        index = app.state.index        # this request finishes on the Index it started with (reloads swap it)
        num_images, num_captions = int(index.num_images), int(index.num_captions)
        if (q is None) == (image_id is None):
            raise ParameterError("q", "give either q (text -> image) or image_id (image -> text)")
        if shortlist < 0:
            raise ParameterError("shortlist", f"shortlist: must be >= 0 (0 = exhaustive), got {shortlist}")
        if q is not None:
            text = q.strip()
            if not text:
                raise ParameterError("q", "q: the query is empty")
            if len(q) > MAX_QUERY_CHARS:
                raise ParameterError("q", f"q: at most {MAX_QUERY_CHARS} characters, got {len(q):,}")
            k = _check_k(k, num_images, "images")
            result, batch = await _search("q", ("text", id(index), k, shortlist), index.search_text, text, k, shortlist)
            body = result.to_dict()
            body["direction"] = "text_to_image"
            for hit in body["results"]:
                hit["thumbnail"] = f"/api/thumbnail/{hit['id']}" if picture(index, hit["id"]) is not None else None
            if explain:
                if not explainable:
                    raise ParameterError("explain", "explain: this gallery has no region boxes to explain "
                                                    "matches with (index a split written by vsl extract)")
                ids = [hit["id"] for hit in body["results"]]
                loop = asyncio.get_running_loop()
                for hit, why in zip(body["results"], await loop.run_in_executor(executor, index.explain, text, ids)):
                    hit["explain"] = why
        else:
            if not 0 <= image_id < num_images:
                raise ParameterError("image_id", f"image_id: no image {image_id} in the gallery "
                                                 f"(0 to {num_images - 1})", 404)
            if num_captions == 0:
                raise ParameterError("image_id", "image_id: this gallery has no captions to search", 422)
            k = _check_k(k, num_captions, "captions")
            result, batch = await _search("image_id", ("image", id(index), k, shortlist), index.search_image, image_id, k,
                                          shortlist)
            body = result.to_dict()
            body["direction"] = "image_to_text"
            body["image"] = {"id": image_id, "captions": list(index.captions_of_image(image_id)),
                             "thumbnail": f"/api/thumbnail/{image_id}" if picture(index, image_id) is not None
                             else None}
            for hit in body["results"]:
                hit["image_id"] = hit["id"] // per_image if per_image else None
        body["batch_size"] = batch
        body["server_seconds"] = time.perf_counter() - t0
        return JSONResponse(body)          # plain JSON: the body needs no response-model validation

    async def _search(parameter: str, key, search, query, k: int, shortlist: int):
        try:
            return await batcher.submit(key, search, query, k, shortlist)
        except VSLError as exc:        # the index refused the query itself (e.g. no words in it)
            raise ParameterError(parameter, f"{parameter}: {' '.join(str(exc).split())}") from None

    def _check_k(k: Optional[int], size: int, what: str) -> int:
        if k is None:
            return min(DEFAULT_K, size)
        if not 1 <= k <= size:
            raise ParameterError("k", f"k: must be between 1 and {size:,} (the gallery's {what}), got {k}")
        return k

    @app.get("/api/thumbnail/{image_id}", summary="the picture of a gallery image (PNG)",
             response_class=FileResponse)
    async def thumbnail(image_id: int) -> FileResponse:
        index = app.state.index
        if not 0 <= image_id < int(index.num_images):
            raise ParameterError("image_id", f"image_id: no image {image_id} in the gallery", 404)
        path = picture(index, image_id)
        if path is None:
            raise ParameterError("image_id", f"image_id: image {image_id} has no thumbnail", 404)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    # -- the page ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="vsl search: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    return app
