"""The FastAPI application: versioned endpoints around one loaded :class:`Classifier`.

Requests are read and decoded on worker threads (``retrainer.images``, exactly as ``retrainer
label`` decodes), then scored through the :class:`MicroBatcher`, so concurrent requests share
forward passes. Everything that goes wrong with a request is a JSON 4xx (see :mod:`.limits`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ImageError
from .auth import is_loopback, key_matches
from .batcher import MicroBatcher, QueueFull, Ticket
from .limits import (ApiError, BodyLimitMiddleware, HostCheckMiddleware, PixelBudget,
                     check_pixels, image_error, loopback_hosts)
from .settings import ServeConfig

log = logging.getLogger(__name__)

API_VERSION = "v1"


class PredictionOut(BaseModel):
    label: str
    score: float = Field(description="Softmax probability, 0..1.")


class ClassifyOut(BaseModel):
    predictions: list[PredictionOut] = Field(description="Best first, at most top_k.")
    model: dict[str, Any] = Field(description="Which model answered (name, version, backbone).")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: body_too_large, too_many_pixels, "
                                  "not_an_image, cannot_decode, empty_body, unauthorized, ...")
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class BatchItemOut(BaseModel):
    name: str = Field(description="The uploaded file name.")
    predictions: list[PredictionOut] | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut] = Field(description="One per file, in upload order.")
    model: dict[str, Any]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 413, 415, 422, 503)}

_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_BATCH_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array",
                                 "items": {"type": "string", "format": "binary"}}}}}},
}


class Service:
    """What the endpoints share: the model and its batcher, the limits, the decode threads and
    the counters. One per app, on ``app.state.service``."""

    def __init__(self, classifier: Any, config: ServeConfig,
                 model_info: dict[str, Any] | None = None) -> None:
        self.classifier = classifier
        self.config = config
        self.info = model_info or {"name": "model", "labels": list(classifier.labels)}
        self.summary = {k: self.info[k] for k in ("name", "version", "backbone") if k in self.info}
        # One model thread per lane: each lane runs on its own core (see MicroBatcher).
        self.batcher = MicroBatcher(classifier.lanes(), config.max_batch_size,
                                    config.max_wait_ms, config.max_queue)
        self.counters = {"requests": 0, "images": 0, "refused": 0, "started": time.time()}
        # Decoding gets its own threads, handed work through asyncio directly: cheaper per
        # request than Starlette's general thread pool. Bounded: at most decode_threads images
        # decode at once, within a pixel budget.
        self.decoder: ThreadPoolExecutor | None = None
        self.budget = PixelBudget(max(config.max_decode_pixels, config.max_pixels))

    def start(self) -> None:
        self.decoder = ThreadPoolExecutor(self.config.decode_threads or os.cpu_count() or 1,
                                          thread_name_prefix="decode")
        self.batcher.start()

    async def stop(self) -> None:
        # Uvicorn has answered every in-flight request by now; end the model threads.
        await run_in_threadpool(self.batcher.stop)
        if self.decoder is not None:
            self.decoder.shutdown(wait=False)

    def authorise(self, request: Request) -> None:
        # Headers read directly, not as declared parameters: no per-request validation work.
        if self.config.api_key is None:
            return
        headers = request.headers
        if not key_matches(self.config.api_key, headers.get("authorization"),
                           headers.get("x-api-key")):
            raise ApiError(401, "unauthorized",
                           "a valid API key is required (header 'Authorization: Bearer KEY' "
                           "or 'X-API-Key: KEY')", headers={"WWW-Authenticate": "Bearer"})

    async def enqueue(self, data: bytes, name: str, ticket: Ticket) -> asyncio.Future:
        """Decode on a worker thread, then queue for the model; ``ticket`` comes from
        ``batcher.incoming()``, which told the model threads this image is on its way."""
        pixels = await asyncio.get_running_loop().run_in_executor(
            self.decoder, _decode, self.classifier, data, name, self.config.max_pixels,
            self.budget)
        try:
            return self.batcher.enqueue(pixels, ticket)
        except QueueFull as exc:
            raise ApiError(503, "overloaded", f"the server is busy ({exc}); retry shortly",
                           headers={"Retry-After": "1"}) from None

    def answer(self, row: np.ndarray, top_k: int | None) -> list[dict[str, Any]]:
        self.counters["images"] += 1
        k = top_k or self.config.default_top_k
        return [{"label": p.label, "score": p.score} for p in self.classifier.top_k(row, k)]


def _service(request: Request) -> Service:
    return request.app.state.service


async def _authorised(request: Request) -> None:
    _service(request).authorise(request)


service_routes = APIRouter()
model_routes = APIRouter(prefix=f"/{API_VERSION}", dependencies=[Depends(_authorised)])
_TOP_K = Query(None, ge=1, description="How many labels to return (default: the server's "
                                       "--top-k).")


@service_routes.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    """Liveness: the process is up and its model is loaded (no key needed)."""
    return {"status": "ok"}


@model_routes.get("/labels", tags=["model"], responses={401: _ERRORS[401]})
async def labels(request: Request) -> dict[str, list[str]]:
    """The model's labels, in output order."""
    return {"labels": list(_service(request).classifier.labels)}


@model_routes.get("/model", tags=["model"], responses={401: _ERRORS[401]})
async def model(request: Request) -> dict[str, Any]:
    """The model's metadata, and the service's limits and batching settings."""
    svc = _service(request)
    config = svc.config
    return dict(svc.info, serving={
        "max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
        "model_threads": len(svc.batcher.lanes), "runtime": svc.classifier.runtime,
        "max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels,
        "max_files": config.max_files, "default_top_k": config.default_top_k})


