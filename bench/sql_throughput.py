"""Import and label throughput of a SQL database against the folder path, on the same images.

    python bench/sql_throughput.py --data-root DATASETS/fashion_mnist_png \
        [--db mysql://user@127.0.0.1/bench] [--model-dir retrained] [--json]

Without --db a temporary SQLite file is used; the database should be empty (its import is
timed). Measured: ``db import`` (images/s), listing + reading + decoding every image to the
model input size (folder vs database), and with --model-dir labelling the same images
through the folder path and through ``label --db`` (predictions written, one transaction per
batch), each in this one process so TensorFlow's start-up is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def timed(fn):
    t = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t
    return {"images": n, "seconds": round(dt, 3), "images_per_second": round(n / dt, 1)}


def main() -> None:
    from retrainer.decoding import decode_stream, default_workers
    from retrainer.db.importer import import_folder
    from retrainer.db.url import masked, database_url
    from retrainer.sources.folder import scan_folder
    from retrainer.db.source import scan_database

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("RETRAINER_DATA"),
                    help="a folder-per-class tree (default: $RETRAINER_DATA)")
    ap.add_argument("--db", default=None, help="database URL (default: a temporary SQLite file)")
    ap.add_argument("--model-dir", default=None, help="an export, to time labelling too")
    ap.add_argument("--size", type=int, default=224, help="decode size (the model's input)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.data_root or not Path(args.data_root).is_dir():
        sys.exit("error: give the image tree with --data-root DIR or RETRAINER_DATA.")
    db = args.db or str(Path(tempfile.mkdtemp()) / "bench.db")
    size = (args.size, args.size)
    out: dict = {"data_root": args.data_root, "db": masked(database_url(db))}

    imported = import_folder(db, args.data_root)
    out["import"] = imported.to_dict()

    def read(records) -> int:
        items = ((r.key, r) for r in records)
        return sum(p is not None for _, _, p, _ in
                   decode_stream(items, size, "bilinear", default_workers(), 64))

    out["read_decode_folder"] = timed(lambda: read(scan_folder(args.data_root).records))
    out["read_decode_db"] = timed(lambda: read(scan_database(db, min_classes=1).records))

    if args.model_dir:
        from retrainer.db.predictions import label_database
        from retrainer.predict import Classifier

        classifier = Classifier.load(args.model_dir)
        folder_records = scan_folder(args.data_root).records
        out["label_folder"] = timed(lambda: sum(1 for _ in classifier.label_records(folder_records)))
        run_id = f"bench-{int(time.time())}"
        out["label_db"] = timed(lambda: label_database(db, classifier, run_id).labelled)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key:20s} {value}")


if __name__ == "__main__":
    main()
