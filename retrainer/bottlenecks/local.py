"""The local engine: decode on a bounded thread pool while the backbone runs on full batches."""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ImageError
from ..images import load_pixels
from ..progress import bar
from ..sources.base import ImageRecord, Skipped
from .cache import BottleneckCache

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], np.ndarray]


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

    def extract(self, items: Sequence[tuple[str, ImageRecord]], forward: Forward,
                size: tuple[int, int], resize: str, cache: BottleneckCache,
                batch_size: int = 16) -> list[Skipped]:
        """Compute and cache bottlenecks for ``items`` (key, record); return the failures."""
        failures: list[Skipped] = []
        keys: list[str] = []
        batch: list[np.ndarray] = []

        def run() -> None:
            cache.add(keys, forward(np.stack(batch)))
            keys.clear()
            batch.clear()

        with bar(len(items), "extracting bottlenecks") as progress:
            try:
                stream = decode_stream(items, size, resize, self.workers, window=2 * batch_size)
                for key, rec, pixels, error in stream:
                    if pixels is None:
                        log.warning("skipped %s: %s", rec.display, error)
                        failures.append(Skipped(rec.display, error or "unreadable"))
                    else:
                        keys.append(key)
                        batch.append(pixels)
                        if len(batch) >= batch_size:
                            run()
                    progress.update(1)
                if batch:
                    run()
            finally:
                cache.close()  # keep what was computed, even when interrupted
        return failures
