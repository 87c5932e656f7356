"""What runs on the Spark executors, and what gets images and the model to them.

The model goes to the executors as bytes, ``(runtime, precision, model bytes)`` as
:func:`retrainer.runner.shippable` gives it: broadcast once per job (:func:`shipped`) and loaded
once per Python worker (:func:`worker_runner`), so workers need no weights files and no network.
Images are decoded on the executors with the local engine's own decoder, so a file that cannot
be decoded fails with the same reason on either engine.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._tf_internals import import_tensorflow
from .session import local_cores

#: A model as it travels to the executors: (runtime, precision, model bytes).
Shippable = tuple[str, str, bytes]

_GLOB_CHARS = "\\[]{}*?"


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


def read_images(spark: Any, paths: Sequence[str]) -> Any:
    """Spark's binaryFile source over these files (path, content)."""
    # A file deleted after the listing is left out (and counted by the caller), not an abort.
    return (spark.read.format("binaryFile").option("ignoreMissingFiles", "true")
            .load(list(paths)).select("path", "content"))


def model_digest(model: Shippable) -> str:
    runtime, precision, data = model
    return hashlib.sha256(data + f"|{runtime}|{precision}".encode()).hexdigest()


@contextmanager
def shipped(spark: Any, model: Shippable) -> Iterator[tuple[Any, str]]:
    """``model`` broadcast to the executors for the block: (the broadcast, its digest)."""
    broadcast = spark.sparkContext.broadcast(model)
    try:
        yield broadcast, model_digest(model)
    finally:
        broadcast.unpersist()


def worker_threads(spark: Any) -> int | None:
    """Op threads per task: a local[N] master shares this machine's cores among N."""
    cores = local_cores(spark.sparkContext.master)
    if cores is None:
        return int(spark.conf.get("spark.task.cpus", "1"))
    return max(1, (os.cpu_count() or 1) // cores)


#: Runners already loaded in this Python worker, by digest: later jobs with the same model (a
#: second extraction, a labelling run) skip the load.
_RUNNERS: dict[str, Any] = {}


def worker_runner(broadcast: Any, digest: str, threads: int | None) -> Any:
    """The broadcast model's runner in this Spark worker, loaded on first use."""
    runner = _RUNNERS.get(digest)
    if runner is None:
        runner = _RUNNERS[digest] = load_runner(broadcast.value, threads)
        while len(_RUNNERS) > 2:
            _RUNNERS.pop(next(iter(_RUNNERS)))
    return runner


def load_runner(model: Shippable, threads: int | None) -> Any:
    """The model's runner in a Spark worker, kept to the worker's share of cores.

    The worker needs only the model's runtime package (TensorFlow is not imported for the
    others).
    """
    runtime, precision, data = model
    if runtime != "tensorflow":
        from ..runner import runner_from_bytes

        return runner_from_bytes(runtime, data, threads=threads, precision=precision)
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
    graph_def.ParseFromString(data)
    return GraphRunner(graph_def, threads=threads)


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


def run_on_pixels(runner: Callable[[np.ndarray], np.ndarray], pixels: list[np.ndarray | None],
                  width: int, fill: float = 0.0) -> np.ndarray:
    """The model on the decodable images; the rows of the others stay ``fill``."""
    out = np.full((len(pixels), width), fill, dtype=np.float32)
    ok = [i for i, p in enumerate(pixels) if p is not None]
    if ok:
        out[ok] = runner(np.stack([pixels[i] for i in ok]))
    return out


def bottleneck_udf(broadcast: Any, digest: str, dim: int, size: tuple[int, int],
                   resize: str, batch_size: int, threads: int | None) -> Any:
    """``predict_batch_udf``: image bytes -> struct<features: array<float>, error: string>."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import types as T

    def make_predict() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        runner = worker_runner(broadcast, digest, threads)  # once per Python worker

        def predict(content: np.ndarray) -> dict[str, np.ndarray]:
            pixels, errors = decode_batch(content, size, resize)
            return {"features": run_on_pixels(runner, pixels, dim),
                    "error": np.array(errors, dtype=object)}

        return predict

    schema = T.StructType([T.StructField("features", T.ArrayType(T.FloatType())),
                           T.StructField("error", T.StringType())])
    return predict_batch_udf(make_predict, return_type=schema, batch_size=batch_size)
