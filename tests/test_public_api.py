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
