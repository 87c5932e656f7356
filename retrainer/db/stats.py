"""``db stats``: how many images of each class each role holds, counted by the database."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sources.base import SPLITS

NO_LABEL, NO_ROLE = "(unlabelled)", "(no role)"


@dataclass
class ClassDistribution:
    """{role: {class: count}} plus the order to show them in."""

    classes: list[str]
    roles: list[str]
    counts: dict[str, dict[str, int]]

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "roles": self.roles, "counts": self.counts,
                "per_role": {r: sum(self.counts[r].values()) for r in self.roles},
                "per_class": {c: sum(self.counts[r].get(c, 0) for r in self.roles)
                              for c in self.classes},
                "total": self.total}

    def table(self) -> str:
        width = max([len(c) for c in self.classes] + [len("class"), len("total")])
        cols = self.roles + ["total"]
        widths = [max(len(r), 6) for r in cols]
        lines = ["  ".join([f"{'class':<{width}}"] + [f"{r:>{w}}" for r, w in zip(cols, widths)])]
        for c in self.classes + ["total"]:
            if c == "total":
                values = [sum(self.counts[r].values()) for r in self.roles]
            else:
                values = [self.counts[r].get(c, 0) for r in self.roles]
            values.append(sum(values))
            lines.append("  ".join([f"{c:<{width}}"] + [f"{v:>{w}}" for v, w in zip(values, widths)]))
        return "\n".join(lines)


def class_distribution(db: Any) -> ClassDistribution:
    """One GROUP BY over images, categories and roles."""
    from sqlalchemy import func, select

    from .schema import categories, images, roles
    from .url import connect, errors

    engine = connect(db)
    query = (select(categories.c.name, roles.c.name, func.count(images.c.id))
             .select_from(images.outerjoin(categories, images.c.label_id == categories.c.id)
                          .outerjoin(roles, images.c.role_id == roles.c.id))
             .group_by(categories.c.name, roles.c.name))
    counts: dict[str, dict[str, int]] = {}
    with errors(engine, "counting images"), engine.connect() as conn:
        for label, role, n in conn.execute(query):
            counts.setdefault(role or NO_ROLE, {})[label or NO_LABEL] = int(n)
    order = [r for r in SPLITS if r in counts] + sorted(r for r in counts if r not in SPLITS)
    classes = sorted({c for per in counts.values() for c in per})
    return ClassDistribution(classes=classes, roles=order, counts={r: counts[r] for r in order})
