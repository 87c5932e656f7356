"""Bottlenecks: backbone outputs, computed once per image content and cached on disk."""
from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..decoding import default_workers
from ..files import default_cache_dir
from ..sources.base import ImageRecord, Skipped
from .cache import BottleneckCache
from .engines import BackboneModel, Engine, get_engine

__all__ = ["BackboneModel", "BottleneckCache", "Engine", "default_cache_dir", "get_engine",
           "hash_records", "verified"]


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(rec: ImageRecord, key: str) -> ImageRecord:
    """``rec``, whose bytes are given to a decoder only while they still hash to ``key``.

    Records are hashed (to find what the cache lacks) and later read again to be decoded. A
    file replaced in between would put the new pixels under the old content's key, for good:
    the read of the decoder checks the bytes it returns, and an image that changed is skipped
    (with a reason) rather than cached under a key that is not its own.
    """
    from ..errors import ImageError

    def read() -> bytes:
        data = rec.read()
        if content_key(data) != key:
            raise ImageError(rec.display, "changed while this run was reading it; run again "
                                          "to use its new content")
        return data

    return dataclasses.replace(rec, read=read)


def hash_records(records: Sequence[ImageRecord], workers: int | None = None
                 ) -> tuple[list[str | None], list[Skipped]]:
    """SHA-256 of every record's bytes (None where it cannot be read), in record order."""
    from ..progress import bar

    def one(rec: ImageRecord) -> str | Skipped:
        try:
            data = rec.read()
        except OSError as exc:
            return Skipped(rec.display, f"cannot read ({exc.strerror or exc})")
        if not data:
            return Skipped(rec.display, "empty file")
        return content_key(data)

    keys: list[str | None] = []
    skipped: list[Skipped] = []
    with ThreadPoolExecutor(workers or default_workers()) as pool, \
            bar(len(records), "reading images") as progress:
        for result in pool.map(one, records, chunksize=16):
            if isinstance(result, Skipped):
                keys.append(None)
                skipped.append(result)
            else:
                keys.append(result)
            progress.update(1)
    return keys, skipped
