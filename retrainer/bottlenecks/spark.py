"""The Spark engine: bottlenecks computed by Spark workers, cached by the driver as usual.

Spark reads the image files with its ``binaryFile`` source and hashes each one (SHA-256, the
cache key); ``predict_batch_udf`` decodes the bytes with the same code as the local engine and
runs the backbone's frozen graph, which is broadcast once and loaded once per Python worker.
Images go in chunks, one Spark job each with every executor busy; each chunk's features come
back to the driver as one Arrow table (a chunk bounds the driver's memory) and go into the same
:class:`BottleneckCache` the local engine fills: a later local ``train`` finds every
bottleneck there. Head training stays local.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..progress import bar
from ..sources.base import ImageRecord, Skipped
from ..spark_session import SparkError, local_cores, spark_session
from .._tf_internals import import_tensorflow
from .cache import BottleneckCache

log = logging.getLogger(__name__)

_GLOB_CHARS = "\\[]{}*?"
#: Images per Spark job: CHUNK_PER_CORE per core of the cluster, within [CHUNK_MIN, CHUNK_MAX].
CHUNK_MIN = 512
CHUNK_PER_CORE = 128
CHUNK_MAX = 16384


def spark_path(path: str) -> str:
    """A local file path as Spark's file source takes it: absolute, glob characters escaped."""
    text = os.path.abspath(path)
    return "".join("\\" + c if c in _GLOB_CHARS else c for c in text)


def local_path(spark_uri: str) -> str:
    """Spark's ``path`` column (``file:/a/b.jpg``) back to a local path; other URIs as they are."""
    if spark_uri.startswith("file://"):
        return spark_uri[len("file://"):]
    if spark_uri.startswith("file:"):
        return spark_uri[len("file:"):]
    return spark_uri


def decode_batch(content: np.ndarray, size: tuple[int, int], resize: str
                 ) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Encoded images -> pixels (None where it fails) and the reasons, as the local engine says."""
    from ..errors import ImageError
    from ..images import load_pixels

    pixels: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for data in content:
        try:
            pixels.append(load_pixels(bytes(data), size, resize))
            errors.append(None)
        except ImageError as exc:
            pixels.append(None)
            errors.append(exc.reason)
    return pixels, errors


#: Graphs already loaded in this Python worker, by digest: later jobs with the same model (a
#: second extraction, a labelling run) skip the load.
_RUNNERS: dict[str, Any] = {}


def graph_digest(graph_bytes: bytes) -> str:
    return hashlib.sha256(graph_bytes).hexdigest()


def worker_runner(broadcast: Any, digest: str, threads: int | None) -> Any:
    """The graph's runner in this Spark worker, loaded on first use."""
    runner = _RUNNERS.get(digest)
    if runner is None:
        runner = _RUNNERS[digest] = load_runner(broadcast.value, threads)
        while len(_RUNNERS) > 2:
            _RUNNERS.pop(next(iter(_RUNNERS)))
    return runner


def load_runner(graph_bytes: bytes, threads: int | None) -> Any:
    """A GraphRunner in a Spark worker, with TensorFlow kept to the worker's share of cores."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = import_tensorflow()

    from ..graph import GraphRunner

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialised in this worker
            pass
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_bytes)
    return GraphRunner(graph_def, threads=threads)


def run_on_pixels(runner: Callable[[np.ndarray], np.ndarray], pixels: list[np.ndarray | None],
                  dim: int) -> np.ndarray:
    """Run the graph on the decodable images; rows of failures stay zero."""
    out = np.zeros((len(pixels), dim), dtype=np.float32)
    ok = [i for i, p in enumerate(pixels) if p is not None]
    if ok:
        out[ok] = runner(np.stack([pixels[i] for i in ok]))
    return out


def bottleneck_udf(graph_bytes: Any, digest: str, dim: int, size: tuple[int, int],
                   resize: str, batch_size: int, threads: int | None) -> Any:
    """``predict_batch_udf``: image bytes -> struct<features: array<float>, error: string>."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import types as T

    def make_predict() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        runner = worker_runner(graph_bytes, digest, threads)  # once per Python worker

        def predict(content: np.ndarray) -> dict[str, np.ndarray]:
            pixels, errors = decode_batch(content, size, resize)
            return {"features": run_on_pixels(runner, pixels, dim),
                    "error": np.array(errors, dtype=object)}

        return predict

    schema = T.StructType([T.StructField("features", T.ArrayType(T.FloatType())),
                           T.StructField("error", T.StringType())])
    return predict_batch_udf(make_predict, return_type=schema, batch_size=batch_size)


