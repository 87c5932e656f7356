"""Head accuracy vs a tuned scikit-learn logistic-regression probe, on every train/val set.

For each data set under the root with ``train/`` and ``val/`` folders, and each backbone:

- **probe**: ``LogisticRegressionCV(Cs=np.logspace(-3, 2, 11), cv=5)`` on StandardScaler'd
  bottlenecks of *all* of ``SET/train``, scored on ``SET/val``;
- **head**: ``retrainer train --image-dir SET/train --testing-percentage 0`` with the default
  settings (all of train/ is used: the head is chosen by cross-validation and refitted on it),
  then ``retrainer evaluate --image-dir SET/val`` on the export;
- **head off** (unless ``--no-off``): the same with ``--head-search off`` (one Adam fit,
  early-stopped on the 10 % validation split it holds out of train/);
- **head acc** (with ``--compare-criteria``): the CV head choosing C by held-out accuracy
  instead of log-loss;
- **head tta** and **probe tta** (with ``--tta flip``): the default head, and the probe, on
  mirror-averaged bottlenecks (``retrainer train --tta flip``; evaluated through its export,
  which averages too).

A composite backbone (``--backbones efficientnet_lite0,efficientnet_lite2,``
``efficientnet_lite0+efficientnet_lite2``) is one more backbone: its probe is fitted on the
concatenated bottlenecks. With several backbones a second table puts each set's probes and
heads side by side, with each composite's head against the best of its parts' heads.

The bottlenecks are cached in ``--cache-dir``: reuse one for every run. ``--time-head N``
instead times head selection + refit on N cached bottlenecks (the rows of ``--time-set``
repeated with a little noise to N, so the features have real structure).

    python bench/quality.py --data-root DATASETS --cache-dir BN [--backbones a,b] [--json-out F]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from retrainer.config import (  # noqa: E402
    BackboneConfig, ExportConfig, ExtractionConfig, HeadConfig, SourceConfig, TrainConfig)

log = logging.getLogger("bench.quality")

PROBE_CS = np.logspace(-3, 2, 11)


def data_root(arg: str | None) -> Path:
    root = arg or os.environ.get("RETRAINER_DATA")
    if not root:
        sys.exit("error: give the data-set root with --data-root DIR or the RETRAINER_DATA "
                 "environment variable.")
    path = Path(root)
    if not path.is_dir():
        sys.exit(f"error: data-set root '{root}' is not a folder.")
    return path


def split_sets(root: Path, only: list[str] | None) -> list[Path]:
    """Sub-folders with train/ and val/ class folders (sets without a split are skipped)."""
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if only and path.name not in only:
            continue
        if (path / "train").is_dir() and (path / "val").is_dir():
            found.append(path)
        else:
            log.info("skipping %s: no train/ + val/ split", path.name)
    return found


def cached_features(folder: Path, cache_dir: str, dim: int, classes: list[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The cached bottlenecks and labels of every image of a class-folder tree."""
    from retrainer.bottlenecks import BottleneckCache, hash_records
    from retrainer.sources.folder import scan_folder

    cache_path = Path(cache_dir)
    cache = BottleneckCache(cache_path.parent, cache_path.name, dim)
    records = scan_folder(folder).records
    keys, _ = hash_records(records)
    index = {c: i for i, c in enumerate(classes)}
    pairs = [(k, r) for k, r in zip(keys, records) if k is not None and k in cache]
    return cache.load([k for k, _ in pairs]), np.array([index[r.label] for _, r in pairs])


def fill_val(folder: Path, backbone: str, args: argparse.Namespace, tta: str = "none") -> None:
    """Cache the bottlenecks of SET/val too, for the probe."""
    from retrainer.bottlenecks.fill import fill_cache

    fill_cache(TrainConfig(source=SourceConfig(image_dir=str(folder)),
                           backbone=BackboneConfig(backbone, tta=tta),
                           extraction=ExtractionConfig(bottleneck_dir=args.cache_dir)))


