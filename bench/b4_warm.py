"""4. Warm re-train: ``retrainer train`` on 10k images whose bottlenecks are all cached.

The whole command is timed from the outside (TensorFlow import, hashing 10k files, loading the
cache, training the head, exporting graph + SavedModel + TFLite). Needs the cache benchmark 5
filled (run it first, or this fills it).
"""
from __future__ import annotations

import json
import sys

from common import BENCH, emit, parser, retrainer_cmd, run, synthetic_set, work_dir


def main() -> None:
    args = parser(__doc__).parse_args()
    work = work_dir(args)
    images = synthetic_set(work / "synth10000", 10000)
    cache = work / "synth10000-bottlenecks"
    run([sys.executable, str(BENCH / "extract_once.py"), "--image-dir", str(images),
         "--bottleneck-dir", str(cache)])  # no-op when benchmark 5 already filled it
    runs = []
    for _ in range(2):
        wall, text, rss = run([*retrainer_cmd(), "-q", "train", "--image-dir", str(images),
                               "--backbone", "efficientnet_lite0", "--bottleneck-dir",
                               str(cache), "--output-dir", str(work / "b4-model"), "--json"])
        result = json.loads(text)
        runs.append({"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1),
                     "computed": result["bottlenecks_computed"],
                     "cached": result["bottlenecks_cached"],
                     "test_accuracy": result["test_accuracy"],
                     "phases": {k: round(v, 2) for k, v in result["timings"].items()}})
    best = min(runs, key=lambda r: r["wall_s"])
    emit({"benchmark": "warm_retrain", "backbone": "efficientnet_lite0",
          "results": {"wall_s": best["wall_s"], "runs": runs}})


if __name__ == "__main__":
    main()
