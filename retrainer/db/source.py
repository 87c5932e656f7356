"""Images stored as BLOBs in a SQL database (the schema of :mod:`retrainer.db.schema`).

:func:`scan_database` lists ids, labels and roles without touching the BLOBs; each record's
reader fetches its bytes on demand. Readers share a :class:`BlobFetcher` that, on a miss,
fetches the next ``batch`` ids of the listing in one query, so the decode threads of the
bottleneck engine or the labeller read a database as fast as a folder, one round trip per batch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

from ..errors import DatasetError
from ..sources.base import Dataset, ImageRecord


class BlobFetcher:
    """Fetches image bytes by id, ``batch`` ids per query, keeping a bounded read-ahead."""

    def __init__(self, engine: Any, order: Sequence[int], batch: int = 64) -> None:
        self.engine = engine
        self.order = list(order)
        self.position = {image_id: i for i, image_id in enumerate(self.order)}
        self.batch = max(1, batch)
        self.ready: OrderedDict[int, bytes | OSError] = OrderedDict()
        self.lock = threading.Lock()
        self.queries = 0

    def read(self, image_id: int) -> bytes:
        with self.lock:
            data = self.ready.pop(image_id, None)
            if isinstance(data, OSError):
                raise data
            if data is not None:
                return data
            start = self.position.get(image_id, None)
            wanted = (self.order[start:start + self.batch] if start is not None else [image_id])
            fetched = self._fetch(wanted)
            data = fetched.pop(image_id, None)
            self.ready.update(fetched)
            while len(self.ready) > 4 * self.batch:  # never read, or read out of order
                self.ready.popitem(last=False)
        if data is None:
            raise OSError(f"image {image_id} is no longer in the database")
        if isinstance(data, OSError):
            raise data
        return data

    def _fetch(self, ids: list[int]) -> dict[int, bytes | OSError]:
        from sqlalchemy import select

        from .schema import images
        from .url import errors

        self.queries += 1
        with errors(self.engine, "reading images"), self.engine.connect() as conn:
            rows = conn.execute(select(images.c.id, images.c.blob).where(images.c.id.in_(ids)))
            return {int(i): _blob_bytes(b) for i, b in rows}

    def reader(self, image_id: int):
        return lambda: self.read(image_id)


def _blob_bytes(value: Any) -> bytes | OSError:
    """A BLOB's bytes; for a NULL, or the TEXT or number SQLite lets any column hold, the
    error reading it raises."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    kinds = {type(None): "NULL", str: "TEXT", int: "an INTEGER", float: "a REAL"}
    return OSError(f"its blob is {kinds.get(type(value), type(value).__name__)}, not bytes")


def display_name(image_id: int, path: str | None) -> str:
    """How an image from the database is named in messages: its id, and where it came from."""
    return f"#{image_id} {path}" if path else f"#{image_id}"


def list_images(engine: Any, where: str | None = None, labels: Sequence[str] = (),
                roles: Sequence[str] = (), extra: Any = None) -> list[tuple[int, str | None, str | None, str | None]]:
    """(id, label, role, path) of the images matching the filters, in id order."""
    from sqlalchemy import select

    from .filters import narrow
    from .schema import categories, images
    from .schema import roles as roles_table
    from .url import errors

    query = (select(images.c.id, categories.c.name, roles_table.c.name, images.c.path)
             .select_from(images.outerjoin(categories, images.c.label_id == categories.c.id)
                          .outerjoin(roles_table, images.c.role_id == roles_table.c.id))
             .order_by(images.c.id))
    query = narrow(query, where, labels, roles)
    if extra is not None:
        query = query.where(extra)
    with errors(engine, "listing images"), engine.connect() as conn:
        return [(int(i), label, role, path) for i, label, role, path in conn.execute(query)]


def records_for(engine: Any, rows: Sequence[tuple[int, str | None, str | None, str | None]],
                batch: int = 64) -> list[ImageRecord]:
    """Records for listed rows, reading BLOBs lazily in batches of ``batch``."""
    fetcher = BlobFetcher(engine, [r[0] for r in rows], batch)
    return [ImageRecord(key=path or f"id/{image_id}", label=label or "",
                        read=fetcher.reader(image_id), split=role,
                        path=display_name(image_id, path))
            for image_id, label, role, path in rows]


def scan_database(db: Any, where: str | None = None, labels: Sequence[str] = (),
                  roles: Sequence[str] = (), batch: int = 64, min_classes: int = 2) -> Dataset:
    """The labelled images in ``db`` (URL, SQLite path or engine) as a :class:`Dataset`.

    Roles become splits (images without one are split by hash later, as for folders);
    unlabelled images are left out. Raises :class:`DatasetError` below ``min_classes``.
    """
    from .url import connect, masked

    engine = connect(db)
    rows = [r for r in list_images(engine, where, labels, roles) if r[1] is not None]
    classes = sorted({r[1] for r in rows})  # type: ignore[misc]
    if len(classes) < min_classes:
        raise DatasetError(
            f"need at least {min_classes} labelled class(es) in {masked(engine.url)}, found {len(classes)} "
            f"({len(rows)} labelled images match).",
            "Import a folder first: retrainer db import --image-dir DIR --db URL.")
    return Dataset(classes=classes, records=records_for(engine, rows, batch),
                   root=masked(engine.url))
