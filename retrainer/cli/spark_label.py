"""``retrainer label --engine spark --output labels.parquet``: the Parquet half of ``label``."""
from __future__ import annotations

import click

from .bottlenecks import check_engine
from .common import echo_json, note


def label_spark(images: tuple[str, ...], model_dir: str, graph: str | None, labels: str | None,
                top_k: int, batch_size: int, as_json: bool, engine: str,
                spark_master: str | None, output: str | None, overwrite: bool) -> None:
    """Label on Spark into Parquet; exit 1 when some images could not be labelled."""
    if engine != "spark":
        raise click.UsageError("--output (Parquet) needs --engine spark.")
    if not output:
        raise click.UsageError("--engine spark writes Parquet: give --output FOLDER.")
    check_engine(engine, spark_master)
    from ..spark.label import label_to_parquet

    result = label_to_parquet(images, output, model_dir if not graph else None, graph=graph,
                              labels=labels, top_k=top_k, batch_size=batch_size,
                              master=spark_master, overwrite=overwrite)
    if as_json:
        echo_json(result.to_dict())
    else:
        note(f"labelled {result.images - result.failed} image(s), {result.failed} failed "
            f"-> {result.output}")
    if result.failed:
        raise click.exceptions.Exit(1)
