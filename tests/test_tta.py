"""Mirror averaging (``tta="flip"``) folded into the backbone: the cache, the frozen graph and
the exports all apply it, and plain and mirrored bottlenecks never share a cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import pixel_dense_builder, registered_backbone

ASYM = "tta_asymmetric_test_backbone"


@pytest.fixture(scope="module", autouse=True)
def asymmetric_backbone():
    yield from registered_backbone(ASYM, 8, 4, pixel_dense_builder(seed=7))


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)


def test_flip_backbone_gives_the_mean_of_the_image_and_its_mirror():
    from retrainer.backbones.factory import create_backbone

    plain = create_backbone(ASYM).model
    flip = create_backbone(ASYM, tta="flip").model
    x = _images()
    f_x = np.asarray(plain(x))
    f_mirror = np.asarray(plain(x[:, :, ::-1, :]))
    assert np.abs(f_x - f_mirror).max() > 1e-2  # the backbone itself is not mirror-invariant
    np.testing.assert_allclose(np.asarray(flip(x)), (f_x + f_mirror) / 2, rtol=1e-5, atol=1e-5)
    assert flip.output_shape[-1] == 4


def test_frozen_flip_graph_gives_an_image_and_its_mirror_one_bottleneck(tmp_path):
    from retrainer.backbones.factory import create_backbone
    from retrainer.bottlenecks.extractor import make_forward

    forward = make_forward(create_backbone(ASYM, tta="flip"), tmp_path / "graphs")
    x = _images(4, seed=1)
    a, b = forward(x), forward(np.ascontiguousarray(x[:, :, ::-1, :]))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    plain = make_forward(create_backbone(ASYM), tmp_path / "graphs")
    assert np.abs(plain(x) - a).max() > 1e-3  # a separate graph, not the plain one


def test_cache_id_differs_between_none_and_flip():
    from retrainer.backbones.factory import create_backbone

    plain, flip = create_backbone(ASYM), create_backbone(ASYM, tta="flip")
    assert plain.weights_digest == flip.weights_digest  # same weights ...
    assert plain.cache_id != flip.cache_id  # ... other bottlenecks
    assert plain.id_for("bf16") != flip.id_for("bf16")
    assert "-ttaflip-" not in plain.cache_id and "-fp32-ttaflip-" in flip.cache_id
    assert flip.spec.option("tta") == "flip" and plain.spec.option("tta") is None


def test_unknown_tta_is_a_one_line_error():
    from retrainer.backbones.factory import create_backbone
    from retrainer.errors import RetrainerError

    with pytest.raises(RetrainerError, match="unknown test-time augmentation 'rot'"):
        create_backbone(ASYM, tta="rot")


def _asymmetric_tree(root: Path) -> Path:
    """Two classes told apart by which half is bright; each image also has a mirrored twin."""
    rng = np.random.default_rng(3)
    for c, name in enumerate(("left", "right")):
        for i in range(6):
            arr = rng.uniform(0, 60, (8, 8, 3))
            arr[:, :4] += 150 if c == 0 else 0
            arr[2:6, (1 if c == 0 else 5):(3 if c == 0 else 7), 0] += 40
            arr[:4, :, 1] += 30 * (i % 3)
            path = root / name / f"img{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return root


def test_train_with_flip_exports_a_graph_label_agrees_with(tmp_path):
    from retrainer.backbones.factory import create_backbone
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, HeadConfig,
                                  SourceConfig, TrainConfig)
    from retrainer.predict import Classifier
    from retrainer.training import train

    images = _asymmetric_tree(tmp_path / "images")
    config = TrainConfig(
        source=SourceConfig(image_dir=str(images), validation_percentage=0, testing_percentage=0),
        backbone=BackboneConfig(ASYM, tta="flip"),
        extraction=ExtractionConfig(bottleneck_dir=str(tmp_path / "bn")),
        head=HeadConfig(search="off", epochs=5),
        export=ExportConfig(output_dir=str(tmp_path / "model"),
                            formats=("graph", "tflite", "onnx")))
    result = train(config)
    meta = json.loads((tmp_path / "model" / "metadata.json").read_text())
    flip = create_backbone(ASYM, tta="flip")
    assert meta["backbone"]["options"]["tta"] == "flip"
    assert meta["backbone_cache_id"] == flip.cache_id
    assert Path(result.cache_dir).name == flip.cache_id

    files = sorted((images / "left").glob("*.png")) + sorted((images / "right").glob("*.png"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in files])
    kernel, bias = _head_weights(tmp_path / "model")
    logits = np.asarray(flip.model(pixels)) @ kernel + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)

    scores = Classifier.load(str(tmp_path / "model")).predict(pixels)  # what 'label' runs
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert (scores.argmax(1) == [0] * 6 + [1] * 6).all()
    mirrored = Classifier.load(str(tmp_path / "model")).predict(
        np.ascontiguousarray(pixels[:, :, ::-1, :]))
    np.testing.assert_allclose(mirrored, scores, rtol=1e-4, atol=1e-5)

    # The TFLite and ONNX exports are built from the same backbone graph: they average too.
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tmp_path / "model" / "model.tflite")
                         ).get_signature_runner("serving_default")
    np.testing.assert_allclose(runner(images=pixels)["scores"], expected, rtol=1e-4, atol=1e-5)
    session = onnxruntime.InferenceSession(str(tmp_path / "model" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run(None, {session.get_inputs()[0].name: pixels})
    np.testing.assert_allclose(onnx_scores, expected, rtol=1e-4, atol=1e-5)


def _head_weights(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The head's (4, 2) kernel and (2,) bias, read from the exported graph's constants."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString((model_dir / "retrained_graph.pb").read_bytes())
    consts = [tf.make_ndarray(n.attr["value"].tensor) for n in graph.node if n.op == "Const"]
    kernel = [c for c in consts if c.shape == (4, 2)]
    bias = [c for c in consts if c.shape == (2,) and c.dtype == np.float32]
    assert len(kernel) == 1 and len(bias) == 1, "the head's weights are not unambiguous"
    return kernel[0], bias[0]


def test_cli_fills_a_separate_cache_with_tta_flip_and_refuses_it_with_fine_tune(tmp_path):
    from click.testing import CliRunner

    from retrainer.cli import cli

    images = _asymmetric_tree(tmp_path / "images")
    bn = tmp_path / "bn"
    dirs = []
    for tta in ("none", "flip"):
        result = CliRunner().invoke(cli, ["bottlenecks", "--image-dir", str(images),
                                          "--architecture", ASYM, "--bottleneck-dir", str(bn),
                                          "--tta", tta, "--json"])
        assert result.exit_code == 0, result.output
        done, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])
        assert done["computed"] == 12
        dirs.append(Path(done["cache_dir"]).name)
    assert dirs[0] != dirs[1] and "-ttaflip-" in dirs[1]

    result = CliRunner().invoke(cli, ["train", "--image-dir", str(images), "--architecture", ASYM,
                                      "--bottleneck-dir", str(bn), "--tta", "flip",
                                      "--fine-tune", "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 1 and "fine-tuning with test-time augmentation" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["train", "--image-dir", str(images), "--tta", "rot"])
    assert result.exit_code == 2 and "'rot' is not one of" in result.output
