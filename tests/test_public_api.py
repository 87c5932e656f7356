"""The lazy public API: every documented name resolves, and importing it loads no TensorFlow."""
from __future__ import annotations

import subprocess
import sys

import pytest

import retrainer


def test_public_names_resolve_without_tensorflow() -> None:
    code = ("import sys, retrainer\n"
            "for name in retrainer.__all__: getattr(retrainer, name)\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_public_names_are_the_library_objects() -> None:
    from retrainer.config import TrainConfig
    from retrainer.predict import Classifier
    from retrainer.training import train

    assert retrainer.train is train
    assert retrainer.Classifier is Classifier
    assert retrainer.TrainConfig is TrainConfig
    assert "efficientnet_lite0" in retrainer.list_backbones()
    assert set(retrainer.__all__) <= set(dir(retrainer))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        retrainer.nope  # noqa: B018


def test_a_grouped_config_trains_through_the_public_names(tmp_path) -> None:
    """The README's Library example, on the tiny backbone: one TrainConfig of config groups."""
    from conftest import TINY, make_colour_tree

    images = make_colour_tree(tmp_path / "photos", per_class=8)
    config = retrainer.TrainConfig(
        source=retrainer.SourceConfig(image_dir=str(images), testing_percentage=25),
        backbone=retrainer.BackboneConfig(TINY),
        extraction=retrainer.ExtractionConfig(bottleneck_dir=str(tmp_path / "bn")),
        export=retrainer.ExportConfig(output_dir=str(tmp_path / "model"), formats=("graph",)))
    result = retrainer.train(config)
    assert result.backbone == TINY and result.test_accuracy == 1.0
    assert result.outputs["graph"].startswith(str(tmp_path / "model"))
    [labelled] = retrainer.Classifier.load(str(tmp_path / "model")).label_paths(
        [str(images / "red" / "img000.png")])
    assert labelled.predictions[0].label == "red"
    assert retrainer.TrainConfig().fine_tune is None  # off unless a FineTuneConfig is given
