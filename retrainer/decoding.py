"""Image files to pixels for every stage: decoding on a bounded thread pool, in order.

Extraction, labelling, fine-tuning and the database import all decode this way, so the window
of images in flight (and with it the memory) is bounded the same everywhere.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .errors import ImageError
from .images import load_pixels
from .sources.base import ImageRecord


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def decode_stream(
    items: Iterable[tuple[str, ImageRecord]], size: tuple[int, int], resize: str,
    workers: int, window: int,
) -> Iterator[tuple[str, ImageRecord, np.ndarray | None, str | None]]:
    """Decode records in parallel, in order, with at most ``window`` images in flight."""
    pending: deque[tuple[str, ImageRecord, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        for key, rec in items:
            pending.append((key, rec, pool.submit(_load, rec, size, resize)))
            if len(pending) >= window:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def decoded_batches(
    items: Iterable[tuple[str, ImageRecord]], size: tuple[int, int], resize: str, workers: int,
    batch_size: int, on_error: Callable[[str, ImageRecord, str, tuple[int, int]], None],
) -> Iterator[tuple[list[tuple[str, ImageRecord]], np.ndarray]]:
    """Batches of ``batch_size`` decoded images: ((key, record) pairs, stacked pixels).

    An image that cannot be decoded goes to ``on_error(key, record, reason, (batch, row))``:
    it came just before row ``row`` of batch number ``batch`` (a batch that may never come).
    """
    pairs: list[tuple[str, ImageRecord]] = []
    pixels: list[np.ndarray] = []
    made = 0
    for key, rec, image, error in decode_stream(items, size, resize, workers, 2 * batch_size):
        if image is None:
            on_error(key, rec, error or "unreadable", (made, len(pairs)))
            continue
        pairs.append((key, rec))
        pixels.append(image)
        if len(pairs) >= batch_size:
            yield pairs, np.stack(pixels)
            pairs, pixels, made = [], [], made + 1
    if pairs:
        yield pairs, np.stack(pixels)


def decode_batch(records: Sequence[ImageRecord], size: tuple[int, int], resize: str
                 ) -> tuple[np.ndarray, list[str | None]]:
    """Read and decode ``records`` on this thread: (pixels of those that decoded, in order;
    for each record None, or why it could not be decoded).

    The pixels are written straight into a batch buffer that this thread keeps: valid until
    this thread's next call (:meth:`retrainer.runner.LaneRunner.stream_made` runs a batch
    before its thread makes the next one).
    """
    batch = _batch_buffer((len(records), *size, 3))
    errors: list[str | None] = []
    done = 0
    for rec in records:
        try:
            _load(rec, size, resize, out=batch[done])
        except ImageError as exc:
            errors.append(exc.reason)
            continue
        errors.append(None)
        done += 1
    return batch[:done], errors


T = TypeVar("T")


def run_on_lanes(runner: Any, items: Iterable[T], record: Callable[[T], ImageRecord],
                 size: tuple[int, int], resize: str, batch_size: int, step: int
                 ) -> Iterator[tuple[list[T], list[str | None], np.ndarray]]:
    """(items, per item None or why it failed, outputs of those that decoded), in order: each
    of ``runner``'s lanes reads and decodes its share of a batch (``batch_size / lanes``
    items; ``record(item)`` is the image) on its own thread and runs it ``step`` images at a
    time (:meth:`retrainer.runner.LaneRunner.stream_made`): no more threads than cores."""
    from itertools import islice

    share = max(1, -(-batch_size // runner.replicas))

    def job(part: list[T]) -> tuple[Any, np.ndarray]:
        pixels, errors = decode_batch([record(item) for item in part], size, resize)
        return (part, errors), pixels

    def jobs() -> Iterator[Callable[[], tuple[Any, np.ndarray]]]:
        it = iter(items)
        while part := list(islice(it, share)):
            yield lambda part=part: job(part)

    for (part, errors), outputs in runner.stream_made(jobs(), step=step):
        yield part, errors, outputs


_BATCH = threading.local()


def _batch_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` in this thread's batch buffer (reused: a fresh one per
    batch costs a page fault every 4 KB)."""
    size = int(np.prod(shape))
    buf = getattr(_BATCH, "buffer", None)
    if buf is None or buf.size < size:
        buf = _BATCH.buffer = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def _load(rec: ImageRecord, size: tuple[int, int], resize: str,
          out: np.ndarray | None = None) -> np.ndarray:
    try:
        data = rec.read()
    except OSError as exc:
        raise ImageError(rec.display, f"cannot read ({exc.strerror or exc})") from None
    return load_pixels(data, size, resize, name=rec.display, out=out)


def _result(key: str, rec: ImageRecord, fut: Future):
    try:
        return key, rec, fut.result(), None
    except ImageError as exc:
        return key, rec, None, exc.reason
