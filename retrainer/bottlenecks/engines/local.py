"""The local engine: each of the runner's lanes reads, decodes and runs its own share of the
images, a few at a time (or, with ``workers``, decoding on a thread pool beside the lanes)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from ...decoding import decoded_batches, run_on_lanes
from ...progress import bar
from ...runner import LANE_STEP, LaneRunner
from ...sources.base import ImageRecord, Skipped
from ..cache import BottleneckCache
from . import Forward, as_runner

log = logging.getLogger(__name__)


class LocalEngine:
    """Runs the backbone in this process.

    By default each lane of the runner reads and decodes its share of a batch on its own
    thread, then runs it :data:`retrainer.runner.LANE_STEP` images at a time
    (:meth:`retrainer.runner.LaneRunner.stream_made`): no more threads than cores, and on a
    CPU the small runs are the runtimes' fastest (docs/performance.md). ``workers`` instead
    decodes on a pool of that many threads while the lanes run whole batches (slow reads, or a
    GPU, where large batches pay); the bottlenecks are the same either way.
    """

    name = "local"
    OPTIONS = ("workers",)

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

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

            def skip(rec: ImageRecord, reason: str) -> None:
                log.warning("skipped %s: %s", rec.display, reason)
                failures.append(Skipped(rec.display, reason))
                progress.update(1)

            try:
                if self.workers is None and on_lanes(runner):
                    self._extract_on_lanes(items, runner, size, resize, cache, batch_size,
                                           skip, progress)
                else:
                    from ...decoding import default_workers

                    batches = decoded_batches(items, size, resize,
                                              self.workers or default_workers(), batch_size,
                                              lambda key, rec, reason, where: skip(rec, reason))
                    for pairs, features in runner.stream(batches):
                        cache.add([key for key, _ in pairs], features)
                        progress.update(len(pairs))
            finally:
                cache.close()  # keep what was computed, even when interrupted
        return failures

    @staticmethod
    def _extract_on_lanes(items: Sequence[tuple[str, ImageRecord]], runner: LaneRunner,
                          size: tuple[int, int], resize: str, cache: BottleneckCache,
                          batch_size: int, skip: Callable[[ImageRecord, str], None],
                          progress: Any) -> None:
        for part, errors, features in run_on_lanes(runner, items, lambda item: item[1], size,
                                                   resize, batch_size, LANE_STEP):
            keys = []
            for (key, rec), error in zip(part, errors):
                if error is None:
                    keys.append(key)
                else:
                    skip(rec, error)
            if keys:
                cache.add(keys, features)
                progress.update(len(keys))


def on_lanes(runner: Any) -> bool:
    """Whether ``runner`` decodes and runs on its lanes: a :class:`LaneRunner` on the CPU (on a
    GPU, TensorFlow runs large batches best, decoded beside it)."""
    if not isinstance(runner, LaneRunner):
        return False
    if getattr(runner, "runtime", None) == "tensorflow":
        from ...graph import cpu_only

        return cpu_only()
    return True
