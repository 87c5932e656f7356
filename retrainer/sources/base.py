"""The records every source yields, and the dataset they make up."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

TRAINING, VALIDATION, TESTING = "training", "validation", "testing"
SPLITS = (TRAINING, VALIDATION, TESTING)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: where it is, how to read it, and which split it belongs to.

    ``key`` is stable for the life of the image (a relative path, a database id); ``split`` is
    set when the source itself decides it (a train/ val/ test/ tree, database roles) and
    ``None`` when the hash split should.
    """

    key: str
    label: str
    read: Callable[[], bytes] = field(compare=False, repr=False)
    split: str | None = None
    path: str | None = None

    @property
    def display(self) -> str:
        return self.path or self.key


@dataclass(frozen=True)
class Skipped:
    """An image that could not be used, and why (shown in the final summary)."""

    name: str
    reason: str


@dataclass
class Dataset:
    """Labelled records plus the class list, in output order (sorted, verbatim names)."""

    classes: list[str]
    records: list[ImageRecord]
    root: str = ""
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {label: count}} for records whose split is known."""
        out: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
        for rec in self.records:
            if rec.split:
                out[rec.split][rec.label] += 1
        return {s: dict(c) for s, c in out.items()}


def shown(path: str) -> str:
    """A path printable as UTF-8 (bytes that are not UTF-8 become U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
