"""The local engine: decode on a bounded thread pool while the backbone runs on full batches."""
from __future__ import annotations

import logging
from typing import Sequence

from ...decoding import decoded_batches, default_workers
from ...progress import bar
from ...sources.base import ImageRecord, Skipped
from ..cache import BottleneckCache
from . import Forward, as_runner

log = logging.getLogger(__name__)


class LocalEngine:
    """Runs the backbone in this process; ``workers`` threads decode the images."""

    name = "local"
    OPTIONS = ("workers",)

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()

    def extract(self, items: Sequence[tuple[str, ImageRecord]], forward: Forward,
                size: tuple[int, int], resize: str, cache: BottleneckCache,
                batch_size: int = 16) -> list[Skipped]:
        """Compute and cache bottlenecks for ``items`` (key, record); return the failures."""
        failures: list[Skipped] = []
        if not items:
            cache.close()
            return failures
        runner = as_runner(forward)
        with bar(len(items), "extracting bottlenecks") as progress:

            def skip(key: str, rec: ImageRecord, reason: str, where: tuple[int, int]) -> None:
                log.warning("skipped %s: %s", rec.display, reason)
                failures.append(Skipped(rec.display, reason))
                progress.update(1)

            try:
                batches = decoded_batches(items, size, resize, self.workers, batch_size, skip)
                for pairs, features in runner.stream(batches):
                    cache.add([key for key, _ in pairs], features)
                    progress.update(len(pairs))
            finally:
                cache.close()  # keep what was computed, even when interrupted
        return failures
