"""The local engine: decode on a bounded thread pool while the backbone runs on full batches."""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ImageError
from ..graph import GraphRunner
from ..images import load_pixels
from ..progress import bar
from ..sources.base import ImageRecord, Skipped
from .cache import BottleneckCache

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def decode_stream(
    items: Iterable[tuple[str, ImageRecord]], size: tuple[int, int], resize: str,
    workers: int, window: int,
) -> Iterator[tuple[str, ImageRecord, np.ndarray | None, str | None]]:
    """Decode records in parallel, in order, with at most ``window`` images in flight."""

    def work(rec: ImageRecord) -> np.ndarray:
        try:
            data = rec.read()
        except OSError as exc:
            raise ImageError(rec.display, f"cannot read ({exc.strerror or exc})") from None
        return load_pixels(data, size, resize, name=rec.display)

    pending: deque[tuple[str, ImageRecord, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        for key, rec in items:
            pending.append((key, rec, pool.submit(work, rec)))
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


def _result(key: str, rec: ImageRecord, fut: Future):
    try:
        return key, rec, fut.result(), None
    except ImageError as exc:
        return key, rec, None, exc.reason


class LocalEngine:
    """Runs the backbone in this process."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()

    def extract(self, items: Sequence[tuple[str, ImageRecord]], forward: GraphRunner,
                size: tuple[int, int], resize: str, cache: BottleneckCache,
                batch_size: int = 16) -> list[Skipped]:
        """Compute and cache bottlenecks for ``items`` (key, record); return the failures."""
        failures: list[Skipped] = []
        with bar(len(items), "extracting bottlenecks") as progress:

            def skip(key: str, rec: ImageRecord, reason: str, where: tuple[int, int]) -> None:
                log.warning("skipped %s: %s", rec.display, reason)
                failures.append(Skipped(rec.display, reason))
                progress.update(1)

            try:
                batches = decoded_batches(items, size, resize, self.workers, batch_size, skip)
                for pairs, features in forward.stream(batches):
                    cache.add([key for key, _ in pairs], features)
                    progress.update(len(pairs))
            finally:
                cache.close()  # keep what was computed, even when interrupted
        return failures
