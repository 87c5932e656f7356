"""Images, labels and predictions in a SQL database (SQLite, MariaDB/MySQL, PostgreSQL).

The database is one more source and sink of the same flow: ``db import`` fills it from a
folder tree, :func:`retrainer.sources.sql.scan_database` reads it back as a
:class:`~retrainer.sources.base.Dataset`, and ``label --db`` writes predictions into it.
SQLAlchemy is imported only by these modules, so the CLI stays fast when they are not used.
"""
from .url import DatabaseError, connect, database_url, masked

__all__ = ["DatabaseError", "connect", "database_url", "masked"]
