"""The on-disk bottleneck cache: content-addressed, binary, atomic, resumable.

Layout: ``ROOT/<backbone id>/shard-*.npz``. A shard holds ``keys`` (uint8, N x 32: the SHA-256
of each image's bytes) and ``bottlenecks`` (float32, N x dim). An edited image has a new key and
is recomputed; a renamed or moved one is found again. Shards are written to a temporary name and
renamed into place, so a run killed at any moment leaves either a whole shard or none, and the
next run computes only what is missing. A shard that still fails to load (a damaged disk, a
copied partial file) is set aside with a warning and its entries are recomputed; one that cannot
be read for a reason that says nothing about its content (permissions, too many open files, a
shard another process has just merged away) is left alone.

Several processes may share one cache (the default cache dir is shared by every run of a user).
Writers only ever add shards, under new names. Only compaction deletes shards, and only while it
holds ``.lock`` exclusively; readers hold it shared while they index the shards or read rows, and
index again when a shard they indexed has gone. One compaction runs at a time (``.compact.lock``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import CacheError, FolderNotWritable
from ..files import atomic_write, open_regular_file, writable_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.npz"
#: A shard is written every FLUSH_EVERY entries or FLUSH_SECONDS, whichever comes first:
#: that bounds what a hard kill can lose, in images and in time.
FLUSH_EVERY = 256
FLUSH_SECONDS = 2.0
#: More shards than this are merged when a writer closes, into shards of up to COMPACT_ROWS.
COMPACT_ABOVE = 64
COMPACT_ROWS = 8192
#: How long compaction waits for readers before it leaves merged-away shards for a later run.
COMPACT_WAIT = 10.0
LOCK_FILE = ".lock"
COMPACT_LOCK_FILE = ".compact.lock"
#: OSErrors that say nothing about a shard's content: never a reason to set it aside.
_NOT_DAMAGE = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE,
               errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ESTALE, errno.EROFS}


class _Vanished(Exception):
    """A shard this process indexed is gone (merged away by another process, or set aside)."""


class BottleneckCache:
    """The bottlenecks of one backbone (its id covers weights, input size and precision)."""

    def __init__(self, root: str | Path, backbone_id: str, dim: int,
                 info: dict | None = None) -> None:
        self.dir = Path(root) / backbone_id
        self.dim = dim
        writable_dir(self.dir, "bottleneck cache folder",
                     "Give bottleneck_dir=DIR (or RETRAINER_CACHE_DIR) a folder you can write to, "
                     "or give this one to your user (chown/chmod).")
        info_path = self.dir / "backbone.json"
        if info and not info_path.exists():
            atomic_write(info_path, lambda fh: fh.write(json.dumps(info, indent=2).encode()))
        self._index: dict[bytes, tuple[Path, int]] | None = None
        self._indexed: list[Path] = []  # the shards the index was built from
        self._pending_keys: list[bytes] = []
        self._pending_rows: list[np.ndarray] = []
        self._last_flush = time.monotonic()
        self.written = 0

    # -- locking ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, name: str, exclusive: bool, wait: float | None = None) -> Iterator[bool]:
        """Hold ``name`` (flock) shared or exclusive; yields whether it is held.

        ``wait`` None blocks; otherwise gives up after ``wait`` seconds. Without fcntl, or in
        a cache this user cannot write (the lock file cannot be opened), readers go on unlocked
        (yield True) and exclusive holders get nothing (yield False).
        """
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                fd = None
        if fd is None:
            yield not exclusive
            return
        try:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            held = True
            if wait is None:
                fcntl.flock(fd, op)
            else:
                deadline = time.monotonic() + wait
                while True:
                    try:
                        fcntl.flock(fd, op | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            held = False
                            break
                        time.sleep(0.02)
            yield held
        finally:
            os.close(fd)  # releases the lock

    # -- reading ------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(SHARD_GLOB))

    def _load_shard(self, path: Path, what: str = "keys") -> np.ndarray | None:
        """The shard's keys (or bottlenecks); None when it has gone or is damaged (then it is
        set aside). An OSError that says nothing about the content is raised as it is."""
        try:
            with open_regular_file(path) as fh, np.load(fh, allow_pickle=False) as npz:
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
        except FileNotFoundError:
            return None  # merged away or set aside by another process: not damage
        except OSError as exc:
            if exc.errno in _NOT_DAMAGE:
                raise
            self._set_aside(path, exc)
            return None
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            # Bytes that are no .npz read as a pickle, and numpy's message then suggests
            # loading them with allow_pickle: no advice to pass on.
            self._set_aside(path, "not a .npz file" if "allow_pickle" in str(exc) else exc)
            return None

    def _set_aside(self, path: Path, exc: BaseException | str) -> None:
        log.warning("bottleneck cache: damaged shard %s (%s); its entries will be "
                    "recomputed", path.name, exc)
        try:
            os.replace(path, path.with_suffix(".bad"))
        except OSError:
            pass

    def index(self) -> dict[bytes, tuple[Path, int]]:
        """key -> (shard, row), built once from the shards' key arrays only."""
        if self._index is None:
            with self._lock(LOCK_FILE, exclusive=False):
                self._build_index()
        assert self._index is not None
        return self._index

    def _build_index(self) -> None:
        """Index every shard; the caller holds the shared lock, so none is deleted meanwhile."""
        index: dict[bytes, tuple[Path, int]] = {}
        indexed: list[Path] = []
        for shard in self.shards():
            try:
                keys = self._load_shard(shard)
            except OSError as exc:
                log.warning("bottleneck cache: cannot read %s (%s); its entries will be "
                            "recomputed", shard, exc.strerror or exc)
                continue
            if keys is None:
                continue
            indexed.append(shard)
            for row, key in enumerate(keys):
                index[key.tobytes()] = (shard, row)
        self._index, self._indexed = index, indexed

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self.index()

    def __len__(self) -> int:
        return len(self.index())

    def missing(self, keys: Iterable[str]) -> list[str]:
        index = self.index()
        return [k for k in keys if bytes.fromhex(k) not in index]

    def load(self, keys: list[str]) -> np.ndarray:
        """Bottlenecks for ``keys`` in order, as one (len(keys), dim) float32 array.

        A shard that has gone since it was indexed (another process merged it) makes the index
        be built again, under the shared lock, so no shard can go while it is read.
        """
        self.flush()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        with self._lock(LOCK_FILE, exclusive=False):
            for attempt in range(2):
                if self._index is None or attempt:
                    self._build_index()
                try:
                    self._gather(keys, out)
                    return out
                except _Vanished:
                    continue
        lost = self.missing(keys)
        raise CacheError(f"{len(lost) or 'some'} bottleneck(s) of this run are no longer in the "
                         f"cache folder '{self.dir}' (a damaged shard was set aside).",
                         "Run the command again: the missing ones will be recomputed.")

    def _gather(self, keys: list[str], out: np.ndarray) -> None:
        index = self._index
        assert index is not None
        wanted: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            hit = index.get(bytes.fromhex(key))
            if hit is None:
                raise _Vanished(key)
            wanted.setdefault(hit[0], []).append((i, hit[1]))
        for shard, pairs in wanted.items():
            try:
                data = self._load_shard(shard, "bottlenecks")
            except OSError as exc:
                raise CacheError(f"cannot read the bottleneck shard '{shard}' "
                                 f"({exc.strerror or exc}).",
                                 "Fix the cache folder's permissions, or give another "
                                 "bottleneck_dir=DIR.") from None
            if data is None:
                raise _Vanished(shard.name)
            dst, src = zip(*pairs)
            out[list(dst)] = data[list(src)]

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
        try:
            atomic_write(path, lambda fh: np.savez(fh, keys=keys, bottlenecks=rows))
        except OSError as exc:
            raise FolderNotWritable(self.dir, "bottleneck cache folder", exc.strerror or str(exc),
                                    "Free some space or fix its permissions, or give "
                                    "another bottleneck_dir=DIR.") from None
        return path

    def close(self) -> None:
        """Write what is buffered, and merge shards when there are many of them."""
        self.flush()
        if len(self.shards()) > COMPACT_ABOVE:
            try:
                self.compact()
            except (OSError, CacheError) as exc:  # the entries are all on disk: only tidying failed
                log.warning("bottleneck cache: compaction stopped (%s); the cache stays usable",
                            exc)

    def compact(self) -> None:
        """Merge small shards into shards of up to COMPACT_ROWS entries.

        Shards are merged a group at a time, so memory holds at most one merged shard whatever
        the cache's size. A crash half-way leaves duplicates, which are harmless. Only one
        process compacts at a time; the others skip it. A shard is deleted only once what it
        holds is in another shard, and only while no reader holds the lock.
        """
        with self._lock(COMPACT_LOCK_FILE, exclusive=True, wait=0) as held:
            if held:
                self._compact()

    def _compact(self) -> None:
        self._index = None
        index = self.index()
        per_shard: dict[Path, list[bytes]] = {}
        for key, (shard, _) in index.items():
            per_shard.setdefault(shard, []).append(key)
        # Shards of this snapshot whose every entry lives in a later shard (a merge whose
        # deletion was skipped, a duplicate): nothing is lost by deleting them.
        superseded = [s for s in self._indexed if s not in per_shard]
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
            self._delete(group)
        self._delete(superseded)

    def _delete(self, shards: list[Path]) -> None:
        if not shards:
            return
        with self._lock(LOCK_FILE, exclusive=True, wait=COMPACT_WAIT) as held:
            if not held:
                log.debug("bottleneck cache: readers busy; %d merged shard(s) kept", len(shards))
                return
            for shard in shards:
                shard.unlink(missing_ok=True)
        self._index = None

    def __enter__(self) -> "BottleneckCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
