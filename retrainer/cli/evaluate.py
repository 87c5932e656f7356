"""``retrainer evaluate``."""
from __future__ import annotations

from pathlib import Path

import click

from .common import echo_json, err, export_runtime_option, json_option, model_options


@click.command()
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Labelled folder (one sub-folder per class) to score the model on.")
@click.option("--db", default=None, metavar="URL",
              help="Score on the labelled images of a SQL database instead.")
@click.option("--where", default=None, metavar="FILTER",
              help="With --db: which images, e.g. \"role = 'testing'\".")
@model_options
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Where evaluation-NAME.json and evaluation-NAME.png go (default: the model "
                   "folder, or the graph's folder with --graph; the training run's report.json "
                   "is never overwritten).")
@click.option("--name", "report_name", default=None,
              help="NAME in those file names (default: the image folder's name, or 'db').")
@click.option("--include-training-images", "include_fitted", is_flag=True,
              help="Also score the images the model was fitted on (left out by default, found "
                   "by content); the accuracy is then optimistic.")
@click.option("--print-misclassified", is_flag=True, help="List the images the model gets wrong.")
@export_runtime_option
@json_option
def evaluate(image_dir: str, model_dir: str, graph: str | None, labels: str | None,
             batch_size: int, output_dir: str | None, print_misclassified: bool,
             as_json: bool, db: str | None = None, where: str | None = None,
             report_name: str | None = None, include_fitted: bool = False,
             runtime: str = "auto") -> None:
    """Accuracy, precision / recall / F1, ROC AUC and the confusion matrix on labelled images.

    \b
      retrainer evaluate --image-dir new_photos/ --model-dir retrained --json
      retrainer evaluate --image-dir photos/ --model-dir retrained  # its test split
    """
    from ..evaluation import evaluate_folder, evaluate_records, evaluation_name

    if bool(image_dir) == bool(db):
        raise click.UsageError("give either --image-dir DIR or --db URL.")
    if db:
        from ..db.url import masked
        from ..db.source import scan_database

        records = scan_database(db, where=where, min_classes=1).records
        report = evaluate_records(records, model_dir if not graph else None, graph=graph,
                                  labels=labels, batch_size=batch_size,
                                  include_fitted=include_fitted, runtime=runtime)
    else:
        report = evaluate_folder(image_dir, model_dir if not graph else None, graph=graph,
                                 labels=labels, batch_size=batch_size,
                                 include_fitted=include_fitted, runtime=runtime)
    out = output_dir or (str(Path(graph).parent) if graph else model_dir)
    name = evaluation_name(report_name or ("db" if db else Path(image_dir).resolve().name))
    try:
        written = report.write(out, {"db": masked(db), "where": where} if db
                               else {"image_dir": image_dir}, name=name)
    except OSError as exc:  # a read-only model folder must not lose the printed report
        err(f"warning: cannot write the report to '{out}' ({exc.strerror or exc}); "
            "use --output-dir DIR")
        written = {}
    if as_json:
        echo_json({**report.to_dict(), "outputs": written})
        return
    click.echo(report.table())
    if print_misclassified:
        click.echo("Misclassified images:" + ("" if report.misclassified else " none"))
        for m in report.misclassified:
            click.echo(f"  {m.path}  true={m.true}  predicted={m.predicted} ({m.score:.3f})")
    if written:
        click.echo(f"Report: {written['report']}" + (
            f", confusion matrix: {written['confusion_png']}" if "confusion_png" in written else ""))
