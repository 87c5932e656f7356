"""``label --db``: classify images in the database and write the predictions table.

Only images without a prediction from this model are selected, and each batch is inserted in
its own transaction, so a run that is killed at any point loses at most the batch in flight
and the next run continues from there. The (image, model) unique key makes a duplicate row
impossible, and rows are inserted "on conflict do nothing", so runs that overlap each keep
going and skip what the other wrote; an image deleted while a run is under way is a counted
skip (``deleted``), not a failed batch. The model id is a digest of the exported graph, so
predictions of different models sit side by side.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

#: The one query that scores a model from the predictions table (bound :model_id, :role).
ACCURACY_SQL = """\
SELECT AVG(CASE WHEN p.label = c.name THEN 1.0 ELSE 0.0 END) AS accuracy, COUNT(*) AS n
FROM predictions p
JOIN images i ON i.id = p.image_id
JOIN categories c ON c.id = i.label_id
JOIN roles r ON r.id = i.role_id
WHERE p.model_id = :model_id AND r.name = :role AND p.label IS NOT NULL"""


def model_id_of(model_dir: str | Path | None, graph: str | None = None) -> str:
    """The first 16 hex digits of the frozen graph's SHA-256: the same export, the same id."""
    from ..export import GRAPH_FILE

    from ..files import file_sha256

    return file_sha256(Path(graph) if graph else Path(model_dir or ".") / GRAPH_FILE)[:16]


@dataclass
class DatabaseLabelResult:
    """A ``label --db`` run: what it wrote now, what was there, and the accuracy so far."""

    model_id: str
    selected: int
    labelled: int
    failed: int
    already: int
    scored: int
    accuracy: float | None
    seconds: float
    #: Selected images that were deleted from the database before their prediction was written.
    deleted: int = 0

    @property
    def images_per_second(self) -> float:
        return (self.labelled + self.failed) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "selected": self.selected, "labelled": self.labelled,
                "failed": self.failed, "already_labelled": self.already,
                "deleted": self.deleted, "scored": self.scored,
                "accuracy": self.accuracy, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 1)}


def label_database(db: Any, classifier: Any, model_id: str, where: str | None = None,
                   labels: Sequence[str] = (), roles: Sequence[str] = (), top_k: int = 5,
                   batch_size: int = 32, workers: int | None = None,
                   on_batch: Callable[[int], None] | None = None) -> DatabaseLabelResult:
    """Label the matching images that this model has not labelled yet; see the module doc."""
    from sqlalchemy import exists, select

    from ..progress import bar
    from .source import list_images, records_for
    from .schema import images, predictions
    from .url import connect, errors

    t0 = time.perf_counter()
    engine = connect(db)
    done = exists(select(predictions.c.id).where(predictions.c.image_id == images.c.id,
                                                 predictions.c.model_id == model_id))
    selected = len(list_images(engine, where, labels, roles))
    rows = list_images(engine, where, labels, roles, extra=~done)
    records = records_for(engine, rows, batch=2 * batch_size)
    pending: list[dict[str, Any]] = []
    labelled = failed = deleted = 0

    def flush() -> None:
        nonlocal labelled, failed, deleted
        with errors(engine, "writing predictions"):
            gone = write_predictions(engine, pending)
        for row in gone:
            log.warning("skipped image #%s: deleted from the database during the run",
                        row["image_id"])
            deleted += 1
            if row["error"] is None:
                labelled -= 1
            else:
                failed -= 1
        pending.clear()
        if on_batch:
            on_batch(labelled + failed)

    with bar(len(records), "labelling") as progress:
        results = classifier.label_records(records, top_k=top_k, batch_size=batch_size,
                                           workers=workers)
        for (image_id, *_), result in zip(rows, results):
            progress.update(1)
            if result.error is not None:
                failed += 1
                log.warning("skipped %s: %s", result.path, result.error)
                pending.append({"image_id": image_id, "model_id": model_id, "label": None,
                                "score": None, "top_k": None, "error": result.error})
            else:
                labelled += 1
                best = result.predictions[0]
                pending.append({
                    "image_id": image_id, "model_id": model_id, "label": best.label,
                    "score": best.score, "error": None,
                    "top_k": json.dumps([{"label": p.label, "score": round(p.score, 6)}
                                         for p in result.predictions], ensure_ascii=False)})
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    scored, accuracy = prediction_accuracy(engine, model_id, where, labels, roles)
    return DatabaseLabelResult(model_id=model_id, selected=selected, labelled=labelled,
                               failed=failed, already=selected - len(rows), scored=scored,
                               accuracy=accuracy, seconds=time.perf_counter() - t0,
                               deleted=deleted)


def _insert_ignoring_duplicates(engine: Any) -> Any:
    """INSERT into predictions that leaves an existing (image, model) row as it is."""
    from .schema import predictions

    kind = engine.dialect.name
    if kind == "sqlite":
        from sqlalchemy.dialects.sqlite import insert

        return insert(predictions).on_conflict_do_nothing()
    if kind == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert(predictions).on_conflict_do_nothing()
    if kind in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert

        stmt = insert(predictions)  # not INSERT IGNORE: that would hide a deleted image too
        return stmt.on_duplicate_key_update(image_id=stmt.inserted.image_id)
    return predictions.insert()


def write_predictions(engine: Any, rows: list[dict[str, Any]], attempts: int = 5
                      ) -> list[dict[str, Any]]:
    """Insert prediction rows, skipping those another run already wrote; the rows whose image
    no longer exists are returned (not written). One transaction for the batch; row by row
    only when the batch names a deleted image."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    if not rows:
        return []
    stmt = _insert_ignoring_duplicates(engine)
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                conn.execute(stmt, rows)
            return []
        except IntegrityError:
            break  # a foreign key: some image was deleted meanwhile
        except OperationalError as exc:  # a deadlock between overlapping runs: try again
            if attempt == attempts - 1 or not _is_deadlock(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    gone = []
    for row in rows:
        try:
            with engine.begin() as conn:
                conn.execute(stmt, [row])
        except IntegrityError:
            gone.append(row)
    return gone


def _is_deadlock(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "deadlock" in text or "1213" in text or "database is locked" in text


def prediction_accuracy(db: Any, model_id: str, where: str | None = None,
                        labels: Sequence[str] = (), roles: Sequence[str] = ()
                        ) -> tuple[int, float | None]:
    """(n, accuracy) of this model's predictions on the matching labelled images."""
    from sqlalchemy import case, func, select

    from ..db.filters import narrow
    from .schema import categories, images, predictions
    from .schema import roles as roles_table
    from .url import connect, errors

    engine = connect(db, create=False)
    hit = case((predictions.c.label == categories.c.name, 1.0), else_=0.0)
    query = (select(func.count(), func.avg(hit))
             .select_from(predictions.join(images, images.c.id == predictions.c.image_id)
                          .join(categories, categories.c.id == images.c.label_id)
                          .outerjoin(roles_table, roles_table.c.id == images.c.role_id))
             .where(predictions.c.model_id == model_id, predictions.c.label.is_not(None)))
    query = narrow(query, where, labels, roles)
    with errors(engine, "scoring predictions"), engine.connect() as conn:
        n, acc = conn.execute(query).one()
    return int(n), (float(acc) if n else None)
