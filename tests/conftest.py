"""Shared fixtures: generated images and a tiny backbone, so tests need no downloads."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue sky": (20, 40, 230)}
TINY = "tiny_test_backbone"


def make_image(path: Path, colour: tuple[int, int, int], size: int = 32, seed: int = 0,
               fmt: str | None = None) -> Path:
    """A noisy solid-colour image: easy to classify, different bytes for every seed."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_colour_tree(root: Path, per_class: int = 12, colours: dict | None = None) -> Path:
    """root/<colour name>/<i>.png for each colour."""
    for c, (name, rgb) in enumerate((colours or COLOURS).items()):
        for i in range(per_class):
            make_image(root / name / f"img{i:03d}.png", rgb, seed=1000 * c + i)
    return root


def loaded_after_help(commands: list[list[str]], modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after printing these commands' help."""
    code = ("import json, sys; from retrainer.cli import cli\n"
            f"for args in {commands!r}:\n"
            "    try: cli(args, prog_name='retrainer')\n"
            "    except SystemExit: pass\n"
            f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_config(image_dir: Path | str | None, output_dir: Path | str, bottleneck_dir: Path | str,
                **groups):  # noqa: ANN003, ANN201
    """A TrainConfig for the tiny backbone that trains in a second or two, exporting the graph
    only (SavedModel/TFLite are tested on their own). Each of ``groups`` is a TrainConfig
    field: a config group as it is, or a dict of fields changed in this helper's group."""
    from retrainer.config import (BackboneConfig, ExportConfig, ExtractionConfig, HeadConfig,
                                  SourceConfig, TrainConfig)

    config = TrainConfig(
        source=SourceConfig(image_dir=None if image_dir is None else str(image_dir)),
        backbone=BackboneConfig(TINY),
        extraction=ExtractionConfig(bottleneck_dir=str(bottleneck_dir)),
        head=HeadConfig(epochs=12, learning_rate=0.3, dropout=0.0, l2=0.0),
        export=ExportConfig(output_dir=str(output_dir), formats=("graph",)))
    for name, value in groups.items():
        if isinstance(value, dict):
            value = dataclasses.replace(getattr(config, name), **value)
        setattr(config, name, value)
    return config


def train_tiny_model(root: Path) -> Path:
    """A colour classifier on the tiny backbone, exported (graph only) to root/model."""
    from retrainer.training import train

    images = make_colour_tree(root / "images", per_class=8)
    train(tiny_config(images, root / "model", root / "bn"))
    return root / "model"


def tiny_builder(spec, weights):  # noqa: ANN001 - registry builder signature
    """Input -> per-channel mean colour: enough to tell solid colours apart."""
    import keras

    inputs = keras.Input((*spec.input_size, 3), name="input")
    x = keras.layers.Rescaling(1.0 / spec.std, offset=-spec.mean / spec.std, name="preprocess")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="avg_pool")(x))


def pixel_dense_builder(seed: int):  # noqa: ANN201
    """A registry builder whose bottleneck is a fixed linear map (weights drawn with ``seed``)
    of every normalised pixel: resizing or mirroring the image changes it."""

    def build(spec, weights):  # noqa: ANN001, ANN202 - registry builder signature
        import keras

        inputs = keras.Input((*spec.input_size, 3), name="input")
        x = keras.layers.Rescaling(1.0 / spec.std, offset=-spec.mean / spec.std,
                                   name="preprocess")(inputs)
        x = keras.layers.Flatten()(x)
        dense = keras.layers.Dense(spec.feature_dim, name="features",
                                   kernel_initializer=keras.initializers.RandomNormal(seed=seed),
                                   bias_initializer="zeros")
        return keras.Model(inputs, dense(x))

    return build


def registered_backbone(name: str, size: int, dim: int, builder, mean: float = 0.0):  # noqa: ANN001
    """Register a test backbone (``size`` px, ``dim``-d bottleneck) while the generator lives."""
    from retrainer.backbones import BackboneSpec, register, unregister

    register(BackboneSpec(name, (size, size), mean, 255.0, dim, builder, weights="none"),
             replace=True)
    yield name
    unregister(name)


@pytest.fixture(scope="session", autouse=True)
def tiny_backbone():
    """Registers 'tiny_test_backbone' (32x32, 3-d bottleneck) for every test."""
    yield from registered_backbone(TINY, 32, 3, tiny_builder)


@pytest.fixture(scope="session", autouse=True)
def retrainer_cache_dir(tmp_path_factory):
    """Never write to the real user cache from tests; converted weights are shared per session."""
    root = tmp_path_factory.mktemp("retrainer-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("RETRAINER_CACHE_DIR", str(root))
    yield root
    patch.undo()


@pytest.fixture
def colour_tree(tmp_path: Path) -> Path:
    return make_colour_tree(tmp_path / "images")


@pytest.fixture
def fast_config(tmp_path: Path):
    """:func:`tiny_config` exporting to tmp_path/out, caching in tmp_path/bottlenecks."""

    def make(image_dir: Path | None, **groups):  # noqa: ANN003, ANN202
        return tiny_config(image_dir, tmp_path / "out", tmp_path / "bottlenecks", **groups)

    return make
