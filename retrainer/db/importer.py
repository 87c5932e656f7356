"""``db import``: a folder-per-class tree into the images/categories/roles tables.

Roles are the folder's own split (a train/ val/ test/ top level) or the stable hash split, so a
database import trains exactly like the folder did. Files are read, hashed and test-decoded on
a thread pool while the main thread inserts batches, one transaction each: an interrupted
import keeps every finished batch, and importing again skips what is there by content hash.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..sources.base import Dataset, ImageRecord, Skipped

log = logging.getLogger(__name__)


@dataclass
class ImportResult:
    """What an import did; ``existing`` were already in the database (same content)."""

    added: int = 0
    existing: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    categories_added: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.added + self.existing) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"added": self.added, "existing": self.existing, "skipped": len(self.skipped),
                "skipped_files": [{"name": s.name, "reason": s.reason} for s in self.skipped],
                "categories_added": self.categories_added, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 1)}


def _load(rec: ImageRecord) -> tuple[bytes, str] | Skipped:
    from ..errors import ImageError
    from ..images import open_image

    try:
        data = rec.read()
    except OSError as exc:
        return Skipped(rec.display, f"cannot read ({exc.strerror or exc})")
    try:
        open_image(data, rec.display)
    except ImageError as exc:
        return Skipped(rec.display, exc.reason)
    return data, hashlib.sha256(data).hexdigest()


def _loaded(records: list[ImageRecord], workers: int) -> Iterator[tuple[ImageRecord, Any]]:
    """(record, (bytes, sha256) or Skipped) in order, with a bounded number in flight."""
    window = 4 * workers
    pending: deque[tuple[ImageRecord, Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="import") as pool:
        for rec in records:
            pending.append((rec, pool.submit(_load, rec)))
            if len(pending) >= window:
                r, fut = pending.popleft()
                yield r, fut.result()
        while pending:
            r, fut = pending.popleft()
            yield r, fut.result()


def _add_categories(conn: Any, new: list[dict[str, str]], engine: Any) -> None:
    """Insert class names; a table that folds case (an old MariaDB one) gets a clear error."""
    from sqlalchemy.exc import IntegrityError

    from .schema import categories
    from .url import DatabaseError, masked

    try:
        conn.execute(categories.insert(), new)
    except IntegrityError:
        names = sorted(n["name"] for n in new)
        raise DatabaseError(
            f"the categories table of {masked(engine.url)} treats class names that differ only "
            f"in case as one (adding {', '.join(map(repr, names[:5]))}).",
            "Make class names compare exactly: ALTER TABLE categories MODIFY name VARCHAR(255) "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL; or rename one folder.") from None


def import_folder(db: Any, image_dir: str | Path, validation_percentage: float = 10.0,
                  testing_percentage: float = 10.0, batch_size: int = 200,
                  workers: int | None = None) -> ImportResult:
    """Import ``image_dir`` into ``db`` (URL, SQLite path or engine); see :class:`ImportResult`."""
    from ..sources.folder import scan_folder
    from ..split import assign_splits

    t0 = time.perf_counter()
    dataset = assign_splits(scan_folder(image_dir), validation_percentage, testing_percentage)
    return import_dataset(db, dataset, batch_size, workers, started=t0)


def import_dataset(db: Any, dataset: Dataset, batch_size: int = 200, workers: int | None = None,
                   started: float | None = None) -> ImportResult:
    """Import any source's records; their splits become roles (none: split by hash later)."""
    from sqlalchemy import select

    from ..decoding import default_workers
    from ..progress import bar
    from .schema import ROLE_IDS, categories, images
    from .url import connect, errors

    t0 = started if started is not None else time.perf_counter()
    engine = connect(db)
    result = ImportResult()
    with errors(engine, "importing"):
        with engine.begin() as conn:
            known = {n: i for n, i in conn.execute(select(categories.c.name, categories.c.id))}
            new = [{"name": c} for c in dataset.classes if c not in known]
            if new:
                _add_categories(conn, new, engine)
                known = {n: i for n, i in conn.execute(select(categories.c.name, categories.c.id))}
            result.categories_added = len(new)
            seen = set(conn.execute(select(images.c.sha256)).scalars())

        rows: list[dict[str, Any]] = []

        def flush() -> None:
            with engine.begin() as conn:
                conn.execute(images.insert(), rows)
            result.added += len(rows)
            rows.clear()

        with bar(len(dataset.records), "importing") as progress:
            for rec, loaded in _loaded(dataset.records, workers or default_workers()):
                progress.update(1)
                if isinstance(loaded, Skipped):
                    log.warning("skipped %s: %s", loaded.name, loaded.reason)
                    result.skipped.append(loaded)
                    continue
                data, digest = loaded
                if digest in seen:
                    result.existing += 1
                    continue
                seen.add(digest)
                rows.append({"label_id": known[rec.label],
                             "role_id": ROLE_IDS[rec.split] if rec.split else None,
                             "blob": data, "path": rec.key, "sha256": digest})
                if len(rows) >= batch_size or sum(len(r["blob"]) for r in rows) > 8 << 20:
                    flush()
            if rows:
                flush()
    result.seconds = time.perf_counter() - t0
    return result
