"""``db query``: run one read-only SQL query, with ``classify(blob)`` available on SQLite.

SQLite lets a Python function be called from SQL, so the model can run inside a query:
``SELECT id, classify(blob) FROM images LIMIT 5``. ``classify`` returns the top label (NULL for
an image that cannot be decoded) and ``classify_score`` its probability.

Queries cannot change anything, enforced by the database itself: SQLite opens the file
read-only (``mode=ro``, plus ``PRAGMA query_only``); PostgreSQL runs the statement in a
``READ ONLY`` transaction as a prepared statement, which is a single statement, so
``...; COMMIT; DELETE ...`` is refused; MariaDB/MySQL run it in a read-only session and
transaction (which refuses DDL too, so nothing commits implicitly) without multi-statements.
The connection is discarded afterwards. At most ``limit`` rows are fetched
(:data:`DEFAULT_LIMIT` unless given); :attr:`QueryResult.truncated` says when there were more.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .url import DatabaseError


#: Rows returned when no limit is given; a query never loads an unbounded result.
DEFAULT_LIMIT = 1000
#: Distinct BLOBs whose classification is remembered (both functions on one row: one forward).
MEMO_SIZE = 64


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    #: True when the query had more rows than the limit (only the first ``limit`` are here).
    truncated: bool = False
    limit: int | None = None


def register_classify(sqlite_conn: Any, classifier: Any) -> OrderedDict:
    """Add ``classify(blob)`` and ``classify_score(blob)`` to a :mod:`sqlite3` connection;
    returns their memo (digest -> (label, score) or None), at most :data:`MEMO_SIZE` long."""
    from ..errors import ImageError

    # Keyed by digest, at most MEMO_SIZE entries: bounded however many BLOBs a query reads.
    memo: OrderedDict[bytes, tuple[str, float] | None] = OrderedDict()

    def top(blob: Any) -> tuple[str, float] | None:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            return None  # NULL, or TEXT / a number in the blob column: not an image
        data = bytes(blob)
        key = hashlib.sha256(data).digest()
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
        try:
            probs = classifier.predict(classifier.prepare(data)[None])[0]
            best = classifier.top_k(probs, 1)[0]
            found: tuple[str, float] | None = (best.label, best.score)
        except ImageError:
            found = None
        memo[key] = found
        while len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
        return found

    def classify(blob: Any) -> str | None:
        found = top(blob)
        return found[0] if found else None

    def classify_score(blob: Any) -> float | None:
        found = top(blob)
        return found[1] if found else None

    sqlite_conn.create_function("classify", 1, classify, deterministic=True)
    sqlite_conn.create_function("classify_score", 1, classify_score, deterministic=True)
    return memo


def run_query(db: Any, sql: str, classifier: Any = None,
              limit: int | None = DEFAULT_LIMIT) -> QueryResult:
    """Run one read-only statement ``sql`` on ``db``; with a ``classifier`` (SQLite only)
    ``classify()`` is defined. At most ``limit`` rows (None: :data:`DEFAULT_LIMIT`)."""
    from .url import connect, errors

    limit = limit or DEFAULT_LIMIT
    engine = _read_only_engine(db) if _is_sqlite(db) else connect(db, create=False)
    kind = engine.dialect.name
    if classifier is not None and kind != "sqlite":
        raise DatabaseError(f"classify() runs inside SQLite only, not {kind}.",
                            "Use 'retrainer label --db URL' to write predictions instead.")
    try:
        with errors(engine, "running the query"), engine.connect() as conn:
            raw = conn.connection.driver_connection
            try:
                if kind == "sqlite":
                    conn.exec_driver_sql("PRAGMA query_only = ON")
                    if classifier is not None:
                        register_classify(raw, classifier)
                elif kind == "postgresql":
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                else:  # MariaDB/MySQL: DDL would commit implicitly, a read-only session refuses it
                    conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
                    conn.exec_driver_sql("START TRANSACTION READ ONLY")
                cursor = raw.cursor()
                try:
                    # The user's SQL verbatim: no parameter markers are parsed. On PostgreSQL
                    # as a prepared statement (the extended protocol): one statement only.
                    if kind == "postgresql":
                        cursor.execute(sql, prepare=True)
                    else:
                        cursor.execute(sql)
                    if cursor.description is None:
                        return QueryResult([], [], limit=limit)
                    columns = [d[0] for d in cursor.description]
                    rows = cursor.fetchmany(limit + 1)
                    return QueryResult(columns, [tuple(r) for r in rows[:limit]],
                                       truncated=len(rows) > limit, limit=limit)
                finally:
                    cursor.close()
            finally:
                try:
                    conn.rollback()
                finally:
                    conn.invalidate()  # never hand this session back to a pool
    finally:
        engine.dispose()


def _is_sqlite(db: Any) -> bool:
    from .url import database_url

    if hasattr(db, "dialect"):
        return db.dialect.name == "sqlite"
    url = db if hasattr(db, "drivername") else database_url(str(db))
    return url.get_backend_name() == "sqlite"


def _read_only_engine(db: Any) -> Any:
    """A SQLite engine whose connections open the file read-only (``mode=ro``)."""
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy import create_engine

    from .url import database_url, masked

    url = db.url if hasattr(db, "dialect") else (
        db if hasattr(db, "drivername") else database_url(str(db)))
    path = url.database
    if not path or path == ":memory:":
        raise DatabaseError("an in-memory SQLite database has nothing to query.",
                            "Give the database file: --db images.db.")
    if not Path(path).is_file():
        raise DatabaseError(f"no SQLite database at {masked(url)}.",
                            "Check the path, or create it with 'retrainer db import'.")
    target = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
    return create_engine(url, creator=lambda: sqlite3.connect(
        target, uri=True, check_same_thread=False, timeout=30))
