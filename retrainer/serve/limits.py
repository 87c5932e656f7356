"""Refusing bad requests early and clearly: body size, pixel count, undecodable images.

Every refusal is an :class:`ApiError` that becomes ``{"error": {"code", "message"}}`` with a 4xx
status, so a bad upload never reaches the model and never costs a 500 or a worker.
"""
from __future__ import annotations

import io
import json
import threading
import time
from typing import Any, Awaitable, Callable

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from ..images import FORMATS


class ApiError(Exception):
    """A refusal with an HTTP status, a stable machine code and a message for people."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large",
                    f"the request body is over the limit of {limit:,} bytes")


class BodyTooLarge(ApiError):
    """Raised while a body streams past the limit; the rest is never read, so the
    connection cannot be reused and the response says so."""

    def __init__(self, limit: int) -> None:
        err = too_large(limit)
        super().__init__(err.status, err.code, err.message, headers={"Connection": "close"})


def check_pixels(data: bytes, max_pixels: int, name: str) -> int:
    """Read only the image header and refuse it when width x height is over ``max_pixels``;
    the pixel count otherwise. (Pillow's warning is filtered once, process-wide, by
    :mod:`retrainer.images`; the count is compared here, thread-safely.)"""
    if not data:
        raise ApiError(400, "empty_body", f"{name}: the upload is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image",
                       f"{name}: not an image (or an unsupported format; send JPEG, PNG, GIF, "
                       "BMP, WebP or TIFF)") from None
    except Image.DecompressionBombError:
        raise ApiError(413, "too_many_pixels",
                       f"{name}: too many pixels (over {max_pixels:,})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds on broken headers
        raise ApiError(422, "cannot_decode", f"{name}: cannot decode ({exc})") from None
    if width * height > max_pixels:
        raise ApiError(413, "too_many_pixels",
                       f"{name}: {width}x{height} is {width * height:,} pixels, over the limit "
                       f"of {max_pixels:,}")
    return width * height


def image_error(exc: ImageError, name: str) -> ApiError:
    """A decoding failure from :mod:`retrainer.images` as an HTTP refusal."""
    reason = exc.reason
    if reason.startswith("not an image"):
        return ApiError(415, "not_an_image", f"{name}: {reason}")
    if reason.startswith("too many pixels"):
        return ApiError(413, "too_many_pixels", f"{name}: {reason}")
    if reason == "empty file":
        return ApiError(400, "empty_body", f"{name}: the upload is empty")
    return ApiError(422, "cannot_decode", f"{name}: {reason}")


class PixelBudget:
    """Bounds the pixels being decoded at once, over all requests (decoding memory grows with
    pixels, not with upload bytes). A decode waits for room; an image as large as the whole
    budget still runs, alone. A wait past ``timeout`` seconds is a 503."""

    def __init__(self, pixels: int, timeout: float = 30.0) -> None:
        self.pixels = pixels
        self.timeout = timeout
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.pixels)
        deadline = time.monotonic() + self.timeout
        with self.cond:
            while self.used and self.used + n > self.pixels:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(503, "overloaded", "the server is busy decoding other "
                                   "images; retry shortly", headers={"Retry-After": "1"})
                self.cond.wait(left)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class HostCheckMiddleware:
    """ASGI middleware against DNS rebinding: a keyless service on loopback answers only
    requests whose Host header names this machine (localhost, 127.0.0.1, [::1], or the bound
    address, any port); a web page on another name that resolves here gets 421."""

    def __init__(self, app: Any, allowed: set[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host")
            if host is not None and _host_name(host.decode("latin-1")) not in self.allowed:
                await _send_json(send, 421, ApiError(
                    421, "misdirected_request",
                    "this service answers only requests addressed to localhost or its "
                    "loopback address").body())
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:80' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def loopback_hosts(bound: str) -> set[str]:
    """The Host names a loopback service accepts."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    bound = bound.strip().lower()
    if bound:
        names.add(f"[{bound.strip('[]')}]" if ":" in bound else bound)
    return names


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a declared Content-Length over the limit, before reading it,
    and :class:`BodyTooLarge` as soon as a chunked body streams past it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, ApiError(400, "bad_request",
                                                     "invalid Content-Length header").body())
                return
            if int(declared) > self.max_bytes:
                await _send_json(send, 413, too_large(self.max_bytes).body())
                return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
