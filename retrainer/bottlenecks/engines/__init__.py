"""Extraction engines: where the images go through the backbone. Each fills the same cache.

An engine receives the backbone as a :class:`BackboneModel`, not as a runner: the local engine
builds its runner here, the Spark engine ships the model's bytes to its executors without
building one on the driver. Nothing downstream knows which engine ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from ...sources.base import ImageRecord, Skipped
from ..cache import BottleneckCache

__all__ = ["BackboneModel", "Engine", "Forward", "get_engine"]


@dataclass
class BackboneModel:
    """A backbone's forward pass as an engine receives it: built into a runner where it runs.

    ``cache_root``: where its frozen graph and conversions are kept (built once, read after).
    The runner is built on first use and kept, so one run's extractions share it.
    """

    backbone: Any
    cache_root: str | Path | None = None
    _runners: dict[int | None, Any] = field(default_factory=dict, repr=False, compare=False)

    def runner(self, threads: int | None = None) -> Any:
        """(N, H, W, 3) RGB 0..255 -> (N, dim) float32, in this process."""
        if threads not in self._runners:
            from ..extractor import make_forward

            self._runners[threads] = make_forward(self.backbone, self.cache_root,
                                                  threads=threads)
        return self._runners[threads]

    def shippable(self) -> tuple[str, str, bytes]:
        """``(runtime, precision, model bytes)`` for another process, read from the kept files:
        no TensorFlow session or other runtime is started here."""
        from ..extractor import forward_model

        if self.cache_root is not None:
            return forward_model(self.backbone, self.cache_root)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="retrainer-") as tmp:
            return forward_model(self.backbone, tmp)


#: What an engine's ``extract`` takes: the model, or a runner already built (a benchmark
#: reusing one across runs).
Forward = Any


def as_runner(forward: Forward) -> Any:
    """The runner of ``forward`` in this process."""
    return forward.runner() if isinstance(forward, BackboneModel) else forward


def as_shippable(forward: Forward) -> tuple[str, str, bytes] | None:
    """``forward`` as bytes for another process; None for a runner that cannot be shipped."""
    if isinstance(forward, BackboneModel):
        return forward.shippable()
    from ...runner import shippable

    return shippable(forward)


@runtime_checkable
class Engine(Protocol):
    """Computes the bottlenecks of ``items`` (cache key, record) into ``cache``.

    Returns the records it had to skip, with the reason (unreadable, not an image...); a
    record's bottleneck is stored under its key, and the cache is closed (flushed) on return,
    even when interrupted.
    """

    name: str

    def extract(self, items: Sequence[tuple[str, ImageRecord]], forward: Forward,
                size: tuple[int, int], resize: str, cache: BottleneckCache,
                batch_size: int = ...) -> list[Skipped]: ...


def get_engine(name: str = "local", **options: object) -> Engine:
    """The extraction engine by name: ``local`` (``workers``: decoding threads) or ``spark``
    (``master``, or ``spark``: a running session). Every engine fills the same cache.

    Options left as None are dropped, so unset CLI options never reach an engine; an option
    the engine does not take is an error.
    """
    from ...errors import RetrainerError

    options = {k: v for k, v in options.items() if v is not None}
    if name == "local":
        from .local import LocalEngine

        engine_class: Any = LocalEngine
    elif name == "spark":
        from .spark import SparkEngine

        engine_class = SparkEngine
        # Spark decodes on its executors; ``workers`` (the driver's hashing threads, which the
        # caller uses) has no say there.
        options.pop("workers", None)
    else:
        raise RetrainerError(f"unknown engine {name!r}.", "Use 'local' or 'spark'.")
    unknown = sorted(set(options) - set(engine_class.OPTIONS))
    if unknown:
        other = "spark" if name == "local" else "local"
        raise RetrainerError(f"{', '.join(unknown)} applies to the {other} engine only.",
                             f"Use engine={other!r}, or leave {unknown[0]} unset.")
    return engine_class(**options)
