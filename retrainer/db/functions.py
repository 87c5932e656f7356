"""``db query``: run one read-only SQL query, with ``classify(blob)`` available on SQLite.

SQLite lets a Python function be called from SQL, so the model can run inside a query:
``SELECT id, classify(blob) FROM images LIMIT 5``. ``classify`` returns the top label (NULL for
an image that cannot be decoded) and ``classify_score`` its probability. Queries never
commit: SQLite runs them with ``PRAGMA query_only`` and other databases roll back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .url import DatabaseError


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def register_classify(sqlite_conn: Any, classifier: Any) -> None:
    """Add ``classify(blob)`` and ``classify_score(blob)`` to a :mod:`sqlite3` connection."""
    from ..errors import ImageError

    memo: dict[bytes, tuple[str, float] | None] = {}  # both functions on one row: one forward

    def top(blob: Any) -> tuple[str, float] | None:
        if blob is None:
            return None
        data = bytes(blob)
        if data not in memo:
            try:
                probs = classifier.predict(classifier.prepare(data)[None])[0]
                best = classifier.top_k(probs, 1)[0]
                memo.clear()
                memo[data] = (best.label, best.score)
            except ImageError:
                memo[data] = None
        return memo[data]

    def classify(blob: Any) -> str | None:
        found = top(blob)
        return found[0] if found else None

    def classify_score(blob: Any) -> float | None:
        found = top(blob)
        return found[1] if found else None

    sqlite_conn.create_function("classify", 1, classify, deterministic=True)
    sqlite_conn.create_function("classify_score", 1, classify_score, deterministic=True)


def run_query(db: Any, sql: str, classifier: Any = None, limit: int | None = None) -> QueryResult:
    """Run ``sql`` on ``db``; with a ``classifier`` (SQLite only) ``classify()`` is defined."""
    from .url import connect, errors

    engine = connect(db, create=False)
    sqlite = engine.dialect.name == "sqlite"
    if classifier is not None and not sqlite:
        raise DatabaseError(f"classify() runs inside SQLite only, not {engine.dialect.name}.",
                            "Use 'retrainer label --db URL' to write predictions instead.")
    with errors(engine, "running the query"), engine.connect() as conn:
        raw = conn.connection.driver_connection
        if sqlite:
            conn.exec_driver_sql("PRAGMA query_only = ON")
        try:
            if classifier is not None:
                register_classify(raw, classifier)
            cursor = raw.cursor()  # the user's SQL verbatim: no parameter markers are parsed
            try:
                cursor.execute(sql)
                if cursor.description is None:
                    return QueryResult([], [])
                columns = [d[0] for d in cursor.description]
                rows = cursor.fetchmany(limit) if limit else cursor.fetchall()
                return QueryResult(columns, [tuple(r) for r in rows])
            finally:
                cursor.close()
        finally:
            conn.rollback()
            if sqlite:
                conn.exec_driver_sql("PRAGMA query_only = OFF")
