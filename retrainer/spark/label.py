"""Batch labelling on Spark: a large image set -> one Parquet table of predictions.

Each row is ``path, label, score, top_k (array of {label, score}), error``; the scores are the
float32 probabilities ``retrainer label`` prints, and top-k is ordered the same way. The
exported frozen graph is broadcast and loaded once per Python worker; the executors write the
Parquet files themselves, so nothing but a count comes back to the driver.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..config import DEFAULT_MODEL_DIR
from .session import SparkError, job_failed, spark_session
from .workers import (Shippable, decode_batch, run_on_pixels, shipped, spark_path,
                      worker_runner, worker_threads)

log = logging.getLogger(__name__)

_LOCAL_PREFIX = "file:"
_SCHEMA = ("path string, label string, score double, "
           "top_k array<struct<label: string, score: double>>, error string")


@dataclass
class ParquetLabels:
    """What a Spark labelling run wrote."""

    output: str
    images: int
    failed: int

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "images": self.images, "failed": self.failed}


def is_remote(item: str) -> bool:
    """hdfs://, s3a://, gs://... inputs are handed to Spark as they are."""
    return "://" in item and not item.startswith("file://")


def label_udf(broadcast: Any, digest: str, labels: list[str], size: tuple[int, int],
              resize: str, top_k: int, batch_size: int, threads: int | None) -> Any:
    """``predict_batch_udf``: image bytes -> label, score, top-k labels and scores, error."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import types as T

    k = max(1, min(top_k, len(labels)))
    names = np.array(labels, dtype=object)

    def make_predict() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        runner = worker_runner(broadcast, digest, threads)  # once per Python worker

        def predict(content: np.ndarray) -> dict[str, np.ndarray]:
            pixels, errors = decode_batch(content, size, resize)
            probs = run_on_pixels(runner, pixels, len(labels), fill=np.nan)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # as Classifier.top_k
            scores = np.take_along_axis(probs, order, axis=1).astype(np.float64)
            return {"label": names[order[:, 0]], "score": scores[:, 0],
                    "top_labels": names[order], "top_scores": scores,
                    "error": np.array(errors, dtype=object)}

        return predict

    schema = T.StructType([
        T.StructField("label", T.StringType()), T.StructField("score", T.DoubleType()),
        T.StructField("top_labels", T.ArrayType(T.StringType())),
        T.StructField("top_scores", T.ArrayType(T.DoubleType())),
        T.StructField("error", T.StringType())])
    return predict_batch_udf(make_predict, return_type=schema, batch_size=batch_size)


def input_paths(items: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """(local image files, as ``retrainer label`` expands them; remote URIs; missing inputs)."""
    from ..predict import expand_inputs

    items = list(items)
    remote = [i for i in items if is_remote(i)]
    local, missing = expand_inputs(
        i[len("file://"):] if i.startswith("file://") else i for i in items if not is_remote(i))
    return [os.path.abspath(p) for p in local], remote, missing


def label_to_parquet(inputs: Iterable[str], output: str, model_dir: str | None = DEFAULT_MODEL_DIR,
                     graph: str | None = None, labels: str | None = None, top_k: int = 5,
                     batch_size: int = 32, spark: Any = None, master: str | None = None,
                     overwrite: bool = False) -> ParquetLabels:
    """Label every image in ``inputs`` on Spark and write the predictions to ``output``."""
    from ..predict import Classifier

    local, remote, missing = input_paths(inputs)
    # Spark's file sources drop empty files; they are reported here, as ``label`` does.
    empty = [p for p in local if _size(p) == 0]
    paths = [spark_path(p) for p in local if p not in set(empty)] + remote
    if missing:
        raise SparkError(f"no such file: {', '.join(missing[:5])}"
                         + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    if not paths and not empty:
        raise SparkError("no images to label.")
    existed = is_remote(output) or os.path.exists(output)
    if existed and not is_remote(output) and not overwrite:
        raise SparkError(f"'{output}' already exists.", "Remove it or pass overwrite=True.")
    classifier = Classifier.load(model_dir if not graph else None, graph=graph, labels=labels,
                                runtime="tensorflow")  # the workers rebuild the graph
    model = ("tensorflow", "fp32", classifier.graph_def.SerializeToString())
    if spark is not None:
        return _label(spark, paths, empty, output, classifier, model, top_k, batch_size,
                      fresh=not existed)
    with spark_session(master, "retrainer label") as session:
        return _label(session, paths, empty, output, classifier, model, top_k, batch_size,
                      fresh=not existed)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _label(spark: Any, paths: list[str], empty: list[str], output: str, classifier: Any,
           model: Shippable, top_k: int, batch_size: int, fresh: bool) -> ParquetLabels:
    with shipped(spark, model) as (broadcast, digest):
        udf = label_udf(broadcast, digest, classifier.labels, classifier.input_size,
                        classifier.resize, top_k, batch_size, worker_threads(spark))
        counts = _write(spark, paths, empty, output, udf, fresh)
    return ParquetLabels(output=str(Path(output)) if not is_remote(output) else output,
                         images=int(counts["n"]), failed=int(counts["failed"] or 0))


def _write(spark: Any, paths: list[str], empty: list[str], output: str, udf: Any,
           fresh: bool = False) -> Any:
    """The Parquet table written (by the executors): its row count and failures. When the job
    fails, a ``fresh`` local output (one that did not exist before) is removed, so that running
    it again is not refused for a folder holding no table."""
    from pyspark.sql import functions as F

    reader = spark.read.format("binaryFile")
    if any(is_remote(p) for p in paths):
        reader = reader.option("recursiveFileLookup", "true")
    frame = reader.load(paths).select("path", udf("content").alias("out"))
    ok = F.col("out.error").isNull()
    table = frame.select(
        F.when(F.col("path").startswith(_LOCAL_PREFIX),
               F.expr(f"substring(path, {len(_LOCAL_PREFIX) + 1})")).otherwise(F.col("path"))
        .alias("path"),
        F.when(ok, F.col("out.label")).alias("label"),
        F.when(ok, F.col("out.score")).alias("score"),
        F.when(ok, F.arrays_zip(F.col("out.top_labels").alias("label"),
                                F.col("out.top_scores").alias("score"))).alias("top_k"),
        F.col("out.error").alias("error"))
    try:
        if paths:
            table.write.mode("overwrite").parquet(output)
        if empty:
            rows = [(p, None, None, None, "empty file") for p in empty]
            schema = table.schema if paths else _SCHEMA
            spark.createDataFrame(rows, schema).write.mode("append").parquet(output)
        written = spark.read.parquet(output)
        return written.agg(F.count("*").alias("n"),
                           F.sum(F.col("error").isNotNull().cast("int")).alias("failed")).first()
    except Exception as exc:  # noqa: BLE001 - py4j / Spark raise many kinds
        if fresh:
            shutil.rmtree(output, ignore_errors=True)
        raise job_failed(exc) from exc
