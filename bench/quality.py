"""Head accuracy vs a scikit-learn LogisticRegression probe on every labelled set under a root.

For each data set (a folder of class folders, or of train/ val/ [test/] folders) this trains
retrainer's head through the normal ``train()`` pipeline, then fits a standardised
LogisticRegression whose C is tuned by 5-fold cross-validation on the very same training
bottlenecks, and scores both on the very same test images. Optional rows add augmentation
(``--augment-k``) and fine-tuning (``--fine-tune``) runs.

Split: a train/ val/ tree keeps val/ as the test set and takes ``--validation-percentage`` of
train/ for validation; a plain class tree is hash-split (``--validation-percentage``,
``--testing-percentage``). Big sets are subsampled to ``--max-per-class`` images per class
(a stable hash order, so every run picks the same images) to stay within minutes on a laptop.
On a test set of 50-150 images one image is 1-2 points, so sets of at most ``--repeat-below``
images are scored on ``--repeats`` different splits (re-drawn validation, and for plain class
trees re-drawn test sets too) and the table shows the means. The fine-tuned run starts from
the augmented head when the set is also augmented (head+aug+ft).

    python bench/quality.py --data-root DATASETS [--sets flowers,mnist_png] [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from retrainer.config import HeadConfig, TrainConfig  # noqa: E402
from retrainer.errors import DatasetError  # noqa: E402
from retrainer.sources.base import TESTING, TRAINING, VALIDATION, Dataset  # noqa: E402

log = logging.getLogger("bench.quality")


def data_root(arg: str | None) -> Path:
    root = arg or os.environ.get("RETRAINER_DATA")
    if not root:
        sys.exit("error: give the data-set root with --data-root DIR or the RETRAINER_DATA "
                 "environment variable.")
    path = Path(root)
    if not path.is_dir():
        sys.exit(f"error: data-set root '{root}' is not a folder.")
    return path


def labelled_sets(root: Path, only: list[str] | None) -> list[Path]:
    """Sub-folders that scan as labelled sets (at least two class folders)."""
    from retrainer.sources.folder import scan_folder

    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if only and path.name not in only:
            continue
        try:
            scan_folder(path)
        except DatasetError:
            log.info("skipping %s: not a labelled set", path.name)
            continue
        found.append(path)
    return found


def _rank(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def load_set(path: Path, validation: float, testing: float, max_per_class: int,
             salt: int = 0) -> Dataset:
    """The set with every record split (see the module doc) and at most ``max_per_class``.

    ``salt`` 0 is retrainer's own split; other salts re-draw the hash split (for repeats).
    """
    from retrainer.sources.folder import scan_folder
    from retrainer.split import assign_splits, split_of

    def salted(key: str) -> str:
        return f"split{salt}/{key}" if salt else key

    ds = scan_folder(path)
    records = ds.records
    if any(r.split for r in records):
        has_test = any(r.split == TESTING for r in records)
        out = []
        for r in records:
            if r.split == TRAINING:
                r = replace(r, split=VALIDATION if split_of(salted(r.key), validation, 0) == VALIDATION
                            else TRAINING)
            elif r.split == VALIDATION and not has_test:
                r = replace(r, split=TESTING)
            out.append(r)
        ds = replace(ds, records=out)
    elif salt:
        ds = replace(ds, records=[replace(r, split=split_of(salted(r.key), validation, testing))
                                  for r in records])
    else:
        ds = assign_splits(ds, validation, testing)
    kept = []
    for label in ds.classes:
        mine = sorted((r for r in ds.records if r.label == label), key=lambda r: _rank(r.key))
        kept += mine[:max_per_class]
    return replace(ds, records=sorted(kept, key=lambda r: r.key))


@dataclass
class Features:
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]


def split_features(dataset: Dataset, cache_dir: str, dim: int) -> Features:
    """The cached bottlenecks of ``dataset`` per split, as train() used them."""
    from retrainer.bottlenecks import BottleneckCache, hash_records

    cache_path = Path(cache_dir)
    cache = BottleneckCache(cache_path.parent, cache_path.name, dim)
    keys, _ = hash_records(dataset.records)
    index = {c: i for i, c in enumerate(dataset.classes)}
    xs, ys = {}, {}
    for split in (TRAINING, VALIDATION, TESTING):
        pairs = [(k, r) for k, r in zip(keys, dataset.records)
                 if k is not None and r.split == split and k in cache]
        xs[split] = cache.load([k for k, _ in pairs]) if pairs else np.zeros((0, dim), np.float32)
        ys[split] = np.array([index[r.label] for _, r in pairs], dtype=int)
    return Features(xs, ys)


def probe_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                   seed: int = 0) -> tuple[float, float]:
    """Standardised LogisticRegression with C chosen by 5-fold CV; (test accuracy, best C)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    import warnings

    folds = max(2, min(5, int(np.bincount(y_tr).min())))
    scaler = StandardScaler().fit(x_tr)
    # LogisticRegressionCV warm-starts along the C path: far cheaper than a grid search.
    probe = LogisticRegressionCV(Cs=list(np.logspace(-4, 1, 6)), max_iter=500, tol=1e-3,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and API-transition notices
        probe.fit(scaler.transform(x_tr), y_tr)
    acc = float((probe.predict(scaler.transform(x_te)) == y_te).mean())
    return acc, float(np.atleast_1d(probe.C_)[0])


def run_train(dataset: Dataset, args: argparse.Namespace, **extra: Any):
    from retrainer.training import train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(image_dir=dataset.root, output_dir=out,
                             architecture=args.architecture, bottleneck_dir=args.cache_dir,
                             export_formats=(), head=HeadConfig(seed=args.seed), **extra)
        return train(config, dataset=dataset)


def bench_split(path: Path, args: argparse.Namespace, salt: int) -> dict[str, Any]:
    """Head, probe (and augmented / fine-tuned heads) on one split of one set."""
    from retrainer.backbones.factory import resolve_spec

    dataset = load_set(path, args.validation_percentage, args.testing_percentage,
                       args.max_per_class, salt)
    counts = {s: sum(1 for r in dataset.records if r.split == s)
              for s in (TRAINING, VALIDATION, TESTING)}
    result = run_train(dataset, args)
    row: dict[str, Any] = {"classes": len(dataset.classes), **counts,
                           "head": result.test_accuracy, "head_seconds": result.timings["head"]}
    feats = split_features(dataset, result.cache_dir, resolve_spec(args.architecture).feature_dim)
    t_probe = time.perf_counter()
    row["probe"], row["probe_C"] = probe_accuracy(feats.x[TRAINING], feats.y[TRAINING],
                                                  feats.x[TESTING], feats.y[TESTING], args.seed)
    row["probe_seconds"] = time.perf_counter() - t_probe
    augment: dict[str, Any] = {}
    if args.augment_k and (not args.augment_sets or path.name in args.augment_sets):
        augment = dict(augment_variants=args.augment_k, flip_left_right=True,
                       random_crop=args.random_crop, random_scale=args.random_scale,
                       random_brightness=args.random_brightness)
        row["head_augmented"] = run_train(dataset, args, **augment).test_accuracy
    if args.fine_tune and (not args.fine_tune_sets or path.name in args.fine_tune_sets):
        # Fine-tuning starts from the head as a user would train it: with the same augmentation.
        ft = run_train(dataset, args, fine_tune=True, fine_tune_epochs=args.fine_tune_epochs,
                       fine_tune_learning_rate=args.fine_tune_learning_rate,
                       **{"flip_left_right": True, **augment})
        row["head_fine_tuned"] = ft.test_accuracy
        row["fine_tune_seconds"] = ft.timings.get("fine_tune")
    return row


def bench_set(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One table row: the means over ``repeats`` splits (one split for sets above the limit)."""
    t = time.perf_counter()
    n_images = sum(1 for p in path.rglob("*") if p.is_file())
    repeats = args.repeats if n_images <= args.repeat_below else 1
    splits = []
    for salt in range(repeats):
        splits.append(bench_split(path, args, salt))
        log.info("%s split %d: %s", path.name, salt, json.dumps(splits[-1]))
    row: dict[str, Any] = {"set": path.name, "splits": repeats, **{
        k: splits[0][k] for k in ("classes", TRAINING, VALIDATION, TESTING)}}
    for key in ("probe", "head", "head_augmented", "head_fine_tuned", "head_seconds"):
        values = [s[key] for s in splits if s.get(key) is not None]
        if values:
            row[key] = float(np.mean(values))
    row["head_minus_probe"] = row["head"] - row["probe"]
    if "fine_tune_seconds" in splits[0]:
        row["fine_tune_seconds"] = splits[0]["fine_tune_seconds"]
    row["per_split"] = splits
    row["seconds"] = time.perf_counter() - t
    return row


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("set", "set"), ("splits", "splits"), ("classes", "cls"), (TRAINING, "train"), (VALIDATION, "val"),
            (TESTING, "test"), ("probe", "probe"), ("head", "head"),
            ("head_minus_probe", "head-probe"), ("head_augmented", "head+aug"),
            ("head_fine_tuned", "head+aug+ft" if any("head_augmented" in r for r in rows)
             else "head+ft"), ("head_seconds", "head s")]
    cols = [(k, n) for k, n in cols if any(k in r for r in rows)]

    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key in ("probe", "head", "head_augmented", "head_fine_tuned"):
            return f"{100 * value:.1f}"
        if key == "head_minus_probe":
            return f"{100 * value:+.1f}"
        if key == "head_seconds":
            return f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(n for _, n in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", help="Folder of data sets (default: $RETRAINER_DATA).")
    p.add_argument("--sets", help="Comma-separated set names (default: every labelled set).")
    p.add_argument("--architecture", default="efficientnet_lite0")
    p.add_argument("--cache-dir", default=None, help="Bottleneck cache (default: the user cache).")
    p.add_argument("--max-per-class", type=int, default=300)
    p.add_argument("--validation-percentage", type=float, default=15.0)
    p.add_argument("--testing-percentage", type=float, default=25.0)
    p.add_argument("--augment-k", type=int, default=0, help="Augmented variants per image (0: off).")
    p.add_argument("--augment-sets", default="", help="Only these sets get the augmented run.")
    p.add_argument("--fine-tune", action="store_true", help="Add a fine-tuned run.")
    p.add_argument("--fine-tune-sets", default="", help="Only these sets get the fine-tuned run.")
    p.add_argument("--repeats", type=int, default=5,
                   help="Average over this many different splits (small sets only).")
    p.add_argument("--repeat-below", type=int, default=1000,
                   help="Sets with more images than this use one split.")
    p.add_argument("--random-crop", type=float, default=30.0)
    p.add_argument("--random-scale", type=float, default=30.0)
    p.add_argument("--random-brightness", type=float, default=20.0)
    p.add_argument("--fine-tune-epochs", type=int, default=5)
    p.add_argument("--fine-tune-learning-rate", type=float,
                   default=TrainConfig().fine_tune_learning_rate)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    args.augment_sets = [s for s in args.augment_sets.split(",") if s]
    args.fine_tune_sets = [s for s in args.fine_tune_sets.split(",") if s]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    for noisy in ("retrainer", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = data_root(args.data_root)
    only = [s for s in (args.sets or "").split(",") if s] or None
    rows = []
    for path in labelled_sets(root, only):
        log.info("== %s", path.name)
        rows.append(bench_set(path, args))
        log.info("%s", json.dumps(rows[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
