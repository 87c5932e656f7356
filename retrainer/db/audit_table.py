"""``audit --db ... --write-findings NAME``: the audit's findings as rows of ``audit_findings``.

One row per flagged image and finding: ``label_issue`` (with the suggested label and the score),
``exact_duplicate`` / ``near_duplicate`` (the group's number in this audit and its similarity)
and ``outlier`` (the distance). Rows are keyed by the audit's name: writing an audit again
replaces its rows in one transaction, so a re-run never duplicates them and a reader never sees
half of them. Rows of an image deleted later go with it (``ON DELETE CASCADE``).

    SELECT i.path, f.label, f.suggested_label, f.score FROM audit_findings f
    JOIN images i ON i.id = f.image_id
    WHERE f.audit = 'weekly' AND f.kind = 'label_issue' ORDER BY f.score DESC
"""
from __future__ import annotations

import re
from typing import Any

from sqlalchemy import (Column, DateTime, Float, ForeignKey, Integer, String, Table, delete,
                        func)

from .schema import _MYSQL, ClassName, metadata

audit_findings = Table(
    "audit_findings", metadata,
    Column("id", Integer, primary_key=True),
    Column("audit", String(64), nullable=False, index=True),
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("kind", String(16), nullable=False),
    Column("label", ClassName),
    Column("suggested_label", ClassName),  # label_issue only
    Column("score", Float(precision=53)),  # label issue score, outlier distance, similarity
    Column("group_no", Integer),  # duplicates: the group's number in this audit, from 1
    Column("created", DateTime(timezone=True), server_default=func.now()),
    **_MYSQL,
)

#: What :func:`retrainer.sources.sql.display_name` puts first: "#<image id>".
_IMAGE_ID = re.compile(r"^#(\d+)(?: |$)")


def finding_rows(result: Any, name: str) -> list[dict[str, Any]]:
    """The rows for an :class:`retrainer.audit.AuditResult` of database images."""
    from ..sources.base import shown

    ids: dict[str, int] = {}
    for rec in result.records:
        match = _IMAGE_ID.match(rec.display)
        if match:
            ids[shown(rec.display)] = int(match.group(1))
    rows: list[dict[str, Any]] = []

    def add(path: str, kind: str, **values: Any) -> None:
        if path in ids:
            rows.append({"audit": name, "image_id": ids[path], "kind": kind,
                         "suggested_label": None, "group_no": None, **values})

    for d in result.label_issues:
        add(d["path"], "label_issue", label=d["label"], suggested_label=d["suggested_label"],
            score=d["score"])
    for n, d in enumerate(result.duplicates, start=1):
        for path, label in zip(d["paths"], d["labels"]):
            add(path, f"{d['kind']}_duplicate", label=label, score=d["similarity"], group_no=n)
    for d in result.outliers:
        add(d["path"], "outlier", label=d["label"], score=d["score"])
    return rows


def write_findings(db: Any, result: Any, name: str) -> int:
    """Replace audit ``name``'s rows in ``audit_findings`` with ``result``'s; the row count."""
    from .schema import ensure_schema
    from .url import connect, errors

    engine = connect(db)
    rows = finding_rows(result, name)
    with errors(engine, "writing the audit findings"):
        ensure_schema(engine)
        metadata.create_all(engine, tables=[audit_findings])
        with engine.begin() as conn:
            conn.execute(delete(audit_findings).where(audit_findings.c.audit == name))
            if rows:
                conn.execute(audit_findings.insert(), rows)
    return len(rows)
