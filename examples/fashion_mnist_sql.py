"""Fashion-MNIST from its original idx files into a SQL database, trained, and scored in SQL.

The four files are Zalando's originals (gzip or not), in one folder:
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte.
The train set becomes the training/validation roles (stable hash split), t10k the testing role.

    python examples/fashion_mnist_sql.py --idx-dir fashion/ --db fashion.db --per-class 300
    python examples/fashion_mnist_sql.py --idx-dir fashion/ --db mysql://me@localhost/fashion

The password of a server URL can come from RETRAINER_DB_PASSWORD. Then explore it:

    retrainer db stats --db fashion.db
    retrainer db query --db fashion.db "SELECT label, COUNT(*) FROM predictions GROUP BY label"
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np

CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally .gz) as a uint8 array of its declared shape."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"error: {name}(.gz) not found in {folder}")


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def idx_dataset(folder: Path, per_class: int | None, validation_percentage: float = 10.0):
    """A retrainer Dataset built from the idx files: PNG bytes, labels and roles."""
    from retrainer.sources.base import TESTING, Dataset, ImageRecord
    from retrainer.split import assign_splits

    records = []
    for part, (images_file, labels_file) in FILES.items():
        images = read_idx(find(folder, images_file))
        labels = read_idx(find(folder, labels_file))
        taken = dict.fromkeys(range(len(CLASSES)), 0)
        limit = per_class if part == "train" or per_class is None else max(1, per_class // 6)
        for i, (pixels, y) in enumerate(zip(images, labels)):
            if limit is not None and taken[int(y)] >= limit:
                continue
            taken[int(y)] += 1
            data = png(pixels)
            records.append(ImageRecord(key=f"{part}/{CLASSES[y]}/{i:05d}.png", label=CLASSES[y],
                                       read=lambda d=data: d,
                                       split=TESTING if part == "t10k" else None))
    dataset = Dataset(classes=sorted(CLASSES), records=records, root=str(folder))
    return assign_splits(dataset, validation_percentage, 0)


def main(argv: list[str] | None = None) -> dict:
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, HeadConfig,
                                  SourceConfig, TrainConfig)
    from retrainer.db.importer import import_dataset
    from retrainer.db.predictions import label_database, model_id_of
    from retrainer.predict import Classifier
    from retrainer.training import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idx-dir", type=Path, required=True, help="folder with the four idx files")
    ap.add_argument("--db", required=True, help="database URL or SQLite file path")
    ap.add_argument("--per-class", type=int, default=300,
                    help="training images per class (a sixth as many test images); 0: all")
    ap.add_argument("--architecture", default="efficientnet_lite0")
    ap.add_argument("--output-dir", default="fashion_model")
    ap.add_argument("--bottleneck-dir", default=None)
    ap.add_argument("--epochs", type=int, default=None,
                    help="train the head by Adam for at most this many epochs (default: the "
                         "cross-validated head, which has no epochs)")
    args = ap.parse_args(argv)

    dataset = idx_dataset(args.idx_dir, args.per_class or None)
    imported = import_dataset(args.db, dataset)
    print(f"imported {imported.added} images ({imported.existing} already there)", file=sys.stderr)
    trained = train(TrainConfig(source=SourceConfig(db=args.db),
                                backbone=BackboneConfig(args.architecture),
                                extraction=ExtractionConfig(bottleneck_dir=args.bottleneck_dir),
                                head=(HeadConfig(search="off", epochs=args.epochs)
                                      if args.epochs else HeadConfig()),
                                export=ExportConfig(output_dir=args.output_dir,
                                                    formats=("graph",))))
    classifier = Classifier.load(args.output_dir)
    labelled = label_database(args.db, classifier, model_id_of(args.output_dir),
                              where="role = 'testing'")
    summary = {"imported": imported.to_dict(), "train_test_accuracy": trained.test_accuracy,
               "predictions": labelled.to_dict()}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
