"""The on-disk bottleneck cache: content-addressed, binary, atomic, resumable.

Layout: ``ROOT/<backbone id>/shard-*.npz``. A shard holds ``keys`` (uint8, N x 32: the SHA-256
of each image's bytes) and ``bottlenecks`` (float32, N x dim). An edited image has a new key and
is recomputed; a renamed or moved one is found again. Shards are written to a temporary name and
renamed into place, so a run killed at any moment leaves either a whole shard or none, and the
next run computes only what is missing. A shard that still fails to load (a damaged disk, a
copied partial file) is set aside with a warning and its entries are recomputed.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.npz"
#: A shard is written every FLUSH_EVERY entries or FLUSH_SECONDS, whichever comes first:
#: that bounds what a hard kill can lose, in images and in time.
FLUSH_EVERY = 256
FLUSH_SECONDS = 2.0
#: More shards than this are merged when a writer closes, into shards of up to COMPACT_ROWS.
COMPACT_ABOVE = 64
COMPACT_ROWS = 8192


def default_cache_dir() -> Path:
    """``$RETRAINER_CACHE_DIR`` or the user cache dir (``~/.cache/retrainer``)."""
    env = os.environ.get("RETRAINER_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("retrainer"))


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class BottleneckCache:
    """The bottlenecks of one backbone (its id covers weights, input size and precision)."""

    def __init__(self, root: str | Path, backbone_id: str, dim: int,
                 info: dict | None = None) -> None:
        self.dir = Path(root) / backbone_id
        self.dim = dim
        self.dir.mkdir(parents=True, exist_ok=True)
        info_path = self.dir / "backbone.json"
        if info and not info_path.exists():
            atomic_write(info_path, lambda fh: fh.write(json.dumps(info, indent=2).encode()))
        self._index: dict[bytes, tuple[Path, int]] | None = None
        self._pending_keys: list[bytes] = []
        self._pending_rows: list[np.ndarray] = []
        self._last_flush = time.monotonic()
        self.written = 0

    # -- reading ------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(SHARD_GLOB))

    def _load_shard(self, path: Path, what: str = "keys") -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = npz["keys"]
                if what == "keys":
                    arr = keys
                else:
                    arr = npz["bottlenecks"]
                    if arr.shape != (len(keys), self.dim) or arr.dtype != np.float32:
                        raise ValueError(f"shape {arr.shape}, expected ({len(keys)}, {self.dim})")
            if keys.ndim != 2 or keys.shape[1] != 32:
                raise ValueError("bad key array")
            return arr
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            bad = path.with_suffix(".bad")
            log.warning("bottleneck cache: damaged shard %s (%s); its entries will be "
                        "recomputed", path.name, exc)
            try:
                os.replace(path, bad)
            except OSError:
                pass
            return None

    def index(self) -> dict[bytes, tuple[Path, int]]:
        """key -> (shard, row), built once from the shards' key arrays only."""
        if self._index is None:
            index: dict[bytes, tuple[Path, int]] = {}
            for shard in self.shards():
                keys = self._load_shard(shard)
                if keys is None:
                    continue
                for row, key in enumerate(keys):
                    index[key.tobytes()] = (shard, row)
            self._index = index
        return self._index

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self.index()

    def __len__(self) -> int:
        return len(self.index())

    def missing(self, keys: Iterable[str]) -> list[str]:
        index = self.index()
        return [k for k in keys if bytes.fromhex(k) not in index]

    def load(self, keys: list[str]) -> np.ndarray:
        """Bottlenecks for ``keys`` in order, as one (len(keys), dim) float32 array."""
        self.flush()
        index = self.index()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        wanted: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = index[bytes.fromhex(key)]
            wanted.setdefault(shard, []).append((i, row))
        for shard, pairs in wanted.items():
            data = self._load_shard(shard, "bottlenecks")
            if data is None:
                self._index = None
                raise KeyError(f"bottleneck shard {shard.name} vanished or is damaged")
            dst, src = zip(*pairs)
            out[list(dst)] = data[list(src)]
        return out

    # -- writing ------------------------------------------------------------------------
    def add(self, keys: list[str], bottlenecks: np.ndarray) -> None:
        """Buffer entries; they reach the disk as one shard per FLUSH_EVERY or FLUSH_SECONDS."""
        bottlenecks = np.asarray(bottlenecks, dtype=np.float32).reshape(len(keys), self.dim)
        for key, row in zip(keys, bottlenecks):
            self._pending_keys.append(bytes.fromhex(key))
            self._pending_rows.append(row)
        if len(self._pending_keys) >= FLUSH_EVERY or \
                time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending_keys:
            return
        keys = np.frombuffer(b"".join(self._pending_keys), dtype=np.uint8).reshape(-1, 32)
        rows = np.stack(self._pending_rows).astype(np.float32)
        path = self._write_shard(keys, rows)
        if self._index is not None:
            for r, key in enumerate(self._pending_keys):
                self._index[key] = (path, r)
        self.written += len(self._pending_keys)
        self._pending_keys, self._pending_rows = [], []

    def _write_shard(self, keys: np.ndarray, rows: np.ndarray) -> Path:
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        path = self.dir / name
        atomic_write(path, lambda fh: np.savez(fh, keys=keys, bottlenecks=rows))
        return path

    def close(self) -> None:
        """Write what is buffered, and merge shards when there are many of them."""
        self.flush()
        if len(self.shards()) > COMPACT_ABOVE:
            self.compact()

    def compact(self) -> None:
        """Merge small shards into shards of up to COMPACT_ROWS entries.

        Shards are merged a group at a time, so memory holds at most one merged shard whatever
        the cache's size. A crash half-way leaves duplicates, which are harmless.
        """
        index = self.index()
        if not index:
            return
        per_shard: dict[Path, list[bytes]] = {}
        for key, (shard, _) in index.items():
            per_shard.setdefault(shard, []).append(key)
        groups: list[list[Path]] = [[]]
        size = 0
        for shard in sorted(per_shard):
            n = len(per_shard[shard])
            if n >= COMPACT_ROWS // 2:
                continue  # big enough already
            if size + n > COMPACT_ROWS and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(shard)
            size += n
        for group in groups:
            if len(group) < 2:
                continue
            keys = [k for shard in group for k in per_shard[shard]]
            rows = self.load([k.hex() for k in keys])
            key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 32)
            self._write_shard(key_arr, rows)
            for shard in group:
                shard.unlink(missing_ok=True)
            self._index = None
            index = self.index()

    def __enter__(self) -> "BottleneckCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
