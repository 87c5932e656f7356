"""``retrainer label``."""
from __future__ import annotations

import click

from ..config import LabelConfig
from .bottlenecks import engine_options
from .common import echo_json, err, json_option, model_options

_L = LabelConfig()


@click.command()
@click.argument("images", nargs=-1, required=True)
@model_options
@click.option("--top-k", default=_L.top_k, show_default=True, type=click.IntRange(min=1),
              help="How many labels to show per image.")
@click.option("--batch-size", default=_L.batch_size, show_default=True, type=click.IntRange(min=1))
@engine_options
@click.option("--output", type=click.Path(), default=None,
              help="With --engine spark: write the labels to this Parquet folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@json_option
def label(images: tuple[str, ...], model_dir: str, graph: str | None, labels: str | None,
          top_k: int, batch_size: int, as_json: bool, engine: str = "local",
          spark_master: str | None = None, output: str | None = None,
          overwrite: bool = False) -> None:
    """Label images (files, folders or globs) with a trained model.

    \b
      retrainer label photo.jpg
      retrainer label --json 'photos/*.jpg' > labels.jsonl
      retrainer label --engine spark --output labels.parquet photos/
    """
    if engine == "spark" or output:
        from .spark_label import label_spark

        return label_spark(images, model_dir, graph, labels, top_k, batch_size, as_json,
                           engine, spark_master, output, overwrite)
    from ..predict import Classifier, expand_inputs
    from ..progress import bar

    paths, missing = expand_inputs(images)
    for item in missing:
        err(f"error: {item}: no such file")
    if not paths and missing:
        raise click.exceptions.Exit(1)
    classifier = Classifier.load(model_dir if not graph else None, graph=graph, labels=labels)
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
            if as_json:
                echo_json(result.to_dict())
            else:
                click.echo(result.path)
                for p in result.predictions:
                    click.echo(f"{p.label} (score={p.score:.5f})")
    if not as_json:
        err(f"labelled {len(paths) - (failed - len(missing))} image(s), {failed} failed")
    if failed:
        raise click.exceptions.Exit(1)
