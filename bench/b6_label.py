"""6. ``label``: throughput on 500 JPEGs vs the fastest raw forward pass, and one image's start.

Uses the efficientnet_lite0 model benchmark 2 exported (or trains one). For each runtime the
export runs on (TensorFlow on the frozen graph, LiteRT on ``model.tflite``), in this process
after loading, alternating twice (best of each): the raw pass on pre-decoded tensors at its best
batch (16/32/64), and ``label`` reading, decoding and resizing the 500 files on its thread pool
at its default batch. The ratio divides ``label`` with the default runtime by the fastest raw
pass of any runtime. Then the CLI: ``label`` of one image, wall time and peak RSS (best of 3),
with the default runtime and with TensorFlow; and of all 500 files.
"""
from __future__ import annotations

from common import (
    Clock, Rate, data_root, emit, jpeg_set_500, parser, raw_forward_rate, retrainer_cmd, run,
    work_dir,
)


def main() -> None:
    args = parser(__doc__).parse_args()
    work = work_dir(args)
    images = jpeg_set_500(data_root(args), work / "jpeg500")
    model = work / "b2" / "efficientnet_lite0" / "ours" / "model"
    if not (model / "retrained_graph.pb").is_file():
        run([*retrainer_cmd(), "-q", "train", "--image-dir", str(images), "--backbone",
             "efficientnet_lite0", "--output-dir", str(model), "--bottleneck-dir",
             str(work / "b6-bottlenecks")])

    from retrainer.config import LabelConfig
    from retrainer.predict import Classifier, expand_inputs

    batch = LabelConfig().batch_size
    paths, _ = expand_inputs([str(images)])
    default = Classifier.load(model).runtime
    by_runtime = {}
    from retrainer.runtimes import RUNTIMES, installed

    for runtime in [r for r in RUNTIMES if installed(r)]:
        classifier = Classifier.load(model, runtime=runtime)
        list(classifier.label_paths(paths[:batch], batch_size=batch))  # warm-up
        raw_rates: list[Rate] = []
        raw_batches: list[int] = []
        rates: list[Rate] = []
        by_sessions: dict[int, float] = {}
        for _ in range(2):  # alternate, keep the best of each: other work skews both
            raw, bs = raw_forward_rate(classifier.runner, classifier.input_size,
                                       by_sessions=by_sessions)
            raw_rates.append(raw)
            raw_batches.append(bs)
            with Clock() as clock:
                results = list(classifier.label_paths(paths, batch_size=batch))
            rates.append(clock.rate(len(results)))
        raw, rate = max(raw_rates), max(rates)
        by_runtime[runtime] = {
            "label_img_s": round(rate.per_s, 2), "raw_img_s": round(raw.per_s, 2),
            "raw_batch": raw_batches[raw_rates.index(raw)],
            "raw_rounds": [r.to_dict() for r in raw_rates],
            "label_rounds": [r.to_dict() for r in rates],
            "raw_by_sessions": {n: round(r, 2) for n, r in by_sessions.items()}}
        classifier.runner.close()
    fastest_raw = max(r["raw_img_s"] for r in by_runtime.values())
    one_image = {}
    for runtime in dict.fromkeys([default, *by_runtime]):
        runs = [run([*retrainer_cmd(), "-q", "label", "--runtime", runtime, "--model-dir",
                     str(model), paths[0]]) for _ in range(3)]
        one_image[runtime] = {"wall_s": round(min(r[0] for r in runs), 3),
                              "peak_rss_mb": round(min(r[2] for r in runs), 1)}
    cli_wall, _, _ = run([*retrainer_cmd(), "-q", "label", "--json", "--model-dir", str(model),
                          str(images)])
    emit({"benchmark": "label", "backbone": "efficientnet_lite0", "results": {
        "images": len(paths), "label_batch": batch, "runtime": default,
        "label_img_s": by_runtime[default]["label_img_s"],
        "raw_img_s": fastest_raw, "by_runtime": by_runtime,
        "ratio": round(by_runtime[default]["label_img_s"] / fastest_raw, 3),
        "one_image": one_image, "cli_wall_s": round(cli_wall, 2)}})


if __name__ == "__main__":
    main()