@model_routes.get("/stats", tags=["service"], responses={401: _ERRORS[401]})
async def stats(request: Request) -> dict[str, Any]:
    """Requests served and how they were batched since start."""
    svc = _service(request)
    counters = svc.counters
    return {"requests": counters["requests"], "images": counters["images"],
            "refused": counters["refused"],
            "uptime_seconds": round(time.time() - counters["started"], 1),
            "batching": svc.batcher.stats.to_dict()}


@model_routes.post("/classify", tags=["classify"], response_model=ClassifyOut,
                   responses=_ERRORS, openapi_extra={"requestBody": _IMAGE_BODY})
async def classify(request: Request, top_k: int | None = _TOP_K) -> JSONResponse:
    """Classify one image: a multipart ``file`` field, or the raw image as the body."""
    svc = _service(request)
    svc.counters["requests"] += 1
    with svc.batcher.incoming() as ticket:  # announced while its body arrives and decodes
        if _is_multipart(request):
            files = await _form_files(request, svc.config)
            if not files:
                raise ApiError(400, "no_file", "the form has no file field (send it as 'file')")
            name, data = files[0]
        else:
            name, data = "body", await request.body()
        future = await svc.enqueue(data, name, ticket)
    # A ready response skips re-validating what ClassifyOut documents: less CPU per image.
    return JSONResponse({"predictions": svc.answer(await future, top_k), "model": svc.summary})


@model_routes.post("/classify/batch", tags=["classify"], response_model=BatchOut,
                   responses=_ERRORS, openapi_extra={"requestBody": _BATCH_BODY})
async def classify_batch(request: Request, top_k: int | None = _TOP_K) -> JSONResponse:
    """Classify several images (multipart ``files`` fields). A bad image gets its own
    ``error`` entry; the others are still scored."""
    svc = _service(request)
    svc.counters["requests"] += 1
    if not _is_multipart(request):
        raise ApiError(415, "not_multipart",
                       "send the images as multipart/form-data 'files' fields")
    files = await _form_files(request, svc.config)
    if not files:
        raise ApiError(400, "no_file", "the form has no file fields (send them as 'files')")

    async def one(name: str, data: bytes) -> dict[str, Any]:
        try:
            with svc.batcher.incoming() as ticket:
                future = await svc.enqueue(data, name, ticket)
            return {"name": name, "predictions": svc.answer(await future, top_k)}
        except ApiError as exc:
            if exc.code == "overloaded":
                raise
            svc.counters["refused"] += 1
            return {"name": name, "error": exc.body()["error"]}

    results = await asyncio.gather(*(one(n, d) for n, d in files))
    return JSONResponse({"results": list(results), "model": svc.summary})


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _service(request).counters["refused"] += 1
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    _service(request).counters["refused"] += 1
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return JSONResponse(ApiError(422, "invalid_request", "; ".join(parts)).body(),
                        status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(ApiError(exc.status_code, code, str(exc.detail)).body(),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # The client left (or was cut off for sending too slowly): nobody reads this.
    _service(request).counters["refused"] += 1
    return JSONResponse(ApiError(400, "client_disconnected", "the client went away").body(),
                        status_code=400)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(ApiError(500, "internal_error", f"{type(exc).__name__}").body(),
                        status_code=500)


def create_app(classifier: Any, config: ServeConfig | None = None,
               model_info: dict[str, Any] | None = None) -> FastAPI:
    """An ASGI app serving ``classifier``; its model threads run for the app's lifespan."""
    service = Service(classifier, config or ServeConfig(), model_info)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="retrainer classification service",
        version=API_VERSION,
        description="Scores images with a model trained by `retrainer train`. Errors are "
                    "`{\"error\": {\"code\", \"message\"}}` with a 4xx status.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.config.max_body_bytes)
    if service.config.api_key is None and is_loopback(service.config.host):
        # Added last, so it runs first.
        app.add_middleware(HostCheckMiddleware, allowed=loopback_hosts(service.config.host))
    app.state.service = service
    app.state.batcher = service.batcher
    app.state.classifier = classifier
    for kind, handler in ((ApiError, _api_error), (RequestValidationError, _invalid),
                          (StarletteHTTPException, _http_error), (ClientDisconnect, _gone),
                          (Exception, _unexpected)):
        app.add_exception_handler(kind, handler)  # type: ignore[arg-type]
    app.include_router(service_routes)
    app.include_router(model_routes)
    return app


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _form_files(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    """Every uploaded file of a multipart body, as (file name, bytes), in order."""
    try:
        form = await request.form(max_files=config.max_files, max_fields=100,
                                  max_part_size=64 * 1024)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise ApiError(413, "too_many_files",
                           f"more files than the limit of {config.max_files}") from None
        raise ApiError(400, "bad_multipart", f"cannot parse the form ({exc.detail})") from None
    files: list[tuple[str, bytes]] = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or "upload", await value.read()))
    finally:
        await form.close()
    return files


def _decode(classifier: Any, data: bytes, name: str, max_pixels: int,
            budget: PixelBudget | None = None) -> np.ndarray:
    """Header check, then the same decode as ``retrainer label`` within the pixel budget;
    every failure is a 4xx."""
    pixels = check_pixels(data, max_pixels, name)
    held = budget.acquire(pixels) if budget is not None else 0
    try:
        return classifier.prepare(data, name=name)
    except ImageError as exc:
        raise image_error(exc, name) from None
    except (MemoryError, Exception) as exc:  # noqa: BLE001 - never a 500 for a bad upload
        raise ApiError(422, "cannot_decode", f"{name}: cannot decode ({exc})") from None
    finally:
        if budget is not None:
            budget.release(held)
