"""A small, safe filter language for choosing images: ``role = 'testing' AND label IN ('cat')``.

The text is parsed here into SQLAlchemy expressions with bound parameters; it never reaches
the database as SQL. Only a few columns, comparisons, ``IN``, ``LIKE``, ``IS [NOT] NULL``,
``AND``/``OR``/``NOT`` and parentheses are understood; anything else is refused with the
position of the problem, so a ``--where`` cannot drop a table or read another one.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import RetrainerError

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<op><>|!=|<=|>=|=|<|>)
    | (?P<punct>[(),])
    | (?P<word>[A-Za-z_][A-Za-z_0-9]*)
    )""", re.VERBOSE)
KEYWORDS = {"and", "or", "not", "in", "like", "is", "null"}
#: Deepest nesting of parentheses and NOTs a filter may have (the parser recurses on them).
MAX_DEPTH = 64


class FilterError(RetrainerError):
    """A --where filter that is not in the supported language."""


def columns() -> dict[str, Any]:
    """The names a filter may use, and the columns they stand for."""
    from .schema import categories, images, roles

    return {"id": images.c.id, "label": categories.c.name, "role": roles.c.name,
            "path": images.c.path, "sha256": images.c.sha256}


def parse_filter(text: str) -> Any:
    """The SQLAlchemy condition for ``text``; raises :class:`FilterError`."""
    tokens = _tokenize(text)
    parser = _Parser(text, tokens, columns())
    expr = parser.expr()
    if parser.pos < len(tokens):
        parser.fail("unexpected", tokens[parser.pos])
    return expr


def narrow(query: Any, where: str | None = None, labels: Any = None, roles: Any = None) -> Any:
    """``query`` (over images joined to categories and roles) limited by a filter, classes, roles."""
    from .schema import categories, roles as roles_table

    if where:
        query = query.where(parse_filter(where))
    if labels:
        query = query.where(categories.c.name.in_(list(labels)))
    if roles:
        query = query.where(roles_table.c.name.in_(list(roles)))
    return query


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    out: list[tuple[str, Any, int]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            bad = text[pos:].lstrip()[:20]
            raise FilterError(f"cannot read the filter at {bad!r}.", _HELP)
        kind = m.lastgroup or ""
        raw = m.group(kind)
        start = m.start(kind)
        if kind == "string":
            out.append(("value", raw[1:-1].replace("''", "'"), start))
        elif kind == "number":
            out.append(("value", float(raw) if "." in raw else int(raw), start))
        elif kind == "word" and raw.lower() in KEYWORDS:
            out.append((raw.lower(), raw, start))
        else:
            out.append((kind, raw, start))
        pos = m.end()
    if not out:
        raise FilterError("the filter is empty.", _HELP)
    return out


_HELP = ("Filters use id, label, role, path, sha256 with = != < <= > >= LIKE IN (...) "
         "IS [NOT] NULL, AND, OR, NOT and parentheses; e.g. \"role = 'testing'\".")


_NAMES = {"word": "a column name", "value": "a quoted value or a number"}


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, Any, int]], cols: dict[str, Any]):
        self.text, self.tokens, self.cols, self.pos = text, tokens, cols, 0
        self.depth = 0

    def fail(self, what: str, token: tuple[str, Any, int] | None = None) -> None:
        where = f" at {self.text[token[2]:][:20]!r}" if token else " at the end"
        raise FilterError(f"{what} in the filter{where}.", _HELP)

    def peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> tuple[str, Any, int]:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            self.fail(f"expected {value or _NAMES.get(kind, kind)}", tok)
        self.pos += 1
        return tok  # type: ignore[return-value]

    def expr(self) -> Any:
        from sqlalchemy import or_

        parts = [self.term()]
        while (tok := self.peek()) and tok[0] == "or":
            self.pos += 1
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else or_(*parts)

    def term(self) -> Any:
        from sqlalchemy import and_

        parts = [self.factor()]
        while (tok := self.peek()) and tok[0] == "and":
            self.pos += 1
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else and_(*parts)

    def factor(self) -> Any:
        from sqlalchemy import not_

        tok = self.peek()
        if tok and (tok[0] == "not" or (tok[0] == "punct" and tok[1] == "(")):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FilterError(f"the filter nests parentheses and NOTs over {MAX_DEPTH} deep.",
                                  "Write it flatter: a IN (...), or AND/OR without extra "
                                  "parentheses.")
            self.pos += 1
            try:
                if tok[0] == "not":
                    return not_(self.factor())
                inner = self.expr()
                self.take("punct", ")")
                return inner
            finally:
                self.depth -= 1
        return self.comparison()

    def comparison(self) -> Any:
        tok = self.take("word")
        name = tok[1].lower()
        if name not in self.cols:
            raise FilterError(f"unknown column {tok[1]!r} in the filter.", _HELP)
        col = self.cols[name]
        nxt = self.peek()
        if nxt is None:
            self.fail("expected a comparison")
        kind = nxt[0]  # type: ignore[index]
        if kind == "op":
            self.pos += 1
            value = self.take("value")[1]
            op = nxt[1]  # type: ignore[index]
            return {"=": col == value, "!=": col != value, "<>": col != value,
                    "<": col < value, "<=": col <= value, ">": col > value,
                    ">=": col >= value}[op]
        if kind == "like":
            self.pos += 1
            return col.like(self.take("value")[1])
        if kind == "is":
            self.pos += 1
            negate = bool((t := self.peek()) and t[0] == "not")
            self.pos += negate
            self.take("null")
            return col.is_not(None) if negate else col.is_(None)
        negate = kind == "not"
        if negate:
            self.pos += 1
        if (t := self.peek()) and t[0] == "in":
            self.pos += 1
            self.take("punct", "(")
            values = [self.take("value")[1]]
            while (t := self.peek()) and t[0] == "punct" and t[1] == ",":
                self.pos += 1
                values.append(self.take("value")[1])
            self.take("punct", ")")
            return col.not_in(values) if negate else col.in_(values)
        self.fail("expected =, LIKE, IN or IS", self.peek())
