"""1. Extraction throughput of ``train`` vs the fastest raw forward pass, in the same process.

The raw pass runs the backbone's frozen graph on pre-decoded random tensors at batch 16/32/64
and keeps the best; ``train``'s path hashes, reads, decodes and resizes 500 real JPEGs on the
thread pool while the same graph runs on full batches, and writes the bottleneck cache.
"""
from __future__ import annotations

import shutil
import time

from common import WEIGHTS, backbones, data_root, emit, jpeg_set_500, parser, raw_forward_rate, work_dir


def main() -> None:
    args = parser(__doc__).parse_args()
    work = work_dir(args)
    images = jpeg_set_500(data_root(args), work / "jpeg500")

    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks import BottleneckCache, get_engine, hash_records
    from retrainer.bottlenecks.extractor import make_forward
    from retrainer.config import TrainConfig
    from retrainer.sources.folder import scan_folder

    defaults = TrainConfig()
    records = scan_folder(images).records
    out = {}
    for name in backbones(args):
        backbone = create_backbone(name, WEIGHTS[name])
        spec = backbone.spec
        forward = make_forward(backbone, work / "graphs")
        raw, raw_batch = raw_forward_rate(forward, spec.input_size)
        cache_root = work / "b1-cache"
        shutil.rmtree(cache_root, ignore_errors=True)
        cache = BottleneckCache(cache_root, backbone.cache_id, spec.feature_dim)
        engine = get_engine(defaults.engine, workers=defaults.workers)
        t = time.perf_counter()
        keys, _ = hash_records(records, defaults.workers)
        items = list(dict(zip(keys, records)).items())
        failures = engine.extract(items, forward, spec.input_size, spec.resize, cache,
                                  batch_size=defaults.extract_batch_size)
        seconds = time.perf_counter() - t
        done = len(BottleneckCache(cache_root, backbone.cache_id, spec.feature_dim))
        rate = done / seconds
        out[name] = {"raw_img_s": round(raw, 2), "raw_batch": raw_batch,
                     "train_img_s": round(rate, 2), "images": done, "failed": len(failures),
                     "extract_batch": defaults.extract_batch_size,
                     "ratio": round(rate / raw, 3)}
        shutil.rmtree(cache_root, ignore_errors=True)
    emit({"benchmark": "extraction", "results": out})


if __name__ == "__main__":
    main()
