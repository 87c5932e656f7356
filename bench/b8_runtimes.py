"""8. Runtimes: the raw forward pass of every installed runtime (fp32 and bf16) per backbone;
``train``'s extraction with default settings vs the previous path (TensorFlow, same run); and
``label`` of one image (wall, peak RSS) and of 500 images per runtime of an export.

Raw rates: pre-decoded random pixels run as extraction runs them (each lane its share of a
batch of 16, two images at a time), rounds alternating between runtimes, best of each kept
(bottlenecks.runtime_choice.measure); and, for Lite0, the fastest runtime's raw pass at its best
batch (2 to 64, called batch by batch or pipelined: bench/common.raw_forward_rate), the fairest
baseline. Extraction: 500 JPEGs hashed, decoded and run through the local engine into a fresh
cache; the previous path (TensorFlow on batches of 16 decoded by a thread pool) and the default
one (``auto``, lanes decoding their own shares) alternate, best of each kept.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from common import (
    WEIGHTS, Clock, backbones, data_root, emit, jpeg_set_500, parser, raw_forward_rate,
    retrainer_cmd, run, work_dir,
)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--raw-batches", default="2,4,8,16,32,64",
                   help="Batch sizes the fastest runtime's raw pass is timed at (best counts).")
    p.add_argument("--no-label", action="store_true", help="Skip the label rows.")
    p.add_argument("--model-set", default="hymenoptera_data",
                   help="The set a Lite0 model is trained on for the label rows.")
    args = p.parse_args()
    work = work_dir(args) / "b8"
    os.environ.setdefault("RETRAINER_CACHE_DIR", str(work / "cache"))
    images = jpeg_set_500(data_root(args), work_dir(args) / "jpeg500")

    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks import BottleneckCache, get_engine, hash_records
    from retrainer.bottlenecks.extractor import graphs_dir, make_forward
    from retrainer.config import ExtractionConfig
    from retrainer.decoding import default_workers
    from retrainer.runtimes import available
    from retrainer.bottlenecks.runtime_choice import choose, measure
    from retrainer.sources.folder import scan_folder

    defaults = ExtractionConfig()
    records = scan_folder(images).records
    out: dict = {"load_before": os.getloadavg()}
    for name in backbones(args):
        row: dict = {}
        for precision in ("fp32", "bf16"):
            backbone = create_backbone(name, WEIGHTS[name], precision=precision)
            rates = measure(backbone, graphs_dir(), available(precision),
                            seconds=args.seconds, rounds=args.rounds)
            row[precision] = {r: round(v, 1) for r, v in rates.items()}
        fastest = max(row["fp32"].values())
        row["fp32_fastest"] = max(row["fp32"], key=row["fp32"].get)
        row["bf16_fastest_x_fp32_fastest"] = round(max(row["bf16"].values()) / fastest, 2)
        if name == "efficientnet_lite0":
            backbone = create_backbone(name, WEIGHTS[name])
            backbone.runtime = choose(backbone, graphs_dir())
            paths = {"previous (tensorflow)": (make_forward(backbone, graphs_dir(), "tensorflow"),
                                               default_workers()),
                     f"default (auto: {backbone.runtime})": (make_forward(backbone, graphs_dir()),
                                                             defaults.workers)}
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for label, (forward, workers) in paths.items():
                    cache_root = work / "cache-b8"
                    shutil.rmtree(cache_root, ignore_errors=True)
                    cache = BottleneckCache(cache_root, backbone.cache_id,
                                            backbone.spec.feature_dim)
                    with Clock() as clock:
                        keys, _ = hash_records(records, defaults.workers)
                        get_engine("local", workers=workers).extract(
                            list(dict(zip(keys, records)).items()), forward,
                            backbone.spec.input_size, backbone.spec.resize, cache,
                            batch_size=defaults.batch_size)
                    best[label] = max(best.get(label, 0.0), clock.rate(len(records)).per_s)
            row["extraction_img_s"] = {k: round(v, 1) for k, v in best.items()}
            default = next(v for k, v in best.items() if k.startswith("default"))
            row["extraction_default_x_previous"] = round(
                default / best["previous (tensorflow)"], 2)
            row["extraction_default_x_fastest_raw_fp32"] = round(default / fastest, 2)
            fastest_runner = make_forward(backbone, graphs_dir(), row["fp32_fastest"])
            raw, bs = raw_forward_rate(
                fastest_runner, backbone.spec.input_size, seconds=args.seconds,
                batches=tuple(int(b) for b in args.raw_batches.split(",") if b))
            fastest_runner.close()
            row["fastest_raw_best_batch"] = {"runtime": row["fp32_fastest"], "batch": bs,
                                             "img_s": round(raw.per_s, 1)}
            row["extraction_default_x_fastest_raw_best_batch"] = round(default / raw.per_s, 2)
            for _, (forward, _) in paths.items():
                forward.close()
            if not args.no_label:
                row["label"] = label_rows(args, work, fastest)
        out[name] = row
    out["load_after"] = os.getloadavg()
    emit({"benchmark": "runtimes", "results": out})


def label_rows(args, work, fastest_raw: float) -> dict:  # noqa: ANN001
    """A Lite0 model trained on ``--model-set``; ``label`` of one image and of 500 per
    runtime, as separate processes (wall time and peak RSS of the child)."""
    model = work / "model"
    if not (model / "model.tflite").is_file():
        run([*retrainer_cmd(), "train", "--image-dir", str(data_root(args) / args.model_set),
             "--backbone", "efficientnet_lite0", "--output-dir", str(model),
             "--bottleneck-dir", str(work / "bn")])  # its stdout is not this one's JSON
    one = next(p for p in sorted((data_root(args) / "sample_images").rglob("*"))
               if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    many = work_dir(args) / "jpeg500"
    rows = {}
    from retrainer.runtimes import installed

    for runtime in ("auto", "tensorflow", "litert", "onnxruntime", "openvino"):
        if runtime != "auto" and not installed(runtime):
            continue
        base = [*retrainer_cmd(), "label", "--model-dir", str(model), "--runtime", runtime]
        run([*base, str(one)])  # warm the page cache (and the kept ONNX conversion)
        wall, _, rss = min(run([*base, str(one)]) for _ in range(3))
        wall500, stdout, _ = run([*base, "--json", "--batch-size", "32", str(many)])
        n = sum(1 for line in stdout.splitlines() if '"predictions"' in line)
        rows[runtime] = {"one_image_wall_s": round(wall, 2), "one_image_peak_rss_mb": round(rss),
                         "label_500_img_s": round(n / wall500, 1),
                         "label_500_x_fastest_raw": round(n / wall500 / fastest_raw, 2)}
        print(runtime, json.dumps(rows[runtime]), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
