"""The real efficientnet_lite0 backbone on images that scikit-image ships: train, kill and
resume the cache, export, reload the frozen graph in plain TensorFlow, label, evaluate."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrainer.bottlenecks.cache import BottleneckCache
from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, HeadConfig,
                              SourceConfig, TrainConfig)
from retrainer.demo import SOURCES, crops, make_demo_set
from retrainer.predict import Classifier
from retrainer.training import train


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_demo_set(tmp_path_factory.mktemp("lite0") / "photos", per_class=60)


def test_killed_extraction_resumes_then_trains_exports_and_labels(photos, tmp_path):
    bn, out = tmp_path / "bn", tmp_path / "model"
    args = [sys.executable, "-m", "retrainer", "-q", "train", "--image-dir", str(photos),
            "--architecture", "efficientnet_lite0", "--bottleneck-dir", str(bn),
            "--output-dir", str(out), "--extract-batch-size", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(bn.glob("*/shard-*.npz")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    (cache_dir,) = list(bn.iterdir())
    done = len(BottleneckCache(bn, cache_dir.name, 1280))
    assert 0 < done < 180

    config = TrainConfig(source=SourceConfig(image_dir=str(photos), testing_percentage=20),
                         backbone=BackboneConfig("efficientnet_lite0"),
                         extraction=ExtractionConfig(bottleneck_dir=str(bn)),
                         head=HeadConfig(epochs=30),
                         export=ExportConfig(output_dir=str(out), formats=("graph",)))
    result = train(config)
    assert (result.bottlenecks_cached, result.bottlenecks_computed) == (done, 180 - done)
    assert result.test_accuracy is not None and result.test_accuracy >= 0.9

    # The same bottlenecks again: nothing computed.
    assert train(config).bottlenecks_computed == 0

    # Plain TensorFlow on the frozen graph agrees with `label` on held-out crops.
    import tensorflow as tf

    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    paths = []
    for c, (label, name) in enumerate(SOURCES.items()):
        for i, crop in enumerate(crops(name, 3, seed=100 + c)):
            paths.append(probe_dir / f"{label}_{i}.jpg")  # held out: other seeds
            crop.save(paths[-1], quality=90)
    classifier = Classifier.load(out)
    ours = list(classifier.label_paths([str(p) for p in paths]))
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((out / "retrained_graph.pb").read_bytes())
    batch = np.stack([classifier.prepare(p.read_bytes()) for p in paths])
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as sess:
            plain = sess.run("final_result:0", {"input:0": batch})
    np.testing.assert_allclose(plain, np.stack([r.probabilities for r in ours]), atol=1e-4)
    assert [r.predictions[0].label for r in ours] == [p.name.split("_")[0] for p in paths]

    report = subprocess.run([sys.executable, "-m", "retrainer", "-q", "evaluate", "--image-dir",
                             str(photos), "--model-dir", str(out), "--include-training-images",
                             "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(report.stdout)["accuracy"] >= 0.95