def probe_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                   seed: int = 0) -> tuple[float, float]:
    """Standardised LogisticRegressionCV (Cs 1e-3..100, 5 folds); (val accuracy, chosen C)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    probe = LogisticRegressionCV(Cs=list(PROBE_CS), max_iter=1000,
                                 cv=StratifiedKFold(5, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and API-transition notices
        probe.fit(scaler.transform(x_tr), y_tr)
    acc = float((probe.predict(scaler.transform(x_te)) == y_te).mean())
    return acc, float(np.atleast_1d(probe.C_)[0])


def head_run(path: Path, backbone: str, args: argparse.Namespace, head: HeadConfig,
             tta: str = "none") -> dict[str, Any]:
    """train on SET/train (testing 0), evaluate the export on SET/val, as a user would."""
    from retrainer.evaluation import evaluate_folder
    from retrainer.training import train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(source=SourceConfig(image_dir=str(path / "train"),
                                                 testing_percentage=0),
                             backbone=BackboneConfig(backbone, tta=tta),
                             extraction=ExtractionConfig(bottleneck_dir=args.cache_dir),
                             head=head, export=ExportConfig(output_dir=out, formats=("graph",)))
        result = train(config)
        report = evaluate_folder(str(path / "val"), out)
    return {"accuracy": report.accuracy, "n_val": report.n,
            "head_seconds": result.timings["head"], "C": (result.cv or {}).get("C"),
            "validation_accuracy": result.validation_accuracy,
            "validation_kind": result.validation_kind, "cache_dir": result.cache_dir,
            "labels": result.labels, "n_train": sum(
                sum(c.values()) for s, c in result.counts.items() if s != "testing")}


def bench_set(path: Path, backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    from retrainer.backbones.factory import resolve_spec

    t = time.perf_counter()
    new = head_run(path, backbone, args, HeadConfig(seed=args.seed))
    row: dict[str, Any] = {"set": path.name, "backbone": backbone,
                           "classes": len(new["labels"]), "train": new["n_train"],
                           "val": new["n_val"], "head": new["accuracy"], "head_C": new["C"],
                           "head_oof": new["validation_accuracy"],
                           "head_seconds": new["head_seconds"]}
    dim = resolve_spec(backbone).feature_dim
    fill_val(path / "val", backbone, args)  # evaluate ran the export, caching nothing
    x_tr, y_tr = cached_features(path / "train", new["cache_dir"], dim, new["labels"])
    x_va, y_va = cached_features(path / "val", new["cache_dir"], dim, new["labels"])
    t_probe = time.perf_counter()
    row["probe"], row["probe_C"] = probe_accuracy(x_tr, y_tr, x_va, y_va, args.seed)
    row["probe_seconds"] = time.perf_counter() - t_probe
    row["head_minus_probe"] = row["head"] - row["probe"]
    if args.compare_criteria:
        acc = head_run(path, backbone, args, HeadConfig(seed=args.seed, cv_score="accuracy"))
        row["head_acc"], row["head_acc_C"] = acc["accuracy"], acc["C"]
    if args.tta != "none":
        tta = head_run(path, backbone, args, HeadConfig(seed=args.seed), tta=args.tta)
        row["head_tta"], row["head_tta_C"] = tta["accuracy"], tta["C"]
        row["head_tta_minus_head"] = row["head_tta"] - row["head"]
        fill_val(path / "val", backbone, args, args.tta)
        xt_tr, yt_tr = cached_features(path / "train", tta["cache_dir"], dim, tta["labels"])
        xt_va, yt_va = cached_features(path / "val", tta["cache_dir"], dim, tta["labels"])
        row["probe_tta"], _ = probe_accuracy(xt_tr, yt_tr, xt_va, yt_va, args.seed)
    if not args.no_off:
        off = head_run(path, backbone, args, HeadConfig(seed=args.seed, search="off"))
        row["head_off"], row["head_off_seconds"] = off["accuracy"], off["head_seconds"]
    row["seconds"] = time.perf_counter() - t
    return row


COLUMNS = [("set", "set"), ("backbone", "backbone"), ("classes", "cls"), ("train", "train"),
           ("val", "val"), ("probe", "probe"), ("head", "head"),
           ("head_minus_probe", "head-probe"), ("head_C", "head C"), ("head_oof", "head OOF"),
           ("head_acc", "head acc-CV"), ("head_off", "head off"), ("probe_tta", "probe tta"),
           ("head_tta", "head tta"), ("head_tta_minus_head", "tta-head"),
           ("head_seconds", "head s"),
           ("head_off_seconds", "off s")]


def table(rows: list[dict[str, Any]]) -> str:
    cols = [(k, n) for k, n in COLUMNS if any(r.get(k) is not None for r in rows)]

    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key in ("probe", "head", "head_oof", "head_acc", "head_off", "probe_tta", "head_tta"):
            return f"{100 * value:.1f}"
        if key in ("head_minus_probe", "head_tta_minus_head"):
            return f"{100 * value:+.1f}"
        if key in ("head_seconds", "head_off_seconds"):
            return f"{value:.2f}"
        if key == "head_C":
            return f"{value:g}"
        return str(value)

    lines = ["| " + " | ".join(n for _, n in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def by_set_table(rows: list[dict[str, Any]]) -> str:
    """One row per set: probe and head of every backbone side by side, and for each composite
    (``a+b``) its probe's and head's gains over the best of its parts' probes and heads."""
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    found = {(r["set"], r["backbone"]): r for r in rows}
    composites = [b for b in backbones if "+" in b
                  and all(p in backbones for p in b.split("+"))]
    head = ["set", *(f"{b} {k}" for b in backbones for k in ("probe", "head")),
            *(f"{c} {k} - best part's" for c in composites for k in ("probe", "head"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    wins = {c: [0, 0, 0] for c in composites}  # better, equal, worse
    for name in dict.fromkeys(r["set"] for r in rows):
        cells = [name]
        for b in backbones:
            r = found.get((name, b), {})
            cells += [f"{100 * r[k]:.1f}" if r.get(k) is not None else "-"
                      for k in ("probe", "head")]
        for c in composites:
            for k in ("probe", "head"):
                try:
                    gain = found[(name, c)][k] - max(found[(name, p)][k] for p in c.split("+"))
                except KeyError:
                    cells.append("-")
                    continue
                if k == "head":
                    wins[c][0 if gain > 1e-9 else 1 if gain > -1e-9 else 2] += 1
                cells.append(f"{100 * gain:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    for c, (better, equal, worse) in wins.items():
        lines.append(f"\n{c}: head better than its best part's on {better} sets, equal on "
                     f"{equal}, worse on {worse}")
    return "\n".join(lines)


def time_head(path: Path, backbone: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of head selection + refit on ``n`` bottlenecks made from a real set's."""
    from retrainer.backbones.factory import resolve_spec
    from retrainer.head import fit_head_cv, train_head
    from retrainer.training import train

    with tempfile.TemporaryDirectory() as out:  # fills the cache if needed
        result = train(TrainConfig(
            source=SourceConfig(image_dir=str(path / "train"), testing_percentage=0),
            backbone=BackboneConfig(backbone),
            extraction=ExtractionConfig(bottleneck_dir=args.cache_dir),
            export=ExportConfig(output_dir=out, formats=("graph",))))
    x, y = cached_features(path / "train", result.cache_dir,
                           resolve_spec(backbone).feature_dim, result.labels)
    rng = np.random.default_rng(args.seed)
    reps = -(-n // len(x))
    scale = 0.05 * x.std(axis=0)
    x = np.concatenate([x + (rng.normal(0, 1, x.shape) * scale if i else 0)
                        for i in range(reps)])[:n].astype(np.float32)
    y = np.tile(y, reps)[:n]
    t = time.perf_counter()
    head = fit_head_cv(x, y, len(result.labels), HeadConfig(seed=args.seed))
    seconds = time.perf_counter() - t
    # The same rows through --head-search off (Adam, early-stopped on a 10 % validation slice).
    val = rng.permutation(n)[: n // 10]
    fit = np.setdiff1d(np.arange(n), val)
    t = time.perf_counter()
    train_head(x[fit], y[fit], len(result.labels), HeadConfig(seed=args.seed, search="off"),
               x[val], y[val])
    adam_seconds = time.perf_counter() - t
    return {"rows": n, "dim": x.shape[1], "classes": len(result.labels), "seconds": seconds,
            "adam_seconds": adam_seconds,
            "cv": {k: v for k, v in head.cv.items() if k != "scores"},
            "iterations": sum(s["iterations"] for s in head.cv["scores"]),
            "load_average_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", help="Folder of data sets (default: $RETRAINER_DATA).")
    p.add_argument("--sets", help="Comma-separated set names (default: every train/val set).")
    p.add_argument("--backbones", default="efficientnet_lite0",
                   help="Comma-separated registered backbones (default: efficientnet_lite0).")
    p.add_argument("--cache-dir", default=None, help="Bottleneck cache (default: the user cache).")
    p.add_argument("--no-off", action="store_true", help="Skip the --head-search off runs.")
    p.add_argument("--compare-criteria", action="store_true",
                   help="Add a run choosing C by held-out accuracy instead of log-loss.")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="Add the default head and the probe on bottlenecks with this test-time "
                        "augmentation (retrainer train --tta) as extra columns.")
    p.add_argument("--time-head", type=int, default=0, metavar="N",
                   help="Only time head selection + refit on N cached bottlenecks.")
    p.add_argument("--time-set", default="fashion_mnist_png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="Also write the rows as JSON to this file.")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    for noisy in ("retrainer", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = data_root(args.data_root)
    backbones = [b for b in args.backbones.split(",") if b]
    if args.time_head:
        out = [time_head(root / args.time_set, b, args.time_head, args) for b in backbones]
        print(json.dumps(out, indent=2, default=float))
        return 0
    only = [s for s in (args.sets or "").split(",") if s] or None
    rows = []
    for backbone in backbones:
        for path in split_sets(root, only):
            log.info("== %s / %s", path.name, backbone)
            rows.append(bench_set(path, backbone, args))
            log.info("%s", json.dumps(rows[-1]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    if len(backbones) > 1:
        print()
        print(by_set_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
