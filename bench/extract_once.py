"""Extract the bottlenecks of one image folder into a cache, in this process; print its peak RSS.

Used by the memory benchmark (one fresh process per set size) and to fill the cache that the
warm re-train benchmark then uses.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-dir", required=True)
    p.add_argument("--bottleneck-dir", required=True)
    p.add_argument("--architecture", default="efficientnet_lite0")
    p.add_argument("--weights", default=None)
    args = p.parse_args()

    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks import BottleneckCache, get_engine, hash_records
    from retrainer.bottlenecks.extractor import make_forward
    from retrainer.config import ExtractionConfig
    from retrainer.sources.folder import scan_folder

    t = time.perf_counter()
    records = scan_folder(args.image_dir).records
    backbone = create_backbone(args.architecture, args.weights)
    spec = backbone.spec
    cache = BottleneckCache(args.bottleneck_dir, backbone.cache_id, spec.feature_dim)
    keys, _ = hash_records(records)
    todo = dict(zip(keys, records))
    missing = set(cache.missing(todo))
    forward = make_forward(backbone, args.bottleneck_dir)
    t_extract = time.perf_counter()
    get_engine("local").extract([(k, r) for k, r in todo.items() if k in missing], forward,
                                spec.input_size, spec.resize, cache,
                                batch_size=ExtractionConfig().batch_size)
    done = time.perf_counter()
    json.dump({"images": len(records), "computed": len(missing),
               "extract_img_s": round(len(missing) / max(done - t_extract, 1e-9), 2),
               "wall_s": round(done - t, 2),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
              sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
