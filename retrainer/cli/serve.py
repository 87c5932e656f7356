"""``retrainer serve``."""
from __future__ import annotations

import click

from ..serve.auth import API_KEY_ENV
from ..serve.settings import ServeConfig
from .common import FloatRange, echo_json, err, export_runtime_option, json_option, model_options

_S = ServeConfig()


@click.command()
@model_options
@click.option("--host", default=_S.host, show_default=True,
              help="Address to listen on. Anything but loopback requires --api-key.")
@click.option("--port", default=_S.port, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: any free port; the URL is printed when ready).")
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True,
              help="Require this key on every /v1 request (Authorization: Bearer KEY, "
                   "or X-API-Key: KEY).")
@click.option("--max-batch-size", default=_S.max_batch_size, show_default=True,
              type=click.IntRange(min=1),
              help="Most images per forward pass; 1 turns micro-batching off.")
@click.option("--max-wait-ms", default=_S.max_wait_ms, show_default=True,
              type=FloatRange(min=0),
              help="Longest wait for requests still decoding to join a forward pass "
                   "(a lone request never waits).")
@click.option("--max-queue", default=_S.max_queue, show_default=True, type=click.IntRange(min=1),
              help="Images waiting for the model beyond this get 503.")
@click.option("--max-body-mb", default=_S.max_body_bytes / 2**20, show_default=True,
              type=FloatRange(min=0, min_open=True), help="Largest request body, in MiB.")
@click.option("--max-pixels", default=_S.max_pixels, show_default=True,
              type=click.IntRange(min=1),
              help="Largest image (width x height), checked before decoding.")
@click.option("--max-files", default=_S.max_files, show_default=True, type=click.IntRange(min=1),
              help="Most files in one /v1/classify/batch request.")
@click.option("--top-k", default=_S.default_top_k, show_default=True,
              type=click.IntRange(min=1), help="Labels returned when a request gives no top_k.")
@click.option("--max-connections", default=_S.max_connections, show_default=True,
              type=click.IntRange(min=1),
              help="Open connections beyond this are answered 503 at once.")
@click.option("--header-timeout", default=_S.header_timeout, show_default=True,
              type=FloatRange(min=0, min_open=True),
              help="Seconds a client gets to send a request's headers; a slower one, or a "
                   "new connection that sends nothing, is disconnected.")
@click.option("--body-timeout", default=_S.body_timeout, show_default=True,
              type=FloatRange(min=0, min_open=True),
              help="Seconds a client gets to send a request's body after its headers.")
@click.option("--graceful-timeout", default=_S.graceful_timeout, show_default=True,
              type=FloatRange(min=0),
              help="Seconds in-flight requests get to finish after SIGTERM.")
@json_option
@export_runtime_option
@click.pass_context
def serve(ctx: click.Context, model_dir: str, graph: str | None, labels: str | None, host: str, port: int,
          api_key: str | None, max_batch_size: int, max_wait_ms: float, max_queue: int,
          max_body_mb: float, max_pixels: int, max_files: int, top_k: int,
          max_connections: int, header_timeout: float, body_timeout: float,
          graceful_timeout: float,
          as_json: bool, runtime: str = "auto") -> None:
    """Serve a trained model as a REST API (FastAPI + uvicorn).

    \b
      retrainer serve --model-dir retrained
      curl -F file=@photo.jpg http://127.0.0.1:8000/v1/classify
      curl --data-binary @photo.jpg 'http://127.0.0.1:8000/v1/classify?top_k=1'

    The OpenAPI schema is at /openapi.json, interactive docs at /docs. SIGTERM or Ctrl-C
    answers the requests in flight, then exits 0. -v logs every request; --json prints
    {"event": "ready", "url": ...} on stdout once listening, and the counts when stopped.
    """
    from ..serve.server import serve as run

    config = ServeConfig(
        model_dir=model_dir, graph=graph, labels=labels, runtime=runtime, host=host, port=port,
        api_key=api_key or None, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
        max_queue=max_queue, max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels,
        max_files=max_files, default_top_k=top_k, graceful_timeout=graceful_timeout,
        max_connections=max_connections, header_timeout=header_timeout,
        body_timeout=body_timeout,
        access_log=bool((ctx.obj or {}).get("verbose")))

    def ready(url: str) -> None:
        if as_json:
            echo_json({"event": "ready", "url": url, "api_key": bool(config.api_key)})
        auth = "API key required" if config.api_key else "no API key"
        err(f"serving {config.model_dir if not graph else graph} on {url} ({auth}; "
            f"docs at {url}/docs)")

    stats = run(config, on_ready=ready)
    if as_json:
        echo_json({"event": "stopped", **stats})
    err(f"stopped after {stats['images']} image(s) in {stats['batches']} forward pass(es)")
