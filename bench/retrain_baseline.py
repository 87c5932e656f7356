"""A faithful retrain.py-style baseline (the TensorFlow-for-Poets script, default flags).

What it does, as retrain.py does it:
- the backbone is a frozen GraphDef loaded from a file; each image is one batch-1 ``Session.run``
  fed the JPEG bytes (decode + bilinear resize in the graph), then a second run for the
  bottleneck;
- each bottleneck is written as one text file of comma-separated floats and read back;
- 4000 SGD steps (learning rate 0.01) of 100 randomly sampled bottlenecks, every one read and
  parsed from its text file; every 10 steps a validation batch of 100, read the same way;
- with ``--summaries-dir`` (retrain.py's default is /tmp/retrain_logs), TensorBoard summaries as
  retrain.py writes them: the graph, then every step the merged summaries (mean, stddev, max,
  min and histogram of the weights and biases, histograms of the logits and the softmax, cross
  entropy, accuracy) for the training batch, and every 10 steps for the validation batch;
- a final test on every test image, then the graph (backbone + new layer) frozen to a .pb.

The train/validation/test split is retrainer's, so both tools are tested on the same images.
Prints JSON: wall time per phase and the test accuracy.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description="retrain.py-style baseline")
    p.add_argument("--image-dir", required=True)
    p.add_argument("--graph", required=True, help="Frozen backbone graph (input -> final_result).")
    p.add_argument("--bottleneck-dir", required=True)
    p.add_argument("--output-graph", required=True)
    p.add_argument("--how-many-training-steps", type=int, default=4000)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--train-batch-size", type=int, default=100)
    p.add_argument("--validation-batch-size", type=int, default=100)
    p.add_argument("--eval-step-interval", type=int, default=10)
    p.add_argument("--testing-percentage", type=float, default=10)
    p.add_argument("--summaries-dir", default=None,
                   help="Write TensorBoard summaries as retrain.py does by default.")
    p.add_argument("--validation-percentage", type=float, default=10)
    args = p.parse_args()

    import tensorflow as tf

    from retrainer.sources.folder import scan_folder
    from retrainer.split import assign_splits

    tf1 = tf.compat.v1
    tf1.disable_eager_execution()
    timings: dict[str, float] = {"import": time.perf_counter() - t_start}

    dataset = assign_splits(scan_folder(args.image_dir), args.validation_percentage,
                            args.testing_percentage)
    classes = dataset.classes
    lists: dict[str, dict[str, list]] = {c: {"training": [], "validation": [], "testing": []}
                                         for c in classes}
    for rec in dataset.records:
        lists[rec.label][rec.split].append(rec)

    graph_def = tf1.GraphDef()
    graph_def.ParseFromString(Path(args.graph).read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        resized_input, bottleneck = tf1.import_graph_def(
            graph_def, return_elements=["input:0", "final_result:0"], name="")
        height, width = resized_input.shape.as_list()[1:3]
        dim = int(bottleneck.shape[-1])
        # add_jpeg_decoding
        jpeg_data = tf1.placeholder(tf.string, name="DecodeJPGInput")
        decoded = tf.image.decode_jpeg(jpeg_data, channels=3)
        decoded = tf.expand_dims(tf.cast(decoded, tf.float32), 0)
        resized = tf1.image.resize_bilinear(decoded, [height, width])
        # add_final_training_ops
        bottleneck_input = tf1.placeholder_with_default(bottleneck, [None, dim],
                                                        name="BottleneckInputPlaceholder")
        truth = tf1.placeholder(tf.int64, [None], name="GroundTruthInput")
        weights = tf1.Variable(tf1.truncated_normal([dim, len(classes)], stddev=0.001))
        biases = tf1.Variable(tf1.zeros([len(classes)]))
        logits = tf1.matmul(bottleneck_input, weights) + biases
        final = tf1.nn.softmax(logits, name="final_result_retrained")
        loss = tf1.losses.sparse_softmax_cross_entropy(labels=truth, logits=logits)
        train_step = tf1.train.GradientDescentOptimizer(args.learning_rate).minimize(loss)
        prediction = tf1.argmax(final, 1)
        accuracy = tf1.reduce_mean(tf1.cast(tf1.equal(prediction, truth), tf.float32))
        for name, var in (("weights", weights), ("biases", biases)):  # variable_summaries
            with tf1.name_scope(name):
                mean = tf1.reduce_mean(var)
                tf1.summary.scalar("mean", mean)
                tf1.summary.scalar("stddev", tf1.sqrt(tf1.reduce_mean(tf1.square(var - mean))))
                tf1.summary.scalar("max", tf1.reduce_max(var))
                tf1.summary.scalar("min", tf1.reduce_min(var))
                tf1.summary.histogram("histogram", var)
        tf1.summary.histogram("pre_activations", logits)
        tf1.summary.histogram("activations", final)
        tf1.summary.scalar("cross_entropy", loss)
        tf1.summary.scalar("accuracy", accuracy)
        merged = tf1.summary.merge_all()
        init = tf1.global_variables_initializer()

    sess = tf1.Session(graph=graph)
    sess.run(init)
    writers = None
    if args.summaries_dir:
        writers = (tf1.summary.FileWriter(f"{args.summaries_dir}/train", graph),
                   tf1.summary.FileWriter(f"{args.summaries_dir}/validation"))
    bdir = Path(args.bottleneck_dir)

    def bottleneck_path(rec) -> Path:  # noqa: ANN001
        return bdir / rec.label / (Path(rec.key).name + ".txt")

    def get_or_create(rec) -> list[float]:  # noqa: ANN001
        path = bottleneck_path(rec)
        if not path.exists():
            image_data = rec.read()
            pixels = sess.run(resized, {jpeg_data: image_data})
            values = np.squeeze(sess.run(bottleneck, {resized_input: pixels}))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(",".join(str(x) for x in values))
        return [float(x) for x in path.read_text().split(",")]

    t = time.perf_counter()
    created = 0
    for c in classes:  # cache_bottlenecks
        for split in ("training", "testing", "validation"):
            for rec in lists[c][split]:
                get_or_create(rec)
                created += 1
    timings["bottlenecks"] = time.perf_counter() - t

    rng = random.Random(0)

    def random_batch(split: str, n: int) -> tuple[list[list[float]], list[int]]:
        xs, ys = [], []
        for _ in range(n):
            label_index = rng.randrange(len(classes))
            recs = lists[classes[label_index]][split]
            if not recs:
                continue
            rec = recs[rng.randrange(65536) % len(recs)]
            xs.append(get_or_create(rec))
            ys.append(label_index)
        return xs, ys

    t = time.perf_counter()
    for step in range(args.how_many_training_steps):
        xs, ys = random_batch("training", args.train_batch_size)
        if writers:
            summary, _ = sess.run([merged, train_step], {bottleneck_input: xs, truth: ys})
            writers[0].add_summary(summary, step)
        else:
            sess.run(train_step, {bottleneck_input: xs, truth: ys})
        last = step + 1 == args.how_many_training_steps
        if step % args.eval_step_interval == 0 or last:
            sess.run([accuracy, loss], {bottleneck_input: xs, truth: ys})
            vx, vy = random_batch("validation", args.validation_batch_size)
            if vx and writers:
                summary, _ = sess.run([merged, accuracy], {bottleneck_input: vx, truth: vy})
                writers[1].add_summary(summary, step)
            elif vx:
                sess.run(accuracy, {bottleneck_input: vx, truth: vy})
    if writers:
        for writer in writers:
            writer.close()
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    tx, ty = [], []
    for i, c in enumerate(classes):
        for rec in lists[c]["testing"]:
            tx.append(get_or_create(rec))
            ty.append(i)
    test_acc = float(sess.run(accuracy, {bottleneck_input: tx, truth: ty})) if tx else None
    frozen = tf1.graph_util.convert_variables_to_constants(
        sess, graph.as_graph_def(), ["final_result_retrained"])
    Path(args.output_graph).write_bytes(frozen.SerializeToString())
    timings["test_and_export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    json.dump({"images": created, "test_accuracy": test_acc, "test_images": len(tx),
               "timings": {k: round(v, 2) for k, v in timings.items()}}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
