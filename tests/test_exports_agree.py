"""Every export, run in the runtime its users have, answers as `retrainer label` does."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COLOURS, TINY, make_colour_tree, tiny_config
from PIL import Image

from retrainer.cli import cli
from retrainer.config import HeadConfig
from retrainer.predict import Classifier
from retrainer.training import train

ALL = ("graph", "saved_model", "tflite", "int8", "onnx")


def _encoded(rgb, size, fmt, orientation=None, alpha=False, seed=0):
    """A noisy image of one colour, in a format, with an EXIF orientation or transparency."""
    rng = np.random.default_rng(seed)
    width, height = size
    arr = np.clip(np.array(rgb) + rng.normal(0, 18, (height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if alpha:
        a = np.full((height, width), 255, np.uint8)
        a[: height // 3] = 0  # a transparent band: white in every runtime
        a[height // 3: height // 2] = 128
        img = Image.fromarray(np.dstack([arr, a]), "RGBA")
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = img.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_backbone):
    base = tmp_path_factory.mktemp("exports")
    images = make_colour_tree(base / "images", per_class=8)
    train(tiny_config(images, base / "model", base / "bn", export=dict(formats=ALL)))
    probes = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j, (size, fmt, kw) in enumerate([((90, 70), "JPEG", {"orientation": 6}),
                                             ((50, 40), "PNG", {"alpha": True}),
                                             ((200, 24), "JPEG", {}),
                                             ((20, 28), "BMP", {})]):
            path = base / "probes" / f"{name}-{j}.{fmt.lower()}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_encoded(rgb, size, fmt, seed=10 * i + j, **kw))
            probes.append(path)
    model_dir = base / "model"
    results = list(Classifier.load(model_dir, runtime="tensorflow").label_paths(
        [str(p) for p in probes]))
    assert all(r.error is None for r in results)
    label_scores = np.stack([r.probabilities for r in results])
    labels = (model_dir / "retrained_labels.txt").read_text(encoding="utf-8").splitlines()
    assert [labels[i] for i in label_scores.argmax(1)] == [n for n in COLOURS for _ in range(4)]
    return model_dir, probes, label_scores, labels


def _agree(scores, expected, tolerance=2e-3):
    assert (scores.argmax(1) == expected.argmax(1)).all()
    assert np.abs(scores - expected).max() <= tolerance


def test_saved_model_classify_images_agrees_with_label(exported):
    import tensorflow as tf

    model_dir, probes, expected, _ = exported
    saved = tf.saved_model.load(str(model_dir / "saved_model"))
    data = tf.constant([p.read_bytes() for p in probes])
    _agree(saved.signatures["classify_images"](image_bytes=data)["scores"].numpy(), expected)


def test_plain_tensorflow_recipe_on_the_frozen_graph_agrees_with_label(exported):
    import tensorflow as tf

    from retrainer.preprocess import decode_and_resize

    model_dir, probes, expected, _ = exported
    pixels = np.stack([decode_and_resize(p.read_bytes(), (32, 32)).numpy() for p in probes])
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((model_dir / "retrained_graph.pb").read_bytes())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as sess:
            scores = sess.run("final_result:0", {"input:0": pixels})
    _agree(scores, expected)


def _litert(path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


def _tflite_metadata(blob: bytes) -> bytes:
    """The TFLITE_METADATA buffer of a model, read with the TFLite schema only."""
    from retrainer._tf_internals import tflite_schema

    model = tflite_schema().ModelT.InitFromPackedBuf(blob, 0)
    (entry,) = [m for m in model.metadata if m.name in (b"TFLITE_METADATA", "TFLITE_METADATA")]
    return bytes(np.asarray(model.buffers[entry.buffer].data, np.uint8))


def test_litert_runs_model_tflite_as_label_does_and_it_carries_its_labels(exported):
    from retrainer.preprocess import decode_and_resize

    model_dir, probes, expected, labels = exported
    blob = (model_dir / "model.tflite").read_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:  # associated files: a zip at the end
        assert archive.read("labels.txt").decode("utf-8").splitlines() == labels
    metadata = _tflite_metadata(blob)
    assert metadata[4:8] == b"M001"  # the metadata schema's file identifier
    assert b"NormalizationOptions" not in metadata and b"labels.txt" in metadata
    runner = _litert(model_dir / "model.tflite").get_signature_runner("serving_default")
    pixels = np.stack([decode_and_resize(p.read_bytes(), (32, 32)).numpy() for p in probes])
    _agree(runner(images=pixels)["scores"], expected)


def test_int8_model_runs_in_litert_on_uint8_pixels(exported):
    from retrainer.images import load_file

    model_dir, probes, expected, labels = exported
    float_size = (model_dir / "model.tflite").stat().st_size
    interpreter = _litert(model_dir / "model_int8.tflite")
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    assert inp["quantization"] == (1.0, 0)  # pixels go in as they are
    runner = interpreter.get_signature_runner("serving_default")
    scale, zero = out["quantization"]
    scores = []
    for p in probes:
        pixels = load_file(p, (32, 32)).astype(np.uint8)[None]
        scores.append((runner(images=pixels)["scores"][0].astype(np.float32) - zero) * scale)
    assert (np.argmax(scores, 1) == expected.argmax(1)).all()
    assert np.abs(np.array(scores) - expected).max() < 0.05
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["files"]["int8"] == "model_int8.tflite"
    assert meta["int8"]["representative_images"] > 0
    blob = (model_dir / "model_int8.tflite").read_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert archive.read("labels.txt").decode("utf-8").splitlines() == labels
    assert float_size > 0


def test_onnxruntime_runs_model_onnx_as_label_does_and_it_names_its_labels(exported):
    import onnx
    import onnxruntime

    from retrainer.preprocess import decode_and_resize

    model_dir, probes, expected, labels = exported
    props = {p.key: p.value for p in onnx.load(str(model_dir / "model.onnx")).metadata_props}
    assert json.loads(props["labels"]) == labels
    assert json.loads(props["retrainer"])["backbone"]["name"] == TINY
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    pixels = np.stack([decode_and_resize(p.read_bytes(), (32, 32)).numpy() for p in probes])
    (scores,) = session.run(None, {session.get_inputs()[0].name: pixels})
    _agree(scores, expected)


# -- the in-graph preprocessing gives label's pixels -------------------------------------------
CASES = [((20, 28), "PNG", {}), ((32, 32), "JPEG", {}), ((45, 40), "JPEG", {}),
         ((130, 97), "JPEG", {}), ((97, 130), "JPEG", {"orientation": 6}),
         ((300, 20), "JPEG", {}), ((20, 300), "PNG", {}), ((260, 200), "JPEG", {})] + \
        [((70, 50), "JPEG", {"orientation": o}) for o in (2, 3, 4, 5, 7, 8)] + \
        [((60, 44), "PNG", {"alpha": True}), ((33, 40), "GIF", {}), ((48, 36), "BMP", {})]


@pytest.mark.parametrize("size, fmt, kw", CASES)
def test_in_graph_preprocessing_equals_label_pixels(size, fmt, kw):
    import tensorflow as tf

    from retrainer.images import load_pixels
    from retrainer.preprocess import decode_and_resize

    data = _encoded((120, 60, 200), size, fmt, seed=sum(size), **kw)
    ours = load_pixels(data, (32, 24))
    graph = decode_and_resize(tf.constant(data), (32, 24)).numpy()
    assert graph.shape == (32, 24, 3)
    assert np.abs(graph - ours).max() <= 1.0  # OpenCV rounds its fixed-point interpolation


def test_classify_images_says_which_formats_it_cannot_decode(exported):
    import tensorflow as tf

    model_dir, *_ = exported
    saved = tf.saved_model.load(str(model_dir / "saved_model"))
    webp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(webp, "WEBP")
    with pytest.raises(tf.errors.InvalidArgumentError, match="WebP and TIFF"):
        saved.signatures["classify_images"](image_bytes=tf.constant([webp.getvalue()]))


# -- retrainer export --------------------------------------------------------------------------
def test_export_adds_formats_to_a_trained_model_and_keeps_the_rest(tmp_path, tiny_backbone):
    images = make_colour_tree(tmp_path / "images", per_class=4)
    model = tmp_path / "model"
    result = CliRunner().invoke(cli, [
        "train", "--image-dir", str(images), "--architecture", TINY, "--output-dir", str(model),
        "--bottleneck-dir", str(tmp_path / "bn"), "--epochs", "3",
        "--export-formats", "graph"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    graph_before = (model / "retrained_graph.pb").read_bytes()
    (model / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", "--model-dir", str(model), "--format",
                                      "onnx,int8", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"onnx", "int8", "labels", "metadata"} <= set(written)
    names = {p.name for p in model.iterdir()}
    assert {"model.onnx", "model_int8.tflite", "retrained_graph.pb", "notes.txt",
            "report.json"} <= names
    assert "saved_model" not in names
    assert (model / "retrained_graph.pb").read_bytes() == graph_before
    files = json.loads((model / "metadata.json").read_text())["files"]
    assert files["graph"] == "retrained_graph.pb" and files["onnx"] == "model.onnx"
    assert Classifier.load(model).labels == list(sorted(COLOURS))


def test_export_refuses_unknown_formats_and_int8_without_images(tmp_path, tiny_backbone):
    images = make_colour_tree(tmp_path / "images", per_class=4)
    model = tmp_path / "model"
    train(tiny_config(images, model, tmp_path / "bn", head=HeadConfig(epochs=2)))
    result = CliRunner().invoke(cli, ["export", "--model-dir", str(model), "--format", "onnx,pt"])
    assert result.exit_code == 2 and "unknown format 'pt'" in result.output
    images.rename(tmp_path / "moved")
    result = CliRunner().invoke(cli, ["export", "--model-dir", str(model), "--format", "int8"])
    assert result.exit_code == 1 and "calibrate" in result.output
    assert "--image-dir" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["export", "--model-dir", str(model), "--format", "int8",
                                      "--image-dir", str(tmp_path / "moved")])
    assert result.exit_code == 0, result.output
    assert (model / "model_int8.tflite").is_file()
