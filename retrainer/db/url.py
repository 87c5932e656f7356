"""Turning what the user typed into a SQLAlchemy engine, without ever showing the password.

A plain file path means SQLite (the embedded default). ``mysql://``/``mariadb://`` and
``postgresql://`` URLs get the pure-Python drivers retrainer installs (PyMySQL, psycopg 3).
A URL with a user but no password takes it from ``RETRAINER_DB_PASSWORD``, so it need not
appear on a command line. Every message that mentions a URL masks its password.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import FolderNotWritable, RetrainerError

PASSWORD_ENV = "RETRAINER_DB_PASSWORD"
#: Drivers used when a URL names only the database kind.
DRIVERS = {"mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql",
           "postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class DatabaseError(RetrainerError):
    """The database cannot be reached, or a statement on it failed."""


def database_url(value: str) -> Any:
    """A :class:`sqlalchemy.engine.URL` for a URL or a SQLite file path."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not value or not value.strip():
        raise DatabaseError("no database given.", "Pass db=URL or a SQLite file path.")
    if not _SCHEME.match(value):
        return make_url("sqlite:///" + str(Path(value).expanduser().resolve()))
    try:
        url = make_url(value)
    except ArgumentError:
        raise DatabaseError(f"'{_mask_text(value)}' is not a database URL.",
                            "Use e.g. sqlite:///images.db, mysql://user@host/db or "
                            "postgresql://user@host/db.") from None
    if url.drivername in DRIVERS:
        url = url.set(drivername=DRIVERS[url.drivername])
    if url.username and url.password is None and os.environ.get(PASSWORD_ENV):
        url = url.set(password=os.environ[PASSWORD_ENV])
    return url


#: Query-string keys whose values are secrets (``?password=...`` reaches the driver too).
_SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key",
                "apikey", "access_token", "auth")
_SECRET_QUERY = re.compile(r"([?&;](?:%s)=)[^&;#\s]*" % "|".join(_SECRET_KEYS), re.IGNORECASE)


def _is_secret(key: str) -> bool:
    return key.lower() in _SECRET_KEYS


def masked(url: Any) -> str:
    """The URL as text with its password, in the user part or the query, replaced by ``***``."""
    if isinstance(url, str):
        return _mask_text(url)
    query = getattr(url, "query", None) or {}
    if any(_is_secret(k) for k in query):
        url = url.set(query={k: ("***" if _is_secret(k) else v) for k, v in query.items()})
    return url.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def _mask_text(text: str) -> str:
    text = re.sub(r"(://[^:/@\s]+:).*@", r"\1***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def _secrets(url: Any) -> list[str]:
    """Every secret a URL holds: its password and any secret query value."""
    found = [str(url.password)] if getattr(url, "password", None) else []
    for key, value in (getattr(url, "query", None) or {}).items():
        if _is_secret(key):
            found += [value] if isinstance(value, str) else [str(v) for v in value]
    return [s for s in found if s]


def connect(value: Any, create: bool = True) -> Any:
    """An engine for ``value`` (URL text, SQLite path, URL or engine), checked by connecting.

    With ``create`` the retrainer tables are created when missing.
    """
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import Engine

    if isinstance(value, Engine):
        engine = value
    else:
        url = value if hasattr(value, "drivername") else database_url(str(value))
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:" and create:
                folder = Path(url.database).parent
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # a file in the way, or no permission
                    reason = ("a file is in the way" if isinstance(exc, FileExistsError)
                              else exc.strerror or str(exc))
                    raise FolderNotWritable(folder, "database's folder", reason,
                                            "Give a SQLite file in a folder you can write to "
                                            "(db=PATH).") from None
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        elif url.get_backend_name() in ("mysql", "mariadb"):
            kwargs["pool_recycle"] = 3600
        try:
            engine = create_engine(url, **kwargs)
        except Exception as exc:  # noqa: BLE001 - missing driver, bad option
            raise DatabaseError(f"cannot use database {masked(url)}: {_reason(exc, url)}") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
    with errors(engine):
        if create:
            from .schema import ensure_schema

            ensure_schema(engine)
        else:
            with engine.connect():
                pass
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys = ON")
    cur.execute("PRAGMA journal_mode = WAL")  # readers do not block the labelling writer
    cur.close()


def _reason(exc: BaseException, url: Any = None) -> str:
    """The driver's own words, first line only, with any password removed."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    text = _mask_text(text)
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


@contextmanager
def errors(engine: Any, doing: str = "") -> Iterator[None]:
    """Turn driver exceptions into one-line :class:`DatabaseError` messages (password masked)."""
    from sqlalchemy.exc import SQLAlchemyError

    dbapi_error = getattr(getattr(engine.dialect, "loaded_dbapi", None), "Error", None)
    caught = (SQLAlchemyError, dbapi_error) if dbapi_error else (SQLAlchemyError,)
    try:
        yield
    except caught as exc:
        what = f" while {doing}" if doing else ""
        raise DatabaseError(f"database {masked(engine.url)}{what}: {_reason(exc, engine.url)}",
                            _hint(exc)) from None


def _hint(exc: BaseException) -> str | None:
    text = str(getattr(exc, "orig", exc)).lower()
    if "access denied" in text or "authentication failed" in text or "password" in text:
        return f"Check the user and password (in the URL or {PASSWORD_ENV})."
    if "can't connect" in text or "connection refused" in text or "could not connect" in text:
        return "Is the database server running, and are host and port right?"
    if "unknown database" in text or "does not exist" in text:
        return "Create the database first (CREATE DATABASE ...); retrainer creates its tables."
    return None
