"""6. ``label``: throughput on 500 JPEGs vs the fastest raw forward pass, and one image's start.

Uses the efficientnet_lite0 model benchmark 2 exported (or trains one). For each runtime the
export runs on (TensorFlow on the frozen graph, LiteRT on ``model.tflite``, ONNX Runtime and
OpenVINO where installed), in this process after loading, alternating ``--rounds`` times (best
of each): the raw pass on pre-decoded tensors at its best batch (``--raw-batches``: small
batches run fastest on these 2-core machines, so they are part of the baseline), and ``label``
reading, decoding and resizing the 500 files on the runner's lanes at its default batch (and
at each of ``--label-batches``, for information). The ratio divides ``label`` with the default
runtime by the fastest raw pass of any runtime. Then the CLI: ``label`` of one image, wall time
and peak RSS (best of 3), with each runtime; and of all 500 files.
"""
from __future__ import annotations

import sys

from common import (
    Clock, Rate, data_root, emit, jpeg_set_500, parser, raw_forward_rate, retrainer_cmd, run,
    work_dir,
)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3,
                   help="Alternating rounds of raw pass and label per runtime (best of each).")
    p.add_argument("--runtimes", default=None,
                   help="Comma-separated runtimes to measure (default: every installed one).")
    p.add_argument("--label-batches", default="",
                   help="Comma-separated extra label batch sizes to time too (information).")
    p.add_argument("--raw-seconds", type=float, default=4.0,
                   help="Seconds each raw-pass candidate is timed.")
    p.add_argument("--raw-batches", default="2,4,8,16,32,64",
                   help="Comma-separated batch sizes the raw pass is timed at (the best counts).")
    p.add_argument("--no-cli", action="store_true", help="Skip the CLI runs.")
    args = p.parse_args()
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

    wanted = args.runtimes.split(",") if args.runtimes else RUNTIMES
    extra = [int(b) for b in args.label_batches.split(",") if b and int(b) != batch]
    raw_batches_wanted = tuple(int(b) for b in args.raw_batches.split(",") if b)
    for runtime in [r for r in RUNTIMES if r in wanted and r != "auto" and installed(r)]:
        classifier = Classifier.load(model, runtime=runtime)
        list(classifier.label_paths(paths[:batch], batch_size=batch))  # warm-up
        raw_rates: list[Rate] = []
        raw_batches: list[int] = []
        large_rates: list[Rate] = []  # batches of 16 and more: the baseline before small ones
        rates: dict[int, list[Rate]] = {b: [] for b in [batch, *extra]}
        by_sessions: dict[int, float] = {}
        for _ in range(args.rounds):  # alternate, keep the best of each: other work skews both
            found = [raw_forward_rate(classifier.runner, classifier.input_size,
                                      batches=group, seconds=args.raw_seconds,
                                      by_sessions=by_sessions)
                     for group in ([b for b in raw_batches_wanted if b < 16],
                                   [b for b in raw_batches_wanted if b >= 16]) if group]
            raw, bs = max(found)
            raw_rates.append(raw)
            raw_batches.append(bs)
            large_rates.append(max((r for r, b in found if b >= 16), default=Rate(0.0)))
            for b in rates:
                with Clock() as clock:
                    results = list(classifier.label_paths(paths, batch_size=b))
                rates[b].append(clock.rate(len(results)))
            print(f"{runtime}: raw {raw.per_s:.1f} img/s ({raw.cpu_ms:.2f} CPU-ms), label "
                  + ", ".join(f"batch {b} {r[-1].per_s:.1f} img/s ({r[-1].cpu_ms:.2f} CPU-ms)"
                              for b, r in rates.items()), file=sys.stderr)
        raw, rate = max(raw_rates), max(rates[batch])
        by_runtime[runtime] = {
            "label_img_s": round(rate.per_s, 2), "raw_img_s": round(raw.per_s, 2),
            "label_x_raw": round(rate.per_s / raw.per_s, 3),
            "raw_img_s_batch16_up": round(max(large_rates).per_s, 2),
            "raw_batch": raw_batches[raw_rates.index(raw)],
            "raw_best": raw.to_dict(), "label_best": rate.to_dict(),
            "raw_rounds": [r.to_dict() for r in raw_rates],
            "label_rounds": [r.to_dict() for r in rates[batch]],
            "label_img_s_by_batch": {b: round(max(r).per_s, 2) for b, r in rates.items()},
            "raw_by_sessions": {n: round(r, 2) for n, r in by_sessions.items()}}
        classifier.runner.close()
    fastest_raw = max(r["raw_img_s"] for r in by_runtime.values())
    fastest_large = max(r["raw_img_s_batch16_up"] for r in by_runtime.values())
    one_image = {}
    for runtime in dict.fromkeys([default, *by_runtime] if not args.no_cli else []):
        runs = [run([*retrainer_cmd(), "-q", "label", "--runtime", runtime, "--model-dir",
                     str(model), paths[0]]) for _ in range(3)]
        one_image[runtime] = {"wall_s": round(min(r[0] for r in runs), 3),
                              "peak_rss_mb": round(min(r[2] for r in runs), 1)}
    cli_wall = None if args.no_cli else run([*retrainer_cmd(), "-q", "label", "--json",
                                              "--model-dir", str(model), str(images)])[0]
    if default not in by_runtime:  # --runtimes left it out: the fastest label measured
        default = max(by_runtime, key=lambda r: by_runtime[r]["label_img_s"])
    emit({"benchmark": "label", "backbone": "efficientnet_lite0", "results": {
        "images": len(paths), "label_batch": batch, "runtime": default,
        "label_img_s": by_runtime[default]["label_img_s"],
        "raw_img_s": fastest_raw, "by_runtime": by_runtime,
        "ratio": round(by_runtime[default]["label_img_s"] / fastest_raw, 3),
        "raw_img_s_batch16_up": fastest_large,
        "ratio_to_raw_batch16_up": round(by_runtime[default]["label_img_s"] / fastest_large, 3)
        if fastest_large else None,
        "one_image": one_image, "cli_wall_s": cli_wall and round(cli_wall, 2)}})


if __name__ == "__main__":
    main()
