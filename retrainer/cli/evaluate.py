"""``retrainer evaluate``."""
from __future__ import annotations

import click

from .common import echo_json, json_option, model_options


@click.command()
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Labelled folder (one sub-folder per class) to score the model on.")
@model_options
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@json_option
def evaluate(image_dir: str, model_dir: str, graph: str | None, labels: str | None,
             batch_size: int, as_json: bool) -> None:
    """Accuracy and per-class precision / recall / F1 on a labelled folder.

    \b
      retrainer evaluate --image-dir photos/val --model-dir retrained --json
    """
    from ..evaluation import evaluate_folder

    report = evaluate_folder(image_dir, model_dir if not graph else None, graph=graph,
                             labels=labels, batch_size=batch_size)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.table())
