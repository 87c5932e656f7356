"""Every ``retrainer serve`` default in one place; the CLI reads its option defaults from here."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_MODEL_DIR


@dataclass
class ServeConfig:
    """How one classification service runs: where, with which limits, batching and key."""

    model_dir: str = DEFAULT_MODEL_DIR
    graph: str | None = None
    labels: str | None = None
    #: What runs the model (retrainer.runtimes): auto is model.tflite on LiteRT when installed.
    runtime: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    #: Most images scored in one forward pass; 1 turns micro-batching off.
    max_batch_size: int = 32
    #: Longest wait (ms) for requests still decoding to join a batch; a lone request never
    #: waits, and while a pass runs new requests queue and form the next batch anyway.
    max_wait_ms: float = 10.0
    #: Requests waiting for the model beyond this are refused with 503 (back-pressure).
    max_queue: int = 512
    max_body_bytes: int = 20 * 1024 * 1024
    #: Decompression-bomb guard: width x height above this is refused before decoding.
    max_pixels: int = 40_000_000
    #: Pixels (width x height) being decoded at once over all requests: bounds decoding memory
    #: (about 3-4 bytes a pixel at the peak). An image up to ``max_pixels`` always fits.
    max_decode_pixels: int = 80_000_000
    #: Threads decoding uploads (None: one per core).
    decode_threads: int | None = None
    #: Open connections beyond this get 503 at once (idle keep-alive ones count).
    max_connections: int = 256
    #: Seconds a client gets to send a request's headers; a slower one is disconnected
    #: (slowloris), as is an idle new connection.
    header_timeout: float = 10.0
    #: Seconds a client gets to send a request's body once its headers are in.
    body_timeout: float = 60.0
    #: Seconds an idle keep-alive connection stays open.
    keep_alive: float = 30.0
    #: Files in one ``/v1/classify/batch`` request.
    max_files: int = 64
    default_top_k: int = 5
    #: Seconds given to in-flight requests after SIGTERM before they are cancelled.
    graceful_timeout: float = 30.0
    #: One log line per request (uvicorn's access log).
    access_log: bool = False
