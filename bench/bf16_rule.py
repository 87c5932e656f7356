"""bf16 as a default? The accuracy rule on every shared set with a train/val split.

Each set is trained twice with ``retrainer train`` (Lite0, ImageNet weights, default head):
fp32 (TensorFlow; every fp32 runtime shares its bottlenecks) and bf16 on the fastest bf16
runtime (``--runtime`` below). The rule for making bf16 the default: on every set, the trained
head's validation top-1 moves by <= 0.5 point AND the mean cosine between each image's bf16 and
fp32 bottlenecks is >= 0.999. Prints one JSON document; ``rule_holds`` says the verdict.
"""
from __future__ import annotations

import os
import time

import numpy as np

from common import data_root, emit, parser, work_dir

SETS = ("hymenoptera_data", "cats_vs_dogs", "fashion_mnist_png", "mnist_png",
        "skimage_lfw_faces", "skimage_textures")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runtime", default="openvino", help="The bf16 runtime.")
    p.add_argument("--sets", default=",".join(SETS))
    args = p.parse_args()
    root, work = data_root(args), work_dir(args) / "bf16_rule"
    os.environ.setdefault("RETRAINER_CACHE_DIR", str(work / "cache"))

    from retrainer.bottlenecks import BottleneckCache, hash_records
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, SourceConfig,
                                  TrainConfig)
    from retrainer.sources.folder import scan_folder
    from retrainer.training import train

    out, holds = {}, True
    for name in args.sets.split(","):
        extraction = ExtractionConfig(bottleneck_dir=str(work / "bn"))
        row: dict = {}
        results = {}
        for precision, runtime in (("fp32", "tensorflow"), ("bf16", args.runtime)):
            config = TrainConfig(
                source=SourceConfig(image_dir=str(root / name)),
                backbone=BackboneConfig("efficientnet_lite0", precision=precision, runtime=runtime),
                extraction=extraction,
                export=ExportConfig(output_dir=str(work / "out" / f"{name}-{precision}"),
                                    formats=("graph",)))
            t = time.perf_counter()
            results[precision] = train(config)
            row[f"{precision}_top1"] = round(100 * results[precision].validation_accuracy, 2)
            row[f"{precision}_seconds"] = round(time.perf_counter() - t, 1)
        records = scan_folder(root / name).records
        keys, _ = hash_records(records)
        keys = sorted({k for k in keys if k})
        rows = {}
        for precision in ("fp32", "bf16"):
            cache_dir = results[precision].cache_dir
            cache = BottleneckCache(os.path.dirname(cache_dir), os.path.basename(cache_dir), 1280)
            keys = [k for k in keys if k in cache]
            rows[precision] = cache
        a, b = rows["fp32"].load(keys), rows["bf16"].load(keys)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        row.update(images=len(keys), mean_cosine=round(float(cos.mean()), 5),
                   min_cosine=round(float(cos.min()), 5),
                   top1_delta_points=round(row["bf16_top1"] - row["fp32_top1"], 2),
                   bf16_cache_id=os.path.basename(results["bf16"].cache_dir))
        row["rule_holds"] = abs(row["top1_delta_points"]) <= 0.5 and row["mean_cosine"] >= 0.999
        holds = holds and row["rule_holds"]
        out[name] = row
        print(name, row, flush=True, file=__import__("sys").stderr)
    emit({"benchmark": "bf16_rule", "runtime": args.runtime, "rule_holds": holds,
          "results": out})


if __name__ == "__main__":
    main()
