"""``retrainer label``."""
from __future__ import annotations

import click

from ..config import LabelConfig
from .bottlenecks import engine_options
from .common import (FloatRange, echo_json, err, export_runtime_option, json_option,
                     model_options, note)

_L = LabelConfig()


@click.command()
@click.argument("images", nargs=-1)
@model_options
@click.option("--db", default=None, metavar="URL",
              help="Label the images of a SQL database and write its predictions table.")
@click.option("--where", default=None, metavar="FILTER",
              help="With --db: which images, e.g. \"role = 'testing'\" (see docs/sql.md).")
@click.option("--top-k", default=_L.top_k, show_default=True, type=click.IntRange(min=1),
              help="How many labels to show per image.")
@click.option("--batch-size", default=_L.batch_size, show_default=True, type=click.IntRange(min=1))
@click.option("--min-confidence", type=FloatRange(0, 1), default=_L.min_confidence,
              help="Answer 'unknown' when the top score is below this (out-of-domain photos).")
@export_runtime_option
@engine_options
@click.option("--output", type=click.Path(), default=None,
              help="With --engine spark: write the labels to this Parquet folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@json_option
def label(images: tuple[str, ...], model_dir: str, graph: str | None, labels: str | None,
          top_k: int, batch_size: int, min_confidence: float | None, as_json: bool,
          db: str | None = None, where: str | None = None, engine: str = "local",
          spark_master: str | None = None, output: str | None = None,
          overwrite: bool = False, runtime: str = _L.runtime) -> None:
    """Label images (files, folders or globs) with a trained model.

    \b
      retrainer label photo.jpg
      retrainer label --json 'photos/*.jpg' > labels.jsonl
      retrainer label --db images.db --where "role = 'testing'"
      retrainer label --engine spark --output labels.parquet photos/
    """
    if engine == "spark" or output:
        from .spark_label import label_spark

        return label_spark(images, model_dir, graph, labels, top_k, batch_size, as_json,
                           engine, spark_master, output, overwrite)
    from ..predict import Classifier, apply_min_confidence, expand_inputs
    from ..progress import bar

    if db:
        from .db import label_database_command

        return label_database_command(db, where, images, model_dir, graph, labels, top_k,
                                      batch_size, as_json)
    if not images:
        raise click.UsageError("give images to label, or --db URL.")
    paths, missing = expand_inputs(images)
    for item in missing:
        err(f"error: {item}: no such file")
        if as_json:  # every input gets a row
            echo_json({"path": item, "error": "no such file"})
    if not paths and missing:
        raise click.exceptions.Exit(1)
    classifier = Classifier.load(model_dir if not graph else None, graph=graph, labels=labels,
                                 runtime=runtime)
    failed = len(missing)
    with bar(len(paths), "labelling") as progress:
        for result in classifier.label_paths(paths, top_k=top_k, batch_size=batch_size):
            progress.update(1)
            if result.error:
                failed += 1
                err(f"error: {result.path}: {result.error}")
                if as_json:
                    echo_json(result.to_dict())
                continue
            if min_confidence is not None:
                apply_min_confidence(result, min_confidence)
            if as_json:
                echo_json(result.to_dict())
            else:
                click.echo(result.path)
                if result.label is not None:
                    click.echo(f"answer: {result.label}")
                for p in result.predictions:
                    click.echo(f"{p.label} (score={p.score:.5f})")
    if not as_json:
        note(f"labelled {len(paths) - (failed - len(missing))} image(s), {failed} failed")
    if failed:
        raise click.exceptions.Exit(1)
