"""Fine-tuning: only the top layers move, BatchNorm statistics stay, the export follows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_colour_tree

from retrainer.config import BackboneConfig, FineTuneConfig
from retrainer.training import train

CONV = "tiny_conv_test_backbone"


def conv_builder(spec, weights):  # noqa: ANN001 - registry builder signature
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((*spec.input_size, 3), name="input")
    x = keras.layers.Rescaling(1.0 / 255, name="preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="low_conv")(x)
    x = keras.layers.BatchNormalization(name="low_bn")(x)
    x = keras.layers.Conv2D(4, 1, name="top_conv")(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="avg_pool")(x))


@pytest.fixture(scope="module", autouse=True)
def conv_backbone():
    from retrainer.backbones import BackboneSpec, register, unregister

    register(BackboneSpec(CONV, (32, 32), 0.0, 1.0, 4, conv_builder, weights="none"), replace=True)
    yield
    unregister(CONV)


def test_unfreeze_top_leaves_batchnorm_and_lower_layers_frozen():
    from retrainer.backbones.factory import create_backbone
    from retrainer.finetune import unfreeze_top

    model = create_backbone(CONV).model
    top = unfreeze_top(model, 1)
    assert [layer.name for layer in top] == ["top_conv"]
    trainable = {layer.name for layer in model.layers if layer.trainable and layer.weights}
    assert trainable == {"top_conv"}


def test_fine_tune_moves_only_the_top_and_keeps_batchnorm_statistics():
    from retrainer.backbones.factory import create_backbone
    from retrainer.finetune import fine_tune
    from retrainer.head import build_head

    model = create_backbone(CONV).model
    head = build_head(4, 3)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 32, 32, 3)).astype(np.uint8)
    y = np.arange(24) % 3
    result = fine_tune(model, head, 3, x, y, x[:0], y[:0], layers=1, epochs=2,
                       learning_rate=0.05, batch_size=8)
    assert result.best_epoch == 2 and result.trainable_layers == ["top_conv"]
    after = {layer.name: layer.get_weights() for layer in model.layers}
    for name in ("low_conv", "low_bn", "top_bn"):  # BN moving mean/variance included
        for old, new in zip(before[name], after[name]):
            np.testing.assert_array_equal(old, new)
    assert not np.allclose(before["top_conv"][0], after["top_conv"][0])


def test_fine_tune_trains_the_top_and_exports_it(tmp_path: Path, fast_config):
    from retrainer.predict import Classifier

    root = make_colour_tree(tmp_path / "img", per_class=10)
    config = fast_config(root, fine_tune=FineTuneConfig(layers=1, epochs=3, learning_rate=0.01),
                         source=dict(validation_percentage=20, testing_percentage=20),
                         backbone=BackboneConfig(CONV))
    result = train(config)
    tuned = [row for row in result.history if row.get("fine_tune")]
    assert len(tuned) == 3 and all("val_loss" in row for row in tuned)
    assert result.timings["fine_tune"] > 0
    meta_path = Path(config.export.output_dir) / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["training"]["fine_tuned"] is True
    # The export and the reported test accuracy come from the same (fine-tuned) model.
    classifier = Classifier.load(config.export.output_dir)
    test_paths = [m for m in (root / c for c in sorted(COLOURS))]
    records = [p for d in test_paths for p in sorted(d.iterdir())]
    labels = [classifier.labels.index(p.parent.name) for p in records]
    probs = np.stack([r.probabilities for r in classifier.label_paths([str(p) for p in records])])
    assert (probs.argmax(1) == np.array(labels)).mean() >= 0.9
    assert result.test_accuracy is not None
