"""The Spark engine: bottlenecks computed by Spark workers, cached by the driver as usual.

Spark reads the image files with its ``binaryFile`` source and hashes each one (SHA-256, the
cache key) from the very bytes it decodes, so a file changed since the scan is stored under its
new content, never under the old key; a file deleted since the scan is a counted skip. Records
that are not files (database rows, augmented variants) are read on the driver and their bytes
shipped to Spark under the caller's keys. On the executors (:mod:`retrainer.spark.workers`)
``predict_batch_udf`` decodes the bytes with the same code as the local engine and runs the
backbone, whose model bytes the driver reads from the kept files (it builds no runner of its
own) and broadcasts once; each Python worker loads it once. Images go in chunks, one Spark job each with every executor busy; each chunk's features come
back to the driver as one Arrow table (a chunk bounds the driver's memory) and go into the same
:class:`BottleneckCache` the local engine fills: a later local ``train`` finds every
bottleneck there. Head training stays local.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from ...errors import ImageError
from ...progress import bar
from ...sources.base import ImageRecord, Skipped
from ...spark.session import SparkError, job_failed, spark_session
from ...spark.workers import (Shippable, bottleneck_udf, local_path, read_images, shipped,
                              spark_path, worker_threads)
from ..cache import BottleneckCache
from . import Forward, as_shippable

log = logging.getLogger(__name__)

#: Images per Spark job: CHUNK_PER_CORE per core of the cluster, within [CHUNK_MIN, CHUNK_MAX].
CHUNK_MIN = 512
CHUNK_PER_CORE = 128
CHUNK_MAX = 16384


#: Bytes read on the driver per Spark job when records are shipped rather than read by Spark.
SHIP_BYTES = 64 << 20


class SparkEngine:
    """Computes bottlenecks on Spark (``master``: local[N], spark://HOST:PORT, yarn...).

    With ``spark`` given, that session is used and left running; otherwise one is started for
    each extraction and stopped after it.
    """

    name = "spark"
    OPTIONS = ("master", "spark")

    def __init__(self, master: str | None = None, spark: Any = None) -> None:
        self.master = master
        self.spark = spark

    def extract(self, items: Sequence[tuple[str, ImageRecord]], forward: Forward,
                size: tuple[int, int], resize: str, cache: BottleneckCache,
                batch_size: int = 32) -> list[Skipped]:
        """Compute and cache bottlenecks for ``items`` (key, record); return the failures."""
        if not items:
            cache.close()
            return []
        model = as_shippable(forward)
        if model is None:
            raise SparkError("the spark engine needs a model it can ship to its workers.")
        by_path: dict[str, ImageRecord] = {}
        records: list[tuple[str, ImageRecord]] = []  # not files: bytes go to Spark
        for key, rec in items:
            if is_file_record(rec):
                by_path[os.path.abspath(rec.path)] = rec  # type: ignore[arg-type]
            else:
                records.append((key, rec))
        if self.spark is not None:
            return self._extract(self.spark, by_path, records, model, size, resize, cache,
                                 batch_size)
        with spark_session(self.master, "retrainer bottlenecks") as spark:
            return self._extract(spark, by_path, records, model, size, resize, cache,
                                 batch_size)

    def _extract(self, spark: Any, by_path: dict[str, ImageRecord],
                 records: list[tuple[str, ImageRecord]], model: Shippable,
                 size: tuple[int, int], resize: str, cache: BottleneckCache,
                 batch_size: int) -> list[Skipped]:
        """``by_path``: the file records, which Spark reads; ``records``: the others (key,
        record), whose bytes the driver reads and sends."""
        from pyspark.sql import functions as F

        failures: list[Skipped] = []
        chunk = chunk_size(spark)

        def skip(name: str, reason: str) -> None:
            log.warning("skipped %s: %s", name, reason)
            failures.append(Skipped(name, reason))

        with bar(len(by_path) + len(records), "extracting bottlenecks (spark)") as progress, \
                shipped(spark, model) as (broadcast, digest):
            udf = bottleneck_udf(broadcast, digest, cache.dim, size, resize, batch_size,
                                 worker_threads(spark))
            try:
                paths = list(by_path)
                for start in range(0, len(paths), chunk):
                    part = paths[start:start + chunk]
                    present = [p for p in part if os.path.isfile(p)]
                    for gone in sorted(set(part) - set(present)):
                        skip(by_path[gone].display, "cannot read (the file was deleted)")
                        progress.update(1)
                    if not present:
                        continue
                    frame = read_images(spark, [spark_path(p) for p in present])
                    # The key is the hash of the bytes this same row decodes.
                    result = (frame.select("path", F.sha2("content", 256).alias("key"),
                                           udf("content").alias("out"))
                              .select("path", "key", "out.features", "out.error"))
                    seen: set[str] = set()
                    for path, key, features, error in _computed(result, cache.dim):
                        progress.update(1)
                        seen.add(local_path(path))
                        rec = by_path.get(local_path(path))
                        name = rec.display if rec else local_path(path)
                        if error is not None:
                            skip(name, error)
                            continue
                        cache.add([key], features[None])
                    for gone in sorted(set(present) - seen):  # deleted while the job ran
                        skip(by_path[gone].display, "cannot read (the file was deleted)")
                        progress.update(1)
                rows: list[tuple[str, bytes]] = []
                names: dict[str, str] = {}

                def run_shipped() -> None:
                    frame = spark.createDataFrame(rows, "key string, content binary")
                    result = (frame.select("key", udf("content").alias("out"))
                              .select("key", "out.features", "out.error"))
                    for key, _, features, error in _computed(result, cache.dim, name="key"):
                        progress.update(1)
                        if error is not None:
                            skip(names.get(key, key), error)
                            continue
                        cache.add([key], features[None])
                    rows.clear()
                    names.clear()

                held = 0
                for key, rec in records:  # read lazily: the driver holds one job's bytes
                    try:
                        data = rec.read()
                    except OSError as exc:
                        skip(rec.display, f"cannot read ({exc.strerror or exc})")
                        progress.update(1)
                        continue
                    except ImageError as exc:  # an augmented variant of a broken image
                        skip(rec.display, exc.reason)
                        progress.update(1)
                        continue
                    rows.append((key, data))
                    names[key] = rec.display
                    held += len(data)
                    if len(rows) >= chunk or held >= SHIP_BYTES:
                        run_shipped()
                        held = 0
                if rows:
                    run_shipped()
            finally:
                cache.close()  # keep what was computed, even when interrupted
        return failures


def is_file_record(rec: ImageRecord) -> bool:
    """True for a record that is the file at ``rec.path`` (Spark can read it itself)."""
    return bool(rec.path) and os.path.isfile(rec.path)  # type: ignore[arg-type]


def chunk_size(spark: Any) -> int:
    """Images per Spark job: every core busy, and a bounded result for the driver to hold."""
    return min(CHUNK_MAX, max(CHUNK_MIN, CHUNK_PER_CORE * spark.sparkContext.defaultParallelism))


def _computed(frame: Any, dim: int, name: str = "path"
              ) -> Iterator[tuple[str, str, np.ndarray, str | None]]:
    """(path, key, features, error) of one chunk, computed by all executors at once.

    ``toLocalIterator`` would run one partition at a time (two with prefetching) and leave a
    cluster idle, so a chunk is one parallel job whose small result (features, not images)
    comes back as one Arrow table.
    """
    try:
        table = frame.toArrow()
    except Exception as exc:  # noqa: BLE001 - py4j / Spark raise many kinds
        raise job_failed(exc) from exc
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    features = values.astype(np.float32, copy=False).reshape(table.num_rows, dim)
    yield from zip(table.column(name).to_pylist(), table.column("key").to_pylist(),
                   features, table.column("error").to_pylist())
