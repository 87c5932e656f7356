"""5. Peak RSS of extraction on 1k vs 10k images (efficientnet_lite0, generated JPEGs).

Each size runs in a fresh process from an empty cache. Extraction streams: a bounded window of
decoded images, one batch of features and at most one unflushed shard are in memory at a time,
so the peak should not grow with the number of images. The 10k cache is kept for benchmark 4.
"""
from __future__ import annotations

import json
import shutil
import sys

from common import BENCH, emit, parser, run, synthetic_set, work_dir


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    work = work_dir(args)
    out = {}
    for n in (1000, 10000):
        images = synthetic_set(work / f"synth{n}", n)
        cache = work / f"synth{n}-bottlenecks"
        shutil.rmtree(cache, ignore_errors=True)
        wall, text, rss = run([sys.executable, str(BENCH / "extract_once.py"), "--image-dir",
                               str(images), "--bottleneck-dir", str(cache)])
        out[str(n)] = dict(json.loads(text), child_peak_rss_mb=round(rss, 1))
    out["ratio"] = round(out["10000"]["child_peak_rss_mb"] / out["1000"]["child_peak_rss_mb"], 3)
    emit({"benchmark": "memory", "backbone": "efficientnet_lite0", "results": out})


if __name__ == "__main__":
    main()
