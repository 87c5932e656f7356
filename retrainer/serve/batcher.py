"""Micro-batching: concurrent requests share forward passes.

A model thread takes the first waiting image, gathers whatever else arrives within
``max_wait_ms`` (up to a batch limit), runs one batched pass and hands each request its row.
It waits only while more is known to be coming: requests announced with
:meth:`MicroBatcher.incoming` (their images are decoding), or, with a single model thread,
until the batch holds as many as the last second saw in the service at once. So a lone request
never waits.

There is one model thread per *lane*: per predict function given, e.g. one per TensorFlow
session on its own core. One lane waits for the whole crowd, so N clients that each send their
next image as soon as they get an answer settle into one full batch of N per pass, instead of
two half-empty ones. Several lanes never wait for a crowd, and each takes at most
ceil(peak / (2 x lanes)) images: every lane then has one batch running and the next one
queued, so no core idles while answers travel back and the next images decode (docs/serve.md
has what one lane cost).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]

_STOP = object()
#: How long a peak of requests in flight is remembered.
PEAK_WINDOW_S = 1.0


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
                "mean_batch": round(mean, 2),
                # summed over the lanes: up to lanes x wall time
                "model_busy_seconds": round(self.busy_seconds, 3)}


class MicroBatcher:
    """Runs ``predict`` ((N, H, W, 3) -> (N, classes)) on model threads, in batches.

    ``predict`` is one function, or a sequence of them: one model thread (lane) each.
    """

    def __init__(self, predict: Predict | Sequence[Predict], max_batch_size: int = 32,
                 max_wait_ms: float = 2.0, max_queue: int = 512) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.lanes: list[Predict] = [predict] if callable(predict) else list(predict)
        if not self.lanes:
            raise ValueError("give at least one predict function")
        self.max_batch_size = max_batch_size
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._incoming = 0  # requests decoding now, that will submit soon
        self._in_flight = 0  # announced requests not answered yet
        self._peak, self._peak_at = 0, 0.0  # most in flight at once, recently
        self._lock = threading.Lock()  # changed from the loop, worker and model threads

    @contextmanager
    def incoming(self) -> Iterator["Ticket"]:
        """Announce a request that will queue an image soon (wrap its reading and decoding in
        this); pass the ticket to :meth:`enqueue`, which ends the announcement as it queues."""
        ticket = Ticket()
        with self._lock:
            self._incoming += 1
            self._count_in_flight(1)
        try:
            yield ticket
        finally:
            if not ticket.used:  # the request failed before queueing anything
                with self._lock:
                    ticket.used = True
                    self._incoming -= 1
                    self._count_in_flight(-1)

    def _count_in_flight(self, delta: int) -> None:
        """Under the lock: track requests in the service and their recent peak."""
        self._in_flight += delta
        now = time.monotonic()
        if self._in_flight >= self._peak or now - self._peak_at > PEAK_WINDOW_S:
            self._peak, self._peak_at = self._in_flight, now

    def _limits(self) -> tuple[int, int]:
        """(the most images the next pass takes, how many it waits for within ``max_wait``)."""
        with self._lock:
            peak = self._peak
        lanes = len(self.lanes)
        if lanes == 1:
            return self.max_batch_size, min(self.max_batch_size, peak)
        share = -(-peak // (2 * lanes))  # one batch running and one queued per lane
        return max(1, min(self.max_batch_size, share)), 1

    def start(self) -> None:
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, args=(predict,),
                                              name=f"model-{i}", daemon=True)
                             for i, predict in enumerate(self.lanes)]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the model threads."""
        for _ in self._threads:
            self._queue.put(_STOP)  # behind everything queued; each lane ends at one
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def enqueue(self, pixels: np.ndarray, ticket: "Ticket | None" = None) -> asyncio.Future:
        """Queue one (H, W, 3) image from the event loop; the future gets its probabilities."""
        if not self._threads:
            raise RuntimeError("the batcher is not running")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} images are already waiting for the model")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        counted = ticket is not None and not ticket.used  # in flight since incoming()
        if counted:
            with self._lock:
                ticket.used = True
                self._incoming -= 1  # before the put, so no model thread waits for it
        self._queue.put((pixels, future, loop, counted))
        return future

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        """``first`` plus what is queued, and what arrives by the deadline while more is
        announced or the batch is below what it waits for; (batch, whether a stop came)."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        limit, expected = self._limits()
        while len(batch) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._incoming <= 0 and len(batch) >= expected):
                    break
                # One blocking wait, not a polling loop: a thread that wakes every fraction of
                # a millisecond takes the GIL from the event loop while it reads requests. (A
                # request that fails to decode just lets the wait run to the deadline.)
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    continue
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, predict: Predict) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._gather(first)
            started = time.perf_counter()
            try:
                probs = predict(np.stack([pixels for pixels, _, _, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                log.exception("forward pass failed for a batch of %d", len(batch))
                self._answered(batch)
                for _, future, loop, _ in batch:
                    _notify(loop, future, None, exc)
                continue
            with self._lock:
                self.stats.busy_seconds += time.perf_counter() - started
                self.stats.batches += 1
                self.stats.images += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
            self._answered(batch)
            for (_, future, loop, _), row in zip(batch, probs):
                _notify(loop, future, row, None)

    def _answered(self, batch: list[tuple]) -> None:
        with self._lock:
            self._count_in_flight(-sum(1 for item in batch if item[3]))


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
