"""``retrainer db import|stats|query`` and the ``label --db`` output."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import click

from .common import FloatRange, echo_json, err, json_option, note

db_option = click.option(
    "--db", required=True, envvar="RETRAINER_DB", metavar="URL",
    help="sqlite:///file.db (or just a file path), mysql://user@host/name, "
         "postgresql://user@host/name; env RETRAINER_DB. The password may come from "
         "RETRAINER_DB_PASSWORD.")


@click.group()
def db() -> None:
    """Keep images, labels and predictions in a SQL database.

    \b
      retrainer db import --image-dir photos/ --db images.db
      retrainer db stats --db images.db
      retrainer train --db images.db
      retrainer label --db images.db --where "role = 'testing'"
      retrainer db query --db images.db --model-dir retrained "SELECT id, classify(blob) FROM images LIMIT 5"
    """


@db.command("import")
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder with one sub-folder per class (or train/ val/ test/ folders).")
@db_option
@click.option("--validation-percentage", default=10.0, show_default=True,
              type=FloatRange(0, 100, max_open=True),
              help="Share given the 'validation' role (when the folder has no val/).")
@click.option("--testing-percentage", default=10.0, show_default=True,
              type=FloatRange(0, 100, max_open=True),
              help="Share given the 'testing' role (when the folder has no test/).")
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(min=1),
              help="Images per INSERT transaction.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Reading threads.")
@json_option
def import_(image_dir: str, db: str, validation_percentage: float, testing_percentage: float,
            batch_size: int, workers: int | None, as_json: bool) -> None:
    """Import a labelled folder; images already there (same content) are skipped."""
    from ..db import masked
    from ..db.importer import import_folder
    from ..db.url import database_url

    result = import_folder(db, image_dir, validation_percentage, testing_percentage,
                           batch_size=batch_size, workers=workers)
    if as_json:
        echo_json(result.to_dict())
        return
    for s in result.skipped:
        err(f"skipped {s.name}: {s.reason}")
    click.echo(f"Imported {result.added} image(s) into {masked(database_url(db))}, "
               f"{result.existing} already there, {len(result.skipped)} skipped "
               f"({result.images_per_second:.0f} images/s)")


@db.command()
@db_option
@json_option
def stats(db: str, as_json: bool) -> None:
    """Class distribution per role."""
    from ..db.stats import class_distribution

    dist = class_distribution(db)
    if as_json:
        echo_json(dist.to_dict())
        return
    click.echo(dist.table())


@db.command()
@db_option
@click.argument("sql")
@click.option("--model-dir", type=click.Path(file_okay=False), default=None,
              help="An export folder: makes classify(blob) and classify_score(blob) usable "
                   "in the query (SQLite).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most this many rows (a longer result is cut, and says so).")
@json_option
def query(db: str, sql: str, model_dir: str | None, limit: int, as_json: bool) -> None:
    """Run one read-only SQL statement and print its rows.

    The database itself refuses any change (a read-only connection or transaction), and
    only one statement is run.

    \b
      retrainer db query --db images.db --model-dir retrained \\
          "SELECT id, classify(blob) FROM images LIMIT 5"
    """
    from ..db.functions import run_query

    classifier = None
    if model_dir:
        from ..predict import Classifier

        classifier = Classifier.load(model_dir)
    result = run_query(db, sql, classifier=classifier, limit=limit)
    rows = [[_cell(v) for v in row] for row in result.rows]
    cut = (f"only the first {result.limit} row(s) are shown; the query has more. "
           "Raise --limit, or narrow the query.") if result.truncated else None
    if as_json:
        echo_json({"columns": result.columns, "rows": rows, "truncated": result.truncated})
        if cut:
            err(f"Warning: {cut}")
        return
    if result.columns:
        click.echo("\t".join(result.columns))
    for row in rows:
        click.echo("\t".join("NULL" if v is None else str(v) for v in row))
    if cut:
        err(f"Warning: {cut}")
    else:
        note(f"{len(rows)} row(s)")


def _cell(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (int, float, str)) or value is None:
        return value
    if isinstance(value, Decimal):  # AVG() on MariaDB/PostgreSQL
        return float(value)
    return str(value)


def label_database_command(db: str, where: str | None, images: tuple[str, ...],
                           model_dir: str, graph: str | None, labels: str | None, top_k: int,
                           batch_size: int, as_json: bool) -> None:
    """``label --db``: predictions into the database, one summary out."""
    from ..db.predictions import label_database, model_id_of
    from ..predict import Classifier

    if images:
        raise click.UsageError("give images or --db, not both.")
    classifier = Classifier.load(model_dir if not graph else None, graph=graph, labels=labels,
                                 graph_digest=True)
    # the id of the graph loaded, not of the folder's graph now (a new export may have
    # replaced it since): predictions are never filed under another model
    model_id = classifier.graph_sha256[:16] if classifier.graph_sha256 else \
        model_id_of(model_dir, graph)
    result = label_database(db, classifier, model_id, where=where,
                            top_k=top_k, batch_size=batch_size)
    if as_json:
        echo_json(result.to_dict())
    else:
        acc = "" if result.accuracy is None else \
            f"; accuracy {result.accuracy:.4f} on {result.scored} labelled image(s)"
        gone = f", {result.deleted} deleted meanwhile" if result.deleted else ""
        click.echo(f"Model {result.model_id}: labelled {result.labelled} image(s), "
                   f"{result.failed} failed, {result.already} already labelled{gone}{acc}")
    if result.failed:
        raise click.exceptions.Exit(1)
