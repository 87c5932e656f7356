"""Images, labels and predictions in a SQL database (SQLite, MariaDB/MySQL, PostgreSQL).

The database is one more source and sink of the same flow: ``db import`` fills it from a
folder tree, :func:`retrainer.db.source.scan_database` reads it back as a
:class:`~retrainer.sources.base.Dataset`, and ``label --db`` writes predictions into it.
SQLAlchemy is imported only by these modules, so the CLI stays fast when they are not used.
"""
from .url import DatabaseError, connect, database_url, masked

try:
    import sqlalchemy  # noqa: F401
except ImportError:  # the CLI shows this as one line with the fix
    raise DatabaseError("database support is not installed.",
                        "Install it with: pip install 'retrainer[sql]'.") from None

__all__ = ["DatabaseError", "connect", "database_url", "masked"]
