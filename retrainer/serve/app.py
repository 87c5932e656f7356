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
from fastapi import Depends, FastAPI, Query, Request
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


def create_app(classifier: Any, config: ServeConfig | None = None,
               model_info: dict[str, Any] | None = None) -> FastAPI:
    """An ASGI app serving ``classifier``; its model threads run for the app's lifespan."""
    config = config or ServeConfig()
    info = model_info or {"name": "model", "labels": list(classifier.labels)}
    summary = {k: info[k] for k in ("name", "version", "backbone") if k in info}
    # One model thread per session: each session runs on its own core (see MicroBatcher).
    batcher = MicroBatcher(classifier.lanes(), config.max_batch_size, config.max_wait_ms,
                           config.max_queue)
    counters = {"requests": 0, "images": 0, "refused": 0, "started": time.time()}
    # Decoding gets its own threads, handed work through asyncio directly: cheaper per request
    # than Starlette's general thread pool, which matters when the loop serves hundreds a second.
    # Bounded: at most decode_threads images decode at once, within a pixel budget.
    decoders: list[ThreadPoolExecutor] = []
    budget = PixelBudget(max(config.max_decode_pixels, config.max_pixels))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        decoders.append(ThreadPoolExecutor(config.decode_threads or os.cpu_count() or 1,
                                           thread_name_prefix="decode"))
        batcher.start()
        yield
        # Uvicorn has answered every in-flight request by now; end the model threads.
        await run_in_threadpool(batcher.stop)
        decoders.pop().shutdown(wait=False)

    app = FastAPI(
        title="retrainer classification service",
        version=API_VERSION,
        description="Scores images with a model trained by `retrainer train`. Errors are "
                    "`{\"error\": {\"code\", \"message\"}}` with a 4xx status.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key is None and is_loopback(config.host):  # added last: runs first
        app.add_middleware(HostCheckMiddleware, allowed=loopback_hosts(config.host))
    app.state.batcher = batcher
    app.state.classifier = classifier

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        counters["refused"] += 1
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        counters["refused"] += 1
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse(ApiError(422, "invalid_request", "; ".join(parts)).body(),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(ApiError(exc.status_code, code, str(exc.detail)).body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left (or was cut off for sending too slowly): nobody reads this.
        counters["refused"] += 1
        return JSONResponse(ApiError(400, "client_disconnected", "the client went away").body(),
                            status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(ApiError(500, "internal_error", f"{type(exc).__name__}").body(),
                            status_code=500)

    async def authorised(request: Request) -> None:
        # Headers read directly, not as declared parameters: no per-request validation work.
        if config.api_key is None:
            return
        headers = request.headers
        if not key_matches(config.api_key, headers.get("authorization"),
                           headers.get("x-api-key")):
            raise ApiError(401, "unauthorized",
                           "a valid API key is required (header 'Authorization: Bearer KEY' "
                           "or 'X-API-Key: KEY')", headers={"WWW-Authenticate": "Bearer"})

    top_k_query = Query(None, ge=1, description=f"How many labels to return (default "
                                                f"{config.default_top_k}).")

    async def enqueue(data: bytes, name: str, ticket: Ticket) -> asyncio.Future:
        """Decode on a worker thread, then queue for the model; ``ticket`` comes from
        ``batcher.incoming()``, which told the model threads this image is on its way."""
        pixels = await asyncio.get_running_loop().run_in_executor(
            decoders[0], _decode, classifier, data, name, config.max_pixels, budget)
        try:
            return batcher.enqueue(pixels, ticket)
        except QueueFull as exc:
            raise ApiError(503, "overloaded", f"the server is busy ({exc}); retry shortly",
                           headers={"Retry-After": "1"}) from None

    def answer(row: np.ndarray, top_k: int | None) -> list[dict[str, Any]]:
        counters["images"] += 1
        k = top_k or config.default_top_k
        return [{"label": p.label, "score": p.score} for p in classifier.top_k(row, k)]

    v1 = [Depends(authorised)]

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process is up and its model is loaded (no key needed)."""
        return {"status": "ok"}

    @app.get(f"/{API_VERSION}/labels", tags=["model"], dependencies=v1,
             responses={401: _ERRORS[401]})
    async def labels() -> dict[str, list[str]]:
        """The model's labels, in output order."""
        return {"labels": list(classifier.labels)}

    @app.get(f"/{API_VERSION}/model", tags=["model"], dependencies=v1,
             responses={401: _ERRORS[401]})
    async def model() -> dict[str, Any]:
        """The model's metadata, and the service's limits and batching settings."""
        return dict(info, serving={
            "max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
            "model_threads": len(batcher.lanes),
            "max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels,
            "max_files": config.max_files, "default_top_k": config.default_top_k})

    @app.get(f"/{API_VERSION}/stats", tags=["service"], dependencies=v1,
             responses={401: _ERRORS[401]})
    async def stats() -> dict[str, Any]:
        """Requests served and how they were batched since start."""
        return {"requests": counters["requests"], "images": counters["images"],
                "refused": counters["refused"],
                "uptime_seconds": round(time.time() - counters["started"], 1),
                "batching": batcher.stats.to_dict()}

    @app.post(f"/{API_VERSION}/classify", tags=["classify"], dependencies=v1,
              response_model=ClassifyOut, responses=_ERRORS,
              openapi_extra={"requestBody": _IMAGE_BODY})
    async def classify(request: Request, top_k: int | None = top_k_query) -> JSONResponse:
        """Classify one image: a multipart ``file`` field, or the raw image as the body."""
        counters["requests"] += 1
        with batcher.incoming() as ticket:  # announced while its body arrives and decodes
            if _is_multipart(request):
                files = await _form_files(request, config)
                if not files:
                    raise ApiError(400, "no_file",
                                   "the form has no file field (send it as 'file')")
                name, data = files[0]
            else:
                name, data = "body", await request.body()
            future = await enqueue(data, name, ticket)
        # A ready response skips re-validating what ClassifyOut documents: less CPU per image.
        return JSONResponse({"predictions": answer(await future, top_k), "model": summary})

    @app.post(f"/{API_VERSION}/classify/batch", tags=["classify"], dependencies=v1,
              response_model=BatchOut, responses=_ERRORS,
              openapi_extra={"requestBody": _BATCH_BODY})
    async def classify_batch(request: Request,
                             top_k: int | None = top_k_query) -> JSONResponse:
        """Classify several images (multipart ``files`` fields). A bad image gets its own
        ``error`` entry; the others are still scored."""
        counters["requests"] += 1
        if not _is_multipart(request):
            raise ApiError(415, "not_multipart",
                           "send the images as multipart/form-data 'files' fields")
        files = await _form_files(request, config)
        if not files:
            raise ApiError(400, "no_file", "the form has no file fields (send them as 'files')")

        async def one(name: str, data: bytes) -> dict[str, Any]:
            try:
                with batcher.incoming() as ticket:
                    future = await enqueue(data, name, ticket)
                return {"name": name, "predictions": answer(await future, top_k)}
            except ApiError as exc:
                if exc.code == "overloaded":
                    raise
                counters["refused"] += 1
                return {"name": name, "error": exc.body()["error"]}

        results = await asyncio.gather(*(one(n, d) for n, d in files))
        return JSONResponse({"results": list(results), "model": summary})

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
