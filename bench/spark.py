"""Spark engine benchmark: local engine vs Spark local[1] vs local[2] on one image tree.

Each engine runs in a fresh process (so a JVM, Python workers and TensorFlow start from
nothing): first it extracts a handful of images (k) cold, then the whole set (N) into a second,
empty cache with everything warm. From the pair:

  throughput  images/s = N / T_all
  start-up    seconds  = T_session + T_few - k / throughput   (JVM, workers, model load)

Only extraction is timed (the driver's backbone build and content hashing are the same for all
engines). Then a head is trained locally on each engine's cache with the same seed, and the
test accuracies and the largest feature difference from the local engine are reported.

  python bench/spark.py --data-root DATASETS --dataset flowers
  python bench/spark.py --generate 2000            # generated images, no data set needed
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = [("local", None), ("spark", "local[1]"), ("spark", "local[2]")]


def image_dir_from_args(args: argparse.Namespace, scratch: Path) -> Path:
    if args.generate:
        return generate(scratch / "generated", args.generate)
    root = args.data_root or os.environ.get("RETRAINER_DATA")
    if not root:
        sys.exit("error: give --data-root DIR (or set RETRAINER_DATA), or --generate N.")
    path = Path(root) / args.dataset
    if not path.is_dir():
        sys.exit(f"error: no data set folder '{path}'.")
    return path


def generate(root: Path, n: int, classes: int = 4) -> Path:
    """n noisy 96x96 JPEGs in `classes` colour classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(30, 225, (classes, 3))
    for i in range(n):
        c = i % classes
        arr = np.clip(colours[c] + rng.normal(0, 40, (96, 96, 3)), 0, 255).astype(np.uint8)
        path = root / f"class{c}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90)
    return root


def measure(spec: dict) -> dict:
    """One engine, in its own process: a cold run on a few images, then a warm one on all."""
    from contextlib import nullcontext

    from retrainer.backbones.factory import create_backbone, resolve_spec
    from retrainer.bottlenecks import BottleneckCache, get_engine, hash_records
    from retrainer.bottlenecks.extractor import make_forward
    from retrainer.config import BackboneConfig, SourceConfig, TrainConfig
    from retrainer.dataset import load_dataset

    config = TrainConfig(source=SourceConfig(image_dir=spec["image_dir"]),
                         backbone=BackboneConfig(spec["architecture"]))
    records = sorted(load_dataset(config).records, key=lambda r: r.key)
    bspec = resolve_spec(config.backbone.name)
    backbone = create_backbone(bspec)
    keys, _ = hash_records(records)
    items = list({k: r for k, r in zip(keys, records) if k}.items())
    step = max(1, len(items) // spec["few"])
    few = items[::step][: spec["few"]]  # spread over the classes
    forward = make_forward(backbone)

    t = time.perf_counter()
    if spec["engine"] == "spark":
        from retrainer.spark.session import spark_session

        context = spark_session(spec["master"], "retrainer bench")
    else:
        context = nullcontext(None)
    with context as session:
        t_session = time.perf_counter() - t
        engine = get_engine(spec["engine"], spark=session)
        times = {}
        for name, todo in (("few", few), ("all", items)):
            cache = BottleneckCache(f"{spec['cache']}-{name}", backbone.cache_id, bspec.feature_dim)
            t = time.perf_counter()
            skipped = engine.extract(todo, forward, bspec.input_size, bspec.resize, cache,
                                     batch_size=spec["batch_size"])
            times[name] = time.perf_counter() - t
    return {"session": t_session, "few_seconds": times["few"], "few": len(few),
            "seconds": times["all"], "images": len(items), "skipped": len(skipped),
            "cache_dir": str(cache.dir), "cache_root": f"{spec['cache']}-all"}


def run_measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"error: measurement {spec['engine']} {spec['master']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def accuracy(image_dir: Path, architecture: str, cache_root: Path, out: Path) -> tuple[float, int]:
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, HeadConfig,
                                  SourceConfig, TrainConfig)
    from retrainer.training import train

    result = train(TrainConfig(source=SourceConfig(image_dir=str(image_dir)),
                               backbone=BackboneConfig(architecture),
                               extraction=ExtractionConfig(bottleneck_dir=str(cache_root)),
                               head=HeadConfig(epochs=20, seed=0),
                               export=ExportConfig(output_dir=str(out), formats=("graph",))))
    assert result.bottlenecks_computed == 0, "the engine's cache was incomplete"
    return result.test_accuracy or 0.0, result.test.n if result.test else 0


def max_diff(a_dir: str, b_dir: str) -> float:
    import numpy as np

    def rows(d: str) -> dict:
        out = {}
        for shard in Path(d).glob("shard-*.npz"):
            with np.load(shard) as npz:
                out.update({k.tobytes(): r for k, r in zip(npz["keys"], npz["bottlenecks"])})
        return out

    a, b = rows(a_dir), rows(b_dir)
    assert a.keys() == b.keys(), "the engines cached different images"
    return float(max(np.abs(a[k] - b[k]).max() for k in a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", help="Folder holding the data sets (or RETRAINER_DATA).")
    parser.add_argument("--dataset", default="flowers", help="Image tree under --data-root.")
    parser.add_argument("--generate", type=int, default=0, help="Use N generated images instead.")
    parser.add_argument("--architecture", default="efficientnet_lite0")
    parser.add_argument("--few", type=int, default=16, help="Images in the start-up run.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from retrainer.cli.quiet import filter_native_logs

    filter_native_logs()
    scratch = Path(tempfile.mkdtemp(prefix="retrainer-bench-spark-"))
    image_dir = image_dir_from_args(args, scratch)
    rows = []
    for engine, master in ENGINES:
        name = engine if master is None else f"spark {master}"
        base = {"engine": engine, "master": master, "image_dir": str(image_dir),
                "architecture": args.architecture, "batch_size": args.batch_size}
        full = run_measure({**base, "few": args.few, "cache": str(scratch / name)})
        rate = full["images"] / full["seconds"]
        startup = full["session"] + full["few_seconds"] - full["few"] / rate
        cache_root = Path(full["cache_root"])
        acc, n_test = accuracy(image_dir, args.architecture, cache_root, scratch / f"{name}-model")
        rows.append({"engine": name, "images": full["images"], "seconds": full["seconds"],
                     "images_per_s": rate, "session_s": full["session"],
                     "few_s": full["few_seconds"], "startup_s": startup,
                     "test_accuracy": acc, "test_n": n_test, "cache_dir": full["cache_dir"]})
        print(f"... {name}: {full['images']} images in {full['seconds']:.1f} s", file=sys.stderr)
    for row in rows:
        row["max_feature_diff_vs_local"] = max_diff(rows[0]["cache_dir"], row["cache_dir"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.architecture} on {image_dir.name} ({rows[0]['images']} images, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    print(f"| engine | images/s (warm) | fixed start-up s | session s | first {args.few} "
          "images s (cold) | test accuracy | max feature diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['images_per_s']:.1f} | {r['startup_s']:.1f} | "
              f"{r['session_s']:.1f} | {r['few_s']:.1f} | "
              f"{r['test_accuracy']:.4f} (N={r['test_n']}) | "
              f"{r['max_feature_diff_vs_local']:.1e} |")


if __name__ == "__main__":
    main()
