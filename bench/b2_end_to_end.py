"""2. End to end on 500 JPEGs from an empty cache: ``retrainer train`` vs a retrain.py-style run.

Both are whole processes timed from the outside (TensorFlow import included), on the same
images, the same backbone weights and the same held-out test images, each with an empty
bottleneck cache. ``retrainer train`` runs with its defaults; the baseline
(``retrain_baseline.py``) with retrain.py's defaults (4000 steps).

Both start with the backbone's frozen graph ready, as retrain.py is handed its downloaded
``classify_image_graph_def.pb`` and retrainer keeps a backbone's graphs in its cache dir (apart
from any bottleneck dir) after the first run: the frozen graph, the optimized graph its
extraction runs, the backbone's TFLite conversion its exports append a head to, the other
installed runtimes' conversions and the ``--runtime auto`` choice measured on them (kept per
machine). The time retrainer takes to make them once is reported on its own (``prepare_s``,
as the first run on a machine pays it), and the baseline
reads the same frozen graph file. Inception-v3's ImageNet weights need a download, so a fixed
set of random weights saved to a file stands in for them, as a local weights file does for an
offline user.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import (
    BENCH, WEIGHTS, backbones, data_root, emit, jpeg_set_500, parser, retrainer_cmd, run,
    work_dir,
)


def weights_file(name: str, work: Path) -> str | None:
    """``--weights`` for ``name``: its own weights, or a random set saved once (Inception-v3)."""
    if WEIGHTS[name] != "random":
        return WEIGHTS[name]
    path = work / "weights" / f"{name}-random-notop.weights.h5"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys, keras; keras.utils.set_random_seed(0); "
                "keras.applications.InceptionV3(include_top=False, weights=None, "
                "input_shape=(299, 299, 3)).save_weights(sys.argv[1])")
        run([sys.executable, "-c", code, str(path)])
    return str(path)


def prepare_graph(name: str, weights: str | None, cache_dir: Path) -> tuple[str, float]:
    """Build, freeze, optimize and convert the backbone into ``cache_dir`` and choose its
    runtime, as ``retrainer train`` does on its first run on a machine; (frozen graph file,
    seconds). The baseline reads the frozen graph (retrain.py reads a .pb too)."""
    code = ("import sys; from retrainer.backbones.factory import create_backbone; "
            "from retrainer.bottlenecks.extractor import "
            "backbone_tflite, forward_graph, graph_path, graphs_dir; "
            "from retrainer.bottlenecks.runtime_choice import choose; "
            "w = None if sys.argv[2] == '-' else sys.argv[2]; "
            "b = create_backbone(sys.argv[1], w, lazy=True); "
            "forward_graph(b, graphs_dir()); backbone_tflite(b, graphs_dir()); "
            "choose(b, graphs_dir()); print(graph_path(graphs_dir(), b))")
    shutil.rmtree(cache_dir, ignore_errors=True)
    wall, out, _ = run([sys.executable, "-c", code, name, weights or "-"],
                       env={"RETRAINER_CACHE_DIR": str(cache_dir)})
    return out.strip().splitlines()[-1], wall


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reuse-baseline", action="store_true",
                   help="Reuse a baseline result saved by an earlier run (it takes minutes).")
    args = p.parse_args()
    work = work_dir(args)
    images = jpeg_set_500(data_root(args), work / "jpeg500")
    out = {}
    for name in backbones(args):
        base = work / "b2" / name
        weights = weights_file(name, work)
        cache_dir = base / "cache"
        graph, prepare_s = prepare_graph(name, weights, cache_dir)
        shutil.rmtree(base / "ours", ignore_errors=True)
        cmd = [*retrainer_cmd(), "-q", "train", "--image-dir", str(images), "--backbone", name,
               "--output-dir", str(base / "ours" / "model"),
               "--bottleneck-dir", str(base / "ours" / "bottlenecks"), "--json"]
        if weights:
            cmd += ["--weights", weights]
        ours_wall, ours_out, _ = run(cmd, env={"RETRAINER_CACHE_DIR": str(cache_dir)})
        ours = json.loads(ours_out)

        saved = base / "baseline.json"
        if args.reuse_baseline and saved.is_file():
            baseline = json.loads(saved.read_text())
        else:
            shutil.rmtree(base / "baseline", ignore_errors=True)
            wall, text, _ = run([sys.executable, str(BENCH / "retrain_baseline.py"),
                                 "--image-dir", str(images), "--graph", graph,
                                 "--bottleneck-dir", str(base / "baseline" / "bottlenecks"),
                                 "--output-graph", str(base / "baseline" / "graph.pb"),
                                 "--summaries-dir", str(base / "baseline" / "summaries")])
            baseline = dict(json.loads(text), wall_s=round(wall, 2))
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(baseline))
        out[name] = {
            "retrainer_s": round(ours_wall, 2), "baseline_s": baseline["wall_s"],
            "speedup": round(baseline["wall_s"] / ours_wall, 2),
            "prepare_s": round(prepare_s, 2),
            "speedup_with_prepare": round(baseline["wall_s"] / (ours_wall + prepare_s), 2),
            "retrainer_test_accuracy": ours["test_accuracy"],
            "baseline_test_accuracy": baseline["test_accuracy"],
            "test_images": baseline["test_images"],
            "retrainer_phases": {k: round(v, 2) for k, v in ours["timings"].items()},
            "baseline_phases": baseline["timings"],
        }
    emit({"benchmark": "end_to_end", "results": out})


if __name__ == "__main__":
    main()
