"""Micro-batching: concurrent requests share one forward pass.

A single model thread takes the first waiting image, gathers whatever else arrives within
``max_wait_ms`` (up to ``max_batch_size``), runs one batched pass and hands each request its row.
It waits only for requests it knows are coming (announced with :meth:`MicroBatcher.incoming`
while their images decode), so a lone request never waits at all. While a pass runs, new
requests queue up, so under load batches fill by themselves and throughput approaches the
backbone's batched limit.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Ticket:
    """One announced request; ``used`` once its image is queued."""

    used: bool = False


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
        self._incoming = 0  # requests decoding now, that will submit soon

    @contextmanager
    def incoming(self) -> Iterator["Ticket"]:
        """Announce a request that will queue an image soon (wrap its reading and decoding in
        this); pass the ticket to :meth:`enqueue`, which ends the announcement as it queues."""
        ticket = Ticket()
        self._incoming += 1
        try:
            yield ticket
        finally:
            if not ticket.used:  # the request failed before queueing anything
                self._incoming -= 1

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

    def enqueue(self, pixels: np.ndarray, ticket: "Ticket | None" = None) -> asyncio.Future:
        """Queue one (H, W, 3) image from the event loop; the future gets its probabilities."""
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} images are already waiting for the model")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        if ticket is not None and not ticket.used:
            ticket.used = True
            self._incoming -= 1  # before the put, so the model thread never waits for it
        self._queue.put((pixels, future, loop))
        return future

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """Queue one (H, W, 3) image; resolve to its (classes,) probabilities."""
        return await self.enqueue(pixels)

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        """``first`` plus what is queued, and what arrives by the deadline while more is
        announced; (batch, whether a stop came)."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._incoming <= 0:
                    break
                try:  # short sleeps, so a request that fails to decode ends the wait early
                    item = self._queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
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
                    _notify(loop, future, None, exc)
                continue
            self.stats.busy_seconds += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for (_, future, loop), row in zip(batch, probs):
                _notify(loop, future, row, None)


def _notify(loop: asyncio.AbstractEventLoop, future: asyncio.Future, row: np.ndarray | None,
            exc: BaseException | None) -> None:
    """Hand a result to the request's event loop; a loop that has closed no longer cares."""
    try:
        loop.call_soon_threadsafe(_settle, future, row, exc)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, row: np.ndarray | None, exc: BaseException | None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(row)
