"""The Spark engine: bottlenecks computed by Spark workers, cached by the driver as usual.

Spark reads the image files with its ``binaryFile`` source and hashes each one (SHA-256, the
cache key) from the very bytes it decodes, so a file changed since the scan is stored under its
new content, never under the old key; a file deleted since the scan is a counted skip. Records
that are not files (database rows, augmented variants) are read on the driver and their bytes
shipped to Spark under the caller's keys. ``predict_batch_udf`` decodes the bytes with the same
code as the local engine and
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

from ..errors import ImageError
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


def load_runner(model: bytes | tuple[str, str, bytes], threads: int | None) -> Any:
    """The model's runner in a Spark worker, kept to the worker's share of cores.

    ``model``: a frozen graph's bytes (TensorFlow), or ``(runtime, precision, bytes)`` as
    :func:`retrainer.runner.shippable` gives it for any runtime; the worker needs only that
    runtime's package (TensorFlow is not imported for the others).
    """
    if not isinstance(model, bytes):
        runtime, precision, data = model
        if runtime != "tensorflow":
            from ..runner import runner_from_bytes

            return runner_from_bytes(runtime, data, threads=threads, precision=precision)
        model = data
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
    graph_def.ParseFromString(model)
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
    # A file deleted after the listing is left out (and counted by the caller), not an abort.
    return (spark.read.format("binaryFile").option("ignoreMissingFiles", "true")
            .load(list(paths)).select("path", "content"))


#: Bytes read on the driver per Spark job when records are shipped rather than read by Spark.
SHIP_BYTES = 64 << 20


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
        from ..runner import shippable

        graph_def = shippable(forward)
        if graph_def is None:
            raise SparkError("the spark engine needs a runner it can ship to its workers.")
        by_path: dict[str, ImageRecord] = {}
        shipped: list[tuple[str, ImageRecord]] = []  # not files: bytes go to Spark
        for key, rec in items:
            if is_file_record(rec):
                by_path[os.path.abspath(rec.path)] = rec  # type: ignore[arg-type]
            else:
                shipped.append((key, rec))
        if not by_path and not shipped:
            return []
        if self.spark is not None:
            return self._extract(self.spark, by_path, shipped, graph_def, size, resize, cache,
                                 batch_size)
        with spark_session(self.master, "retrainer bottlenecks") as spark:
            return self._extract(spark, by_path, shipped, graph_def, size, resize, cache,
                                 batch_size)

    def _extract(self, spark: Any, by_path: dict[str, ImageRecord],
                 shipped: list[tuple[str, ImageRecord]], graph_def: Any,
                 size: tuple[int, int], resize: str, cache: BottleneckCache,
                 batch_size: int) -> list[Skipped]:
        from pyspark.sql import functions as F

        runtime, precision, raw = graph_def  # (runtime, precision, model bytes)
        graph_bytes = spark.sparkContext.broadcast(graph_def)
        digest = graph_digest(raw + f"|{runtime}|{precision}".encode())
        udf = bottleneck_udf(graph_bytes, digest, cache.dim, size, resize,
                             batch_size, worker_threads(spark))
        failures: list[Skipped] = []
        chunk = chunk_size(spark)

        def skip(name: str, reason: str) -> None:
            log.warning("skipped %s: %s", name, reason)
            failures.append(Skipped(name, reason))

        with bar(len(by_path) + len(shipped), "extracting bottlenecks (spark)") as progress:
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
                for key, rec in shipped:  # read lazily: the driver holds one job's bytes
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
                graph_bytes.unpersist()
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
        raise _job_failed(exc) from exc
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    features = values.astype(np.float32, copy=False).reshape(table.num_rows, dim)
    yield from zip(table.column(name).to_pylist(), table.column("key").to_pylist(),
                   features, table.column("error").to_pylist())


def _job_failed(exc: BaseException) -> SparkError:
    message = str(exc).strip().splitlines()
    first = next((m for m in message if m.strip()), type(exc).__name__)
    return SparkError(f"the Spark job failed: {first[:300]}",
                      "Run again with --debug for Spark's full error.")
