"""The export helper process: it writes the model this process would write, a failure of it
costs only the time (the caller exports itself), and `train` uses it where TensorFlow would
otherwise start only to export."""
from __future__ import annotations

import filecmp
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from retrainer.config import ExportConfig
from retrainer.export_worker import ExportJob, ExportWorker

FORMATS = ("graph", "saved_model", "tflite")


def test_kept_files_are_named_by_the_installed_tensorflow_version():
    import tensorflow as tf

    from retrainer.bottlenecks.extractor import tensorflow_version

    assert tensorflow_version() == tf.__version__


@pytest.fixture(scope="module")
def kept(tmp_path_factory, tiny_backbone):
    """The tiny backbone's kept frozen graph and TFLite conversion."""
    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks.extractor import backbone_graph, backbone_tflite, graph_path

    root = tmp_path_factory.mktemp("graphs")
    backbone = create_backbone(TINY)
    frozen = backbone_graph(backbone, root, "fp32")
    backbone_tflite(backbone, root, frozen)
    return (frozen, graph_path(root, backbone, "fp32"),
            graph_path(root, backbone, "fp32", kind="tflite"))


def _job(kept, out: Path, frozen_path: Path | None = None) -> ExportJob:
    _, frozen, tflite = kept
    rng = np.random.default_rng(3)
    return ExportJob(str(frozen_path or frozen), str(tflite),
                     rng.normal(size=(3, 4)).astype(np.float32),
                     rng.normal(size=4).astype(np.float32), ["w", "x", "y", "z"],
                     {"format": "test", "backbone": {"name": TINY}},
                     ExportConfig(output_dir=str(out), formats=FORMATS), logging.DEBUG)


def test_the_helper_writes_the_model_this_process_writes(kept, tmp_path):
    import tensorflow as tf

    from retrainer.bottlenecks.extractor import kept_tflite
    from retrainer.export import export_classifier

    job = _job(kept, tmp_path / "helper")
    worker = ExportWorker.start((32, 32), "bilinear")  # builds the SavedModel's decoding ahead
    assert worker is not None
    outputs = worker.export(job)
    assert outputs is not None and set(outputs) >= {"graph", "saved_model", "tflite", "labels"}
    assert worker._proc.returncode is not None  # it ended with its one job

    frozen = kept[0]
    here = ExportJob(**{**job.__dict__, "config": ExportConfig(
        output_dir=str(tmp_path / "here"), formats=FORMATS)})
    export_classifier(frozen, here.kernel, here.bias, here.labels, here.metadata, here.config,
                      backbone_tflite=lambda: kept_tflite(kept[2], lambda: frozen))
    for name in ("retrained_graph.pb", "model.tflite", "retrained_labels.txt", "metadata.json"):
        assert filecmp.cmp(tmp_path / "helper" / name, tmp_path / "here" / name, shallow=False), name
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    photos = [_png(np.random.default_rng(i).integers(0, 255, (40 + i, 50, 3), np.uint8))
              for i in range(3)]
    served = []
    for d in ("helper", "here"):
        signatures = tf.saved_model.load(str(tmp_path / d / "saved_model")).signatures
        served.append((
            signatures["serving_default"](images=tf.constant(pixels))["scores"].numpy(),
            signatures["classify_images"](image_bytes=tf.constant(photos))["scores"].numpy()))
    for a, b in zip(*served):
        np.testing.assert_array_equal(a, b)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_helper_that_fails_writes_nothing_and_says_so(kept, tmp_path, caplog):
    job = _job(kept, tmp_path / "model", frozen_path=tmp_path / "gone.pb")
    worker = ExportWorker.start()
    assert worker is not None
    with caplog.at_level(logging.DEBUG, logger="retrainer"):
        assert worker.export(job) is None
    assert "exporting in this process" in caplog.text and "gone.pb" in caplog.text
    assert not (tmp_path / "model").exists()


def test_a_helper_closed_unused_ends(tmp_path):
    worker = ExportWorker.start()
    assert worker is not None
    worker.close()  # e.g. the run failed before exporting
    assert worker._proc.returncode is not None
    assert worker.result() is None


def test_train_exports_through_the_helper_the_same_model(tmp_path):
    """A second run on the kept LiteRT conversion needs TensorFlow only to export: the helper
    writes the model, file for file the one the first run wrote itself."""
    from retrainer.demo import make_demo_set

    photos = make_demo_set(tmp_path / "photos", per_class=8)

    def train(out: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "retrainer", "-v", "train", "--image-dir", str(photos),
             "--backbone", "efficientnet_lite0", "--runtime", "litert",
             "--bottleneck-dir", str(tmp_path / "bn"), "--output-dir", str(tmp_path / out)],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "exported by the helper process" not in train("first")  # it converted: TF is up
    log = train("second")
    assert "exported by the helper process" in log
    assert "exported graph, labels, metadata, saved_model, tflite" in log  # its records, here
    for name in ("retrained_graph.pb", "model.tflite", "retrained_labels.txt",
                 "fitted_images.sha256"):
        assert filecmp.cmp(tmp_path / "first" / name, tmp_path / "second" / name,
                           shallow=False), name
    first, second = (json.loads((tmp_path / d / "report.json").read_text())
                     for d in ("first", "second"))
    assert first == second
    assert (tmp_path / "second" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_a_prepared_saved_model_graph_fits_one_model_once(kept, tmp_path):
    from retrainer.export import SavedModelGraph
    from retrainer.graph import compose, dense_softmax_graph

    prepared = SavedModelGraph((32, 32), "bilinear")
    assert prepared.fits((32, 32), "bilinear")
    assert not prepared.fits((64, 64), "bilinear") and not prepared.fits((32, 32), "bicubic")
    classifier = compose(kept[0], dense_softmax_graph(np.ones((3, 2), np.float32),
                                                       np.zeros(2, np.float32)))
    prepared.write(classifier, tmp_path / "saved_model")
    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()
    assert not prepared.fits((32, 32), "bilinear")
    with pytest.raises(RuntimeError):
        prepared.write(classifier, tmp_path / "again")