def worker_threads(spark: Any) -> int | None:
    """TensorFlow threads per task: a local[N] master shares this machine's cores among N."""
    cores = local_cores(spark.sparkContext.master)
    if cores is None:
        return int(spark.conf.get("spark.task.cpus", "1"))
    return max(1, (os.cpu_count() or 1) // cores)


def read_images(spark: Any, paths: Sequence[str]) -> Any:
    """Spark's binaryFile source over these files (path, content)."""
    return spark.read.format("binaryFile").load(list(paths)).select("path", "content")


class SparkEngine:
    """Computes bottlenecks on Spark (``master``: local[N], spark://HOST:PORT, yarn...).

    With ``spark`` given, that session is used and left running; otherwise one is started for
    each extraction and stopped after it.
    """

    name = "spark"

    def __init__(self, master: str | None = None, spark: Any = None,
                 workers: int | None = None) -> None:
        self.master = master
        self.spark = spark
        self.workers = workers  # decoding parallelism is Spark's; kept for the common signature

    def extract(self, items: Sequence[tuple[str, ImageRecord]], forward: Any,
                size: tuple[int, int], resize: str, cache: BottleneckCache,
                batch_size: int = 32) -> list[Skipped]:
        """Compute and cache bottlenecks for ``items`` (key, record); return the failures."""
        graph_def = getattr(forward, "graph_def", None)
        if graph_def is None:
            raise SparkError("the spark engine needs the backbone as a frozen graph.")
        by_path: dict[str, ImageRecord] = {}
        for _, rec in items:
            if not rec.path:
                raise SparkError(f"the spark engine reads image files, and '{rec.display}' is "
                                 "not a file.", "Use --engine local for this source.")
            by_path[os.path.abspath(rec.path)] = rec
        if not by_path:
            return []
        if self.spark is not None:
            return self._extract(self.spark, by_path, graph_def, size, resize, cache, batch_size)
        with spark_session(self.master, "retrainer bottlenecks") as spark:
            return self._extract(spark, by_path, graph_def, size, resize, cache, batch_size)

    def _extract(self, spark: Any, by_path: dict[str, ImageRecord], graph_def: Any,
                 size: tuple[int, int], resize: str, cache: BottleneckCache,
                 batch_size: int) -> list[Skipped]:
        from pyspark.sql import functions as F

        raw = graph_def.SerializeToString()
        graph_bytes = spark.sparkContext.broadcast(raw)
        udf = bottleneck_udf(graph_bytes, graph_digest(raw), cache.dim, size, resize,
                             batch_size, worker_threads(spark))
        failures: list[Skipped] = []
        seen = 0
        paths = list(by_path)
        chunk = chunk_size(spark)
        with bar(len(paths), "extracting bottlenecks (spark)") as progress:
            try:
                for start in range(0, len(paths), chunk):
                    frame = read_images(spark, [spark_path(p) for p in paths[start:start + chunk]])
                    result = (frame.select("path", F.sha2("content", 256).alias("key"),
                                           udf("content").alias("out"))
                              .select("path", "key", "out.features", "out.error"))
                    for path, key, features, error in _computed(result, cache.dim):
                        seen += 1
                        progress.update(1)
                        if error is not None:
                            rec = by_path.get(local_path(path))
                            name = rec.display if rec else local_path(path)
                            log.warning("skipped %s: %s", name, error)
                            failures.append(Skipped(name, error))
                            continue
                        cache.add([key], features[None])
            finally:
                cache.close()  # keep what was computed, even when interrupted
                graph_bytes.unpersist()
        if seen < len(by_path):
            log.warning("Spark returned %d of %d images", seen, len(by_path))
        return failures


def chunk_size(spark: Any) -> int:
    """Images per Spark job: every core busy, and a bounded result for the driver to hold."""
    return min(CHUNK_MAX, max(CHUNK_MIN, CHUNK_PER_CORE * spark.sparkContext.defaultParallelism))


def _computed(frame: Any, dim: int) -> Iterator[tuple[str, str, np.ndarray, str | None]]:
    """(path, key, features, error) of one chunk, computed by all executors at once.

    ``toLocalIterator`` would run one partition at a time (two with prefetching) and leave a
    cluster idle, so a chunk is one parallel job whose small result (features, not images)
    comes back as one Arrow table.
    """
    try:
        table = frame.toArrow()
    except Exception as exc:  # noqa: BLE001 - py4j / Spark raise many kinds
        raise _job_failed(exc) from exc
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    features = values.astype(np.float32, copy=False).reshape(table.num_rows, dim)
    yield from zip(table.column("path").to_pylist(), table.column("key").to_pylist(),
                   features, table.column("error").to_pylist())


def _job_failed(exc: BaseException) -> SparkError:
    message = str(exc).strip().splitlines()
    first = next((m for m in message if m.strip()), type(exc).__name__)
    return SparkError(f"the Spark job failed: {first[:300]}",
                      "Run again with --debug for Spark's full error.")
