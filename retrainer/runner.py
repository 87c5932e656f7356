"""Running a model on numpy batches over lanes side by side, on any runtime.

A *lane* is one model instance with its own threads (a TensorFlow session, a LiteRT
interpreter). A batch is split over the lanes and each share runs on its lane's thread, so two
single-threaded lanes keep two cores busy where one two-threaded instance leaves them idle on
small convolutions (docs/performance.md). :class:`LaneRunner` holds that scheduling once;
:class:`retrainer.graph.GraphRunner` (TensorFlow) and :class:`LiteRTRunner` only say how one lane
runs a batch. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")

#: The runtimes an exported model can run on; ``auto`` picks the fastest installed one.
RUNTIMES = ("auto", "tensorflow", "litert")


def default_replicas(cores: int) -> int:
    """Lanes a runner spreads a batch over: two whenever there are two cores."""
    return 2 if cores >= 2 else 1


class LaneRunner:
    """Batches split over ``replicas`` lanes, each with one thread of its own.

    Subclasses set ``input_shape`` (with a free batch dimension) and ``output_dim`` and
    implement :meth:`run_on`, which must be thread-safe for its lane.
    """

    runtime = "none"
    input_shape: tuple[int | None, ...]
    output_dim: int

    def __init__(self, replicas: int) -> None:
        self._n = max(1, replicas)
        # One thread per lane, for as long as the runner lives: a batch's shares queue on
        # them, so a lane goes on to its next share without waiting for the others.
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"{self.runtime}-lane-{i}")
                       for i in range(self._n)] if self._n > 1 else []

    @property
    def replicas(self) -> int:
        return self._n

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input_shape[1]), int(self.input_shape[2])  # type: ignore[arg-type]

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        """The forward pass of ``batch`` on lane ``replica`` only (thread-safe)."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if not self._lanes or len(batch) <= 1:
            return self.run_on(0, batch)
        return _joined(self._submit(batch))

    def _submit(self, batch: np.ndarray) -> list[Future]:
        """Split ``batch`` over the lanes, each share queued on its lane's thread."""
        parts = np.array_split(np.asarray(batch), max(1, min(len(self._lanes), len(batch))))
        return [lane.submit(self.run_on, i, part)
                for i, (lane, part) in enumerate(zip(self._lanes, parts))]

    def stream(self, batches: Iterable[tuple[T, np.ndarray]], depth: int = 2
               ) -> Iterator[tuple[T, np.ndarray]]:
        """(tag, output) for each (tag, batch), in order, keeping every lane busy.

        Up to ``depth`` batches are in flight, so a lane moves on to its share of the next
        batch as soon as it is done instead of waiting for the slowest share: with decoding
        competing for the same cores, the shares never finish together.
        """
        if not self._lanes:
            for tag, batch in batches:
                yield tag, self.run_on(0, batch)
            return
        pending: deque[tuple[T, list[Future]]] = deque()
        try:
            for tag, batch in batches:
                pending.append((tag, self._submit(batch)))
                if len(pending) >= max(1, depth):
                    tag, parts = pending.popleft()
                    yield tag, _joined(parts)
            while pending:
                tag, parts = pending.popleft()
                yield tag, _joined(parts)
        finally:  # stopped early: drop the shares not started, let the running ones end
            for _, parts in pending:
                for future in parts:
                    future.cancel()
            wait([f for _, parts in pending for f in parts])

    def close(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True)


def _joined(parts: list[Future]) -> np.ndarray:
    return np.concatenate([f.result() for f in parts])


def litert_available() -> bool:
    """True when the LiteRT interpreter (package ai-edge-litert) can be imported."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class LiteRTRunner(LaneRunner):
    """An exported ``model.tflite`` (signature ``serving_default``: ``images`` -> ``scores``)
    on LiteRT interpreters, one per lane, without importing TensorFlow.

    Starting takes a fraction of a second where TensorFlow takes seconds, which is what makes
    a one-image ``retrainer label`` fast; the scores match the frozen graph's to float
    round-off (docs/performance.md).
    """

    runtime = "litert"

    def __init__(self, path: str | Path, threads: int | None = None,
                 replicas: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        cores = threads or os.cpu_count() or 1
        n = max(1, replicas or default_replicas(cores))
        per = max(1, cores // n)
        self._interpreters = [Interpreter(model_path=str(path), num_threads=per) for _ in range(n)]
        self._runners = [i.get_signature_runner("serving_default") for i in self._interpreters]
        self._locks = [threading.Lock() for _ in range(n)]
        details = self._runners[0].get_input_details()["images"]
        out = self._runners[0].get_output_details()["scores"]
        self.input_shape = (None, *(int(d) for d in details["shape"][1:]))
        self.output_dim = int(out["shape"][-1])
        super().__init__(n)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, np.float32)
        if not len(batch):
            return np.zeros((0, self.output_dim), np.float32)
        with self._locks[replica]:
            out = self._runners[replica](images=batch)["scores"]
        return np.array(out, np.float32)  # a copy: the interpreter reuses its buffers
