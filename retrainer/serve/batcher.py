"""Micro-batching: concurrent requests share one forward pass.

A single model thread takes the first waiting image, gathers whatever else arrives within
``max_wait_ms`` (up to ``max_batch_size``), runs one batched pass and hands each request its row.
While a pass runs, new requests queue up, so under load batches fill by themselves and throughput
approaches the backbone's batched limit; a lone request waits at most ``max_wait_ms``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

_STOP = object()


class QueueFull(Exception):
    """More requests are waiting for the model than the server accepts."""


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest: int = 0
    busy_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "largest_batch": self.largest,
                "mean_batch": round(mean, 2), "model_busy_seconds": round(self.busy_seconds, 3)}


class MicroBatcher:
    """Runs ``predict`` ((N, H, W, 3) -> (N, classes)) on a dedicated thread, in batches."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_ms: float = 2.0, max_queue: int = 512) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the model thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """Queue one (H, W, 3) image; resolve to its (classes,) probabilities."""
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} images are already waiting for the model")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((pixels, future, loop))
        return await future

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._gather(first)
            started = time.perf_counter()
            try:
                probs = self.predict(np.stack([pixels for pixels, _, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                log.exception("forward pass failed for a batch of %d", len(batch))
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(_settle, future, None, exc)
                continue
            self.stats.busy_seconds += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for (_, future, loop), row in zip(batch, probs):
                loop.call_soon_threadsafe(_settle, future, row, None)


def _settle(future: asyncio.Future, row: np.ndarray | None, exc: BaseException | None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(row)
