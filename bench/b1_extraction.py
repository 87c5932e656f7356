"""1. Extraction throughput of ``train`` vs the fastest raw forward pass, in the same process.

Both run on the runtime ``train`` picks by default (``--runtime auto``; ``--runtime`` here sets
another). The raw pass runs the backbone on pre-decoded random tensors at each of
``--raw-batches`` (2 to 64: on 2 cores the small ones are the fastest) and keeps the best;
``train``'s path hashes, reads, decodes and resizes real JPEGs (500 for Lite0, 160 for
Inception-v3) on the runner's lanes (each decodes its share and runs it two images at a time),
and writes the bottleneck cache. Raw and train rounds alternate; the best of each is kept, since
other work on the machine skews single measurements. Each round also records the CPU-ms per
image (all threads) and the share of the cores kept busy: where the train path's time goes.
"""
from __future__ import annotations

import shutil

from common import (
    WEIGHTS, Clock, backbones, data_root, emit, jpeg_set_500, parser, raw_forward_rate, work_dir,
)


#: Images per timed round: enough for a steady state (Inception-v3 is ~8x slower per image).
ROUND_IMAGES = {"efficientnet_lite0": 500, "inception_v3": 160}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=2,
                   help="Alternate raw and train rounds this many times; keep the best of each.")
    p.add_argument("--runtime", default="auto", help="The runtime both paths run on.")
    p.add_argument("--raw-batches", default="2,4,8,16,32,64",
                   help="Comma-separated batch sizes the raw pass is timed at (best counts).")
    p.add_argument("--raw-seconds", type=float, default=4.0,
                   help="Seconds each raw-pass candidate is timed.")
    args = p.parse_args()
    raw_batches = tuple(int(b) for b in args.raw_batches.split(",") if b)
    work = work_dir(args)
    images = jpeg_set_500(data_root(args), work / "jpeg500")

    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks import BottleneckCache, get_engine, hash_records
    from retrainer.bottlenecks.extractor import make_forward
    from retrainer.config import ExtractionConfig
    from retrainer.sources.folder import scan_folder

    defaults = ExtractionConfig()
    all_records = scan_folder(images).records
    out = {}
    for name in backbones(args):
        backbone = create_backbone(name, WEIGHTS[name])
        spec = backbone.spec
        forward = make_forward(backbone, work / "graphs", runtime=args.runtime)
        records = all_records[:: max(1, len(all_records) // ROUND_IMAGES.get(name, 500))]
        raw_rates, raw_batch, rates = [], 0, []
        by_sessions: dict[int, float] = {}
        for _ in range(args.rounds):
            rate, bs = raw_forward_rate(forward, spec.input_size, batches=raw_batches,
                                        seconds=args.raw_seconds, by_sessions=by_sessions)
            raw_rates.append(rate)
            raw_batch = bs if rate >= max(raw_rates) else raw_batch
            cache_root = work / "b1-cache"
            shutil.rmtree(cache_root, ignore_errors=True)
            cache = BottleneckCache(cache_root, backbone.cache_id, spec.feature_dim)
            engine = get_engine(defaults.engine, workers=defaults.workers)
            with Clock() as clock:
                keys, _ = hash_records(records, defaults.workers)
                items = list(dict(zip(keys, records)).items())
                engine.extract(items, forward, spec.input_size, spec.resize, cache,
                               batch_size=defaults.batch_size)
            done = len(BottleneckCache(cache_root, backbone.cache_id, spec.feature_dim))
            rates.append(clock.rate(done))
            shutil.rmtree(cache_root, ignore_errors=True)
        raw, rate = max(raw_rates), max(rates)
        out[name] = {"runtime": forward.runtime, "raw_img_s": round(raw.per_s, 2), "raw_batch": raw_batch,
                     "train_img_s": round(rate.per_s, 2), "images": done,
                     "extract_batch": defaults.batch_size,
                     "raw_rounds": [r.to_dict() for r in raw_rates],
                     "train_rounds": [r.to_dict() for r in rates],
                     "raw_best": raw.to_dict(), "train_best": rate.to_dict(),
                     "ratio": round(rate.per_s / raw.per_s, 3),
                     "raw_by_sessions": {n: round(r, 2) for n, r in by_sessions.items()}}
    emit({"benchmark": "extraction", "results": out})


if __name__ == "__main__":
    main()
