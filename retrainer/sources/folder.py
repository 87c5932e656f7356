"""A folder with one sub-folder per class (or train/ val/ test/ folders holding those)."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Iterable

from ..config import DEFAULT_MODEL_DIR
from ..errors import DatasetError
from ..files import read_regular_file
from .base import TESTING, TRAINING, VALIDATION, Dataset, ImageRecord

#: Top-level folder names that define the split themselves.
SPLIT_DIRS = {"train": TRAINING, "training": TRAINING, "val": VALIDATION,
              "valid": VALIDATION, "validation": VALIDATION, "test": TESTING, "testing": TESTING}
#: Folders that hold the tool's own output, never images to train on.
OWN_DIRS = {DEFAULT_MODEL_DIR, "bottlenecks", "__pycache__"}

log = logging.getLogger(__name__)


def _reader(path: Path):
    return functools.partial(read_regular_file, path)


def _walk_files(folder: Path, exclude: set[Path], walk: "_Walk") -> Iterable[Path]:
    """Regular files below ``folder``, sorted, skipping hidden entries and excluded folders.

    A symlinked folder is followed at most once in the whole scan (folders are tracked by their
    real path), so a link to a parent (``cats/loop -> ..``) is no cycle, and a folder that is
    another class's (or holds class folders) is not walked again under this one. A file reached
    twice (two links to it) is listed once.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list '%s' (%s); skipped", folder, exc.strerror or exc)
        walk.unreadable += 1
        return
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            is_dir = entry.is_dir()  # follows links
        except OSError:  # a symlink loop: reported as unreadable when it is read
            yield path
            continue
        if is_dir:
            if entry.name not in OWN_DIRS:
                subdirs.append(path)
            continue
        try:
            st = os.stat(path)
        except OSError:
            yield path  # a dangling link: reported as unreadable when it is read
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in walk.files:
            walk.repeated_files += 1
            continue
        walk.files.add(ident)
        yield path
    for path in subdirs:
        real = Path(os.path.realpath(path))
        if real in exclude or real in walk.dirs or walk.reserved(real):
            walk.links_skipped += 1
            continue
        walk.dirs.add(real)
        yield from _walk_files(path, exclude, walk)


class _Walk:
    """What one scan has visited: real folder paths, file identities, and what it skipped."""

    def __init__(self, class_dirs: list[Path], tops: list[Path]) -> None:
        self.dirs: set[Path] = set()
        self.files: set[tuple[int, int]] = set()
        self.classes = [Path(os.path.realpath(p)) for p in class_dirs]
        self.tops = [Path(os.path.realpath(p)) for p in tops]
        self.current: Path | None = None
        self.links_skipped = 0
        self.repeated_files = 0
        self.unreadable = 0

    def reserved(self, real: Path) -> bool:
        """A folder that belongs to another class, or holds the class folders themselves."""
        if any(real == t or t.is_relative_to(real) for t in self.tops):
            return True
        for c in self.classes:
            if c == self.current:
                continue
            if real.is_relative_to(c) or c.is_relative_to(real):
                return True
        return False


def _class_dirs(folder: Path, exclude: set[Path]) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in OWN_DIRS
        and p.resolve() not in exclude
    )


def _split_layout(root: Path, exclude: set[Path]) -> dict[str, Path] | None:
    """{split: folder} when the top level is train/ + val/ (+ test/), else None."""
    dirs = _class_dirs(root, exclude)
    names = {p.name.lower(): p for p in dirs}
    found = {SPLIT_DIRS[n]: p for n, p in names.items() if n in SPLIT_DIRS}
    if TRAINING in found and len(found) >= 2 and len(found) == len(dirs):
        return found
    return None


def scan_folder(image_dir: str | Path, exclude: Iterable[str | Path] = (),
                min_classes: int = 2) -> Dataset:
    """List the labelled images below ``image_dir``. Decoding happens later, during extraction.

    Raises :class:`DatasetError` when the folder has fewer than ``min_classes`` class folders
    (training needs two; scoring a model on one class's photos needs one).
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise DatasetError(f"image folder '{image_dir}' does not exist or is not a folder.")
    excluded = {Path(p).resolve() for p in exclude}
    layout = _split_layout(root, excluded)
    parts = layout.items() if layout else [(None, root)]

    records: list[ImageRecord] = []
    classes: set[str] = set()
    class_dirs = [(split, c) for split, base in parts for c in _class_dirs(base, excluded)]
    walk = _Walk([c for _, c in class_dirs], [root] + [base for _, base in parts])
    for _, class_dir in class_dirs:
        walk.dirs.add(Path(os.path.realpath(class_dir)))
    for split, class_dir in class_dirs:
        classes.add(class_dir.name)
        walk.current = Path(os.path.realpath(class_dir))
        for file in _walk_files(class_dir, excluded, walk):
            rel = file.relative_to(root).as_posix()
            records.append(ImageRecord(key=rel, label=class_dir.name, read=_reader(file),
                                       split=split, path=str(file)))
    if walk.links_skipped or walk.repeated_files:
        log.warning("folder walk: %d linked folder(s) not followed (already walked, a loop, or "
                    "another class's), %d file(s) reached twice counted once",
                    walk.links_skipped, walk.repeated_files)
    if len(classes) < min_classes:
        loose = sum(1 for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        where = f" ({loose} loose files)" if loose else ""
        folders = "class folder" if min_classes == 1 else "class folders"
        raise DatasetError(
            f"need at least {min_classes} {folders} in '{image_dir}', found {len(classes)}{where}.",
            "Put each class in its own subfolder: DIR/cats/*.jpg, DIR/dogs/*.jpg.",
        )
    return Dataset(classes=sorted(classes), records=records, root=str(root))
