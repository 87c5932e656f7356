"""``retrainer evaluate``."""
from __future__ import annotations

import click

from .common import echo_json, json_option, model_options


@click.command()
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Labelled folder (one sub-folder per class) to score the model on.")
@click.option("--db", default=None, metavar="URL",
              help="Score on the labelled images of a SQL database instead.")
@click.option("--where", default=None, metavar="FILTER",
              help="With --db: which images, e.g. \"role = 'testing'\".")
@model_options
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@json_option
def evaluate(image_dir: str, model_dir: str, graph: str | None, labels: str | None,
             batch_size: int, as_json: bool, db: str | None = None,
             where: str | None = None) -> None:
    """Accuracy and per-class precision / recall / F1 on a labelled folder.

    \b
      retrainer evaluate --image-dir photos/val --model-dir retrained --json
    """
    from ..evaluation import evaluate_folder, evaluate_records

    if bool(image_dir) == bool(db):
        raise click.UsageError("give either --image-dir DIR or --db URL.")
    if db:
        from ..sources.sql import scan_database

        records = scan_database(db, where=where, min_classes=1).records
        report = evaluate_records(records, model_dir if not graph else None, graph=graph,
                                  labels=labels, batch_size=batch_size)
    else:
        report = evaluate_folder(image_dir, model_dir if not graph else None, graph=graph,
                                 labels=labels, batch_size=batch_size)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.table())
