"""The tables: images (encoded bytes as BLOBs), categories, roles and predictions.

One schema for every database: SQLAlchemy Core picks LONGBLOB on MariaDB/MySQL (plain BLOB stops
at 64 KB), BYTEA on PostgreSQL and BLOB on SQLite. Content hashes are unique, which is what
makes ``db import`` idempotent; (image, model) is unique in predictions, which is what makes
``label --db`` resumable without duplicates.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import (Column, DateTime, Float, ForeignKey, Integer, LargeBinary, MetaData,
                        String, Table, Text, UniqueConstraint, func, select)
from sqlalchemy.dialects import mysql

from ..sources.base import SPLITS

metadata = MetaData()
_MYSQL = {"mysql_charset": "utf8mb4", "mysql_engine": "InnoDB"}

Blob = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
#: Class names compare byte for byte everywhere: MariaDB/MySQL's default collation would make
#: the classes 'Cat' and 'cat' one unique name.
ClassName = String(255).with_variant(
    mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")

roles = Table(
    "roles", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(32), nullable=False, unique=True),
    **_MYSQL,
)

categories = Table(
    "categories", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", ClassName, nullable=False, unique=True),
    **_MYSQL,
)

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True),
    Column("label_id", Integer, ForeignKey("categories.id"), index=True),  # NULL: unlabelled
    Column("role_id", Integer, ForeignKey("roles.id"), index=True),  # NULL: hash split decides
    Column("blob", Blob, nullable=False),
    Column("path", String(1024)),  # where it was imported from, relative to the image folder
    Column("sha256", String(64), nullable=False, unique=True),
    Column("created", DateTime(timezone=True), server_default=func.now()),
    **_MYSQL,
)

predictions = Table(
    "predictions", metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    Column("model_id", String(64), nullable=False, index=True),
    Column("label", String(255)),  # NULL when the image could not be decoded (see error)
    Column("score", Float(precision=53)),
    Column("top_k", Text),  # JSON: [{"label": ..., "score": ...}, ...]
    Column("error", Text),
    Column("created", DateTime(timezone=True), server_default=func.now()),
    UniqueConstraint("image_id", "model_id", name="uq_prediction_image_model"),
    **_MYSQL,
)

#: Role ids are fixed, so SQL written against one database works on another.
ROLE_IDS = {name: i for i, name in enumerate(SPLITS, start=1)}


def ensure_schema(engine: Any) -> None:
    """Create missing tables and the three roles; existing data is never touched."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        have = set(conn.execute(select(roles.c.name)).scalars())
        missing = [{"id": i, "name": n} for n, i in ROLE_IDS.items() if n not in have]
        if missing:
            conn.execute(roles.insert(), missing)
