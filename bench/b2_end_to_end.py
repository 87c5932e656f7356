"""2. End to end on 500 JPEGs from an empty cache: ``retrainer train`` vs a retrain.py-style run.

Both are whole processes timed from the outside (TensorFlow import included), on the same
images, the same backbone and the same held-out test images. ``retrainer train`` runs with its
defaults; the baseline (``retrain_baseline.py``) with retrain.py's defaults (4000 steps).
"""
from __future__ import annotations

import json
import shutil
import sys

from common import BENCH, WEIGHTS, backbones, data_root, emit, jpeg_set_500, parser, retrainer_cmd, run, work_dir


def prepare_graph(name: str, graphs: str) -> str:
    """The backbone's frozen graph file for the baseline (retrain.py reads a .pb too)."""
    code = ("import sys; from retrainer.backbones.factory import create_backbone; "
            "from retrainer.bottlenecks.extractor import backbone_graph, graph_path; "
            "b = create_backbone(sys.argv[1], None if sys.argv[2] == '-' else sys.argv[2]); "
            "backbone_graph(b, sys.argv[3]); print(graph_path(sys.argv[3], b))")
    _, out, _ = run([sys.executable, "-c", code, name, WEIGHTS[name] or "-", graphs])
    return out.strip().splitlines()[-1]


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
        shutil.rmtree(base / "ours", ignore_errors=True)
        cmd = [*retrainer_cmd(), "-q", "train", "--image-dir", str(images), "--architecture", name,
               "--output-dir", str(base / "ours" / "model"),
               "--bottleneck-dir", str(base / "ours" / "bottlenecks"), "--json"]
        if WEIGHTS[name]:
            cmd += ["--weights", WEIGHTS[name]]
        ours_wall, ours_out, _ = run(cmd)
        ours = json.loads(ours_out)

        saved = base / "baseline.json"
        if args.reuse_baseline and saved.is_file():
            baseline = json.loads(saved.read_text())
        else:
            graph = prepare_graph(name, str(work / "graphs"))
            shutil.rmtree(base / "baseline", ignore_errors=True)
            wall, text, _ = run([sys.executable, str(BENCH / "retrain_baseline.py"),
                                 "--image-dir", str(images), "--graph", graph,
                                 "--bottleneck-dir", str(base / "baseline" / "bottlenecks"),
                                 "--output-graph", str(base / "baseline" / "graph.pb")])
            baseline = dict(json.loads(text), wall_s=round(wall, 2))
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(baseline))
        out[name] = {
            "retrainer_s": round(ours_wall, 2), "baseline_s": baseline["wall_s"],
            "speedup": round(baseline["wall_s"] / ours_wall, 2),
            "retrainer_test_accuracy": ours["test_accuracy"],
            "baseline_test_accuracy": baseline["test_accuracy"],
            "test_images": baseline["test_images"],
            "retrainer_phases": {k: round(v, 2) for k, v in ours["timings"].items()},
            "baseline_phases": baseline["timings"],
        }
    emit({"benchmark": "end_to_end", "results": out})


if __name__ == "__main__":
    main()
