"""A folder with one sub-folder per class (or train/ val/ test/ folders holding those)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import DatasetError
from .base import TESTING, TRAINING, VALIDATION, Dataset, ImageRecord

#: Top-level folder names that define the split themselves.
SPLIT_DIRS = {"train": TRAINING, "training": TRAINING, "val": VALIDATION,
              "valid": VALIDATION, "validation": VALIDATION, "test": TESTING, "testing": TESTING}
#: Folders that hold the tool's own output, never images to train on.
OWN_DIRS = {"retrained", "bottlenecks", "__pycache__"}


def _reader(path: Path):
    return path.read_bytes


def _walk_files(folder: Path, exclude: set[Path]) -> Iterable[Path]:
    """Regular files below ``folder``, sorted, skipping hidden entries and excluded folders."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d not in OWN_DIRS and (here / d).resolve() not in exclude
        )
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


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


def scan_folder(image_dir: str | Path, exclude: Iterable[str | Path] = ()) -> Dataset:
    """List the labelled images below ``image_dir``. Decoding happens later, during extraction.

    Raises :class:`DatasetError` when the folder cannot define at least two classes.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise DatasetError(f"image folder '{image_dir}' does not exist or is not a folder.")
    excluded = {Path(p).resolve() for p in exclude}
    layout = _split_layout(root, excluded)
    parts = layout.items() if layout else [(None, root)]

    records: list[ImageRecord] = []
    classes: set[str] = set()
    for split, base in parts:
        for class_dir in _class_dirs(base, excluded):
            classes.add(class_dir.name)
            for file in _walk_files(class_dir, excluded):
                rel = file.relative_to(root).as_posix()
                records.append(ImageRecord(key=rel, label=class_dir.name, read=_reader(file),
                                           split=split, path=str(file)))
    if len(classes) < 2:
        loose = sum(1 for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        where = f" ({loose} loose files)" if loose else ""
        raise DatasetError(
            f"need at least 2 class folders in '{image_dir}', found {len(classes)}{where}.",
            "Put each class in its own subfolder: DIR/cats/*.jpg, DIR/dogs/*.jpg.",
        )
    return Dataset(classes=sorted(classes), records=records, root=str(root))
