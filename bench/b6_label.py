"""6. ``label`` throughput on 500 JPEGs vs the raw forward pass of the same exported graph.

Uses the efficientnet_lite0 model benchmark 2 exported (or trains one). Both run in this
process after loading, alternating twice (best of each): the raw pass on pre-decoded tensors at
its best batch (16/32/64), ``label`` reading, decoding and resizing the 500 files on its thread
pool at its default batch. The CLI's wall time (TensorFlow import, model load) is reported too.
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
        run([*retrainer_cmd(), "-q", "train", "--image-dir", str(images), "--architecture",
             "efficientnet_lite0", "--output-dir", str(model), "--bottleneck-dir",
             str(work / "b6-bottlenecks")])

    from retrainer.config import LabelConfig
    from retrainer.predict import Classifier, expand_inputs

    batch = LabelConfig().batch_size
    paths, _ = expand_inputs([str(images)])
    classifier = Classifier.load(model)
    list(classifier.label_paths(paths[:batch], batch_size=batch))  # warm-up
    raw_rates: list[Rate] = []
    raw_batches: list[int] = []
    rates: list[Rate] = []
    by_sessions: dict[int, float] = {}
    for _ in range(2):  # alternate, keep the best of each: other work on the machine skews both
        raw, bs = raw_forward_rate(classifier.runner, classifier.input_size,
                                   by_sessions=by_sessions)
        raw_rates.append(raw)
        raw_batches.append(bs)
        with Clock() as clock:
            results = list(classifier.label_paths(paths, batch_size=batch))
        rates.append(clock.rate(len(results)))
    raw, rate = max(raw_rates), max(rates)
    cli_wall, _, _ = run([*retrainer_cmd(), "-q", "label", "--json", "--model-dir", str(model),
                          str(images)])
    emit({"benchmark": "label", "backbone": "efficientnet_lite0", "results": {
        "images": len(results), "label_img_s": round(rate.per_s, 2), "label_batch": batch,
        "raw_img_s": round(raw.per_s, 2), "raw_batch": raw_batches[raw_rates.index(raw)],
        "raw_rounds": [r.to_dict() for r in raw_rates],
        "label_rounds": [r.to_dict() for r in rates],
        "raw_best": raw.to_dict(), "label_best": rate.to_dict(),
        "ratio": round(rate.per_s / raw.per_s, 3), "cli_wall_s": round(cli_wall, 2),
        "raw_by_sessions": {n: round(r, 2) for n, r in by_sessions.items()}}})


if __name__ == "__main__":
    main()
