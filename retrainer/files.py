"""Files every stage writes: atomic writes, the user cache dir, folders that must be writable.

Kept apart from the stages so that any of them (backbones, bottlenecks, export, evaluation) can
write safely without importing another stage.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

from .errors import FolderNotWritable


def default_cache_dir() -> Path:
    """``$RETRAINER_CACHE_DIR`` or the user cache dir (``~/.cache/retrainer``)."""
    env = os.environ.get("RETRAINER_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("retrainer"))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of the file at ``path``, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _kind(mode: int) -> str:
    """What a path that is not a regular file is, for messages."""
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")


def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file to read ("does not exist", "is a folder, not a
    file", ...), or None when it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return "does not exist" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror})"
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a file"


def open_regular_file(path: str | Path) -> BinaryIO:
    """The regular file at ``path``, open for reading in binary mode. Anything else named like
    one (a FIFO, a device, a folder) raises :class:`OSError` at once, instead of blocking until
    a writer comes or reading without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file: {_kind(mode)}", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of the regular file at ``path`` (see :func:`open_regular_file`)."""
    with open_regular_file(path) as fh:
        return fh.read()


def writable_dir(path: str | Path, what: str, hint: str | None = None) -> Path:
    """Create ``path`` (and its parents) if needed; a :class:`FolderNotWritable` naming it and
    the fix when it cannot be created or written to."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FolderNotWritable(path, what, "a file of that name is in the way", hint) from None
    except OSError as exc:
        raise FolderNotWritable(path, what, exc.strerror or str(exc), hint) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderNotWritable(path, what, os.strerror(errno.EACCES), hint)
    return path


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
