"""Running the service: load the export once, bind, serve with uvicorn, stop gracefully.

SIGTERM and SIGINT stop accepting connections, let in-flight requests finish (up to
``graceful_timeout``), end the model threads, and return normally, so the process exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelDirError, RetrainerError
from ..export import GRAPH_FILE, TFLITE_FILE
from ..files import file_sha256
from .auth import is_loopback
from .settings import ServeConfig

log = logging.getLogger(__name__)


class ServeError(RetrainerError):
    """The service cannot start: unsafe binding, port in use, missing server packages."""


def _stop_before_serving(signum: int, frame: Any) -> None:
    """SIGTERM/SIGINT while the model loads: nothing is bound or written yet, so leave now.

    An exception raised from here could be swallowed or rewrapped by the import and loading
    code it interrupts; ending the process directly is the one predictable way.
    """
    try:
        sys.stderr.write("stopped while loading the model\n")
        sys.stderr.flush()
    finally:
        os._exit(0)


def check_binding(config: ServeConfig) -> None:
    """Refuse to expose an unauthenticated model beyond this machine."""
    if not is_loopback(config.host) and not config.api_key:
        raise ServeError(f"binding to '{config.host}' makes the model reachable from other "
                         "machines, so an API key is required.",
                         "Give api_key=KEY (or set RETRAINER_API_KEY), or bind to 127.0.0.1.")


def load_model(config: ServeConfig) -> tuple[Any, dict[str, Any]]:
    """The classifier and what ``/v1/model`` tells about it (no file system paths)."""
    from ..predict import Classifier

    classifier = Classifier.load(config.model_dir if not config.graph else None,
                                 graph=config.graph, labels=config.labels,
                                 runtime=config.runtime, graph_digest=True)
    graph_path = Path(config.graph) if config.graph else Path(config.model_dir) / GRAPH_FILE
    digest = classifier.graph_sha256  # of the graph loaded (an export may replace it later)
    if digest is None:  # a folder with model.tflite only
        graph_path = Path(config.model_dir) / TFLITE_FILE
        try:
            digest = file_sha256(graph_path)
        except OSError as exc:
            raise ModelDirError(f"cannot read '{graph_path}' ({exc.strerror or exc}).",
                                "Check the model folder (model_dir=DIR).") from None
    meta = classifier.metadata
    name = (Path(config.model_dir).resolve().name if not config.graph
            else graph_path.stem)
    training = {k: v for k, v in (meta.get("training") or {}).items() if k != "image_source"}
    info: dict[str, Any] = {
        "name": name,
        "version": digest[:16],
        "backbone": (meta.get("backbone") or {}).get("name"),
        "input_size": list(classifier.input_size),
        "resize": classifier.resize,
        "labels": list(classifier.labels),
        "created": meta.get("created"),
        "retrainer_version": meta.get("retrainer_version"),
        "training": training,
    }
    return classifier, info


def warm_up(classifier: Any, batch_size: int) -> float:
    """Run every session once at batch 1, and the graph at the largest batch, so no request
    pays for a session's first run."""
    import numpy as np

    height, width = classifier.input_size
    t = time.perf_counter()
    for lane in classifier.lanes():
        lane(np.zeros((1, height, width, 3), np.float32))
    classifier.predict(np.zeros((batch_size, height, width, 3), np.float32))
    return time.perf_counter() - t


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it small responses wait ~40 ms for delayed ACKs (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}).",
                         "Pick another port=PORT, or stop what is using it.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def guarded_protocol(header_timeout: float, body_timeout: float) -> Any:
    """uvicorn's HTTP protocol with read deadlines, against slow clients (slowloris).

    uvicorn has a keep-alive timeout but no deadline for reading a request: a client that
    trickles a header byte every few seconds holds its connection (and a slot) forever, as
    does a connection that never sends anything. Here a new connection, and every request
    from its first byte, must deliver its headers within ``header_timeout`` seconds and then
    its body within ``body_timeout``; otherwise the connection is closed.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as exc:  # httptools is part of retrainer[serve]
        raise ServeError(f"the server packages are not installed ({exc.name}).",
                         "Install them: pip install 'retrainer[serve]' (from a checkout: "
                         ".venv/bin/pip install -e '.[serve]').") from None

    class GuardedProtocol(HttpToolsProtocol):
        read_deadline: Any = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self.read_deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def _too_slow(self) -> None:
            self.read_deadline = None
            if not self.transport.is_closing():
                log.info("closed a connection that sent its request too slowly")
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(header_timeout)

        def on_headers_complete(self) -> None:
            self._arm(body_timeout)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

    return GuardedProtocol


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with the access log on stderr too: stdout is for ``--json``."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    conf = copy.deepcopy(LOGGING_CONFIG)
    conf["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return conf


def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load, bind and serve until SIGTERM/SIGINT; return the final request counters."""
    check_binding(config)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ServeError(f"the server packages are not installed ({exc.name}).",
                         "Install them: pip install 'retrainer[serve]' (from a checkout: "
                         ".venv/bin/pip install -e '.[serve]').") from None
    # A stop requested while loading ends the process cleanly (status 0), like one later on.
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, _stop_before_serving) for sig in signals}
    try:
        log.debug("loading the model from %s", config.graph or config.model_dir)
        classifier, info = load_model(config)
        if not classifier.labels:
            raise ModelDirError("the labels file is empty.")
        log.debug("warm-up took %.2f s", warm_up(classifier, config.max_batch_size))
        # From here uvicorn catches the signals; it re-raises the one it caught once it has
        # shut down, which these no-op handlers absorb, so a requested stop exits with status 0.
        stop_early: list[int] = []
        for sig in signals:
            signal.signal(sig, lambda signum, _frame: stop_early.append(signum))
        app = create_app(classifier, config, info)
        sock = bind(config.host, config.port)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        uv_config = uvicorn.Config(app, log_level="info" if config.access_log else "warning",
                                   access_log=config.access_log, log_config=_log_config(),
                                   lifespan="on",
                                   timeout_graceful_shutdown=config.graceful_timeout,
                                   server_header=False, timeout_keep_alive=config.keep_alive,
                                   limit_concurrency=config.max_connections,
                                   http=guarded_protocol(config.header_timeout,
                                                         config.body_timeout))

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if self.started and on_ready is not None:
                    on_ready(url)

        server = Server(uv_config)
        if stop_early:
            sock.close()
            return {"images": 0, "batches": 0}
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ServeError("the server did not start (see the messages above).")
    stats = app.state.batcher.stats.to_dict()
    sys.stderr.flush()
    return stats
