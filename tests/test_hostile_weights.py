"""Hostile weights and model files: loading one never runs its code, and says so in one line."""
from __future__ import annotations

import collections
import os
import pickle

import pytest
from click.testing import CliRunner
from conftest import make_colour_tree

from retrainer.cli import cli
from retrainer.errors import RetrainerError, WeightsUnavailable

PICKLES = ("magic number", "protocol version", "sys info", "state dict", "storage keys")


class _Evil:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def hostile_pth(path, marker, position: int, protocol: int = 2):
    """A legacy .pth whose pickle number ``position`` carries the hostile global."""
    from retrainer.backbones.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION

    evil = _Evil(marker)
    pickles = [MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True, "protocol_version": 1001},
               collections.OrderedDict(), []]  # an empty state dict: no torch names needed
    pickles[position] = {
        0: evil,
        1: evil,
        2: {"little_endian": True, "type_sizes": evil},
        3: collections.OrderedDict([("_conv_stem.weight", evil)]),
        4: ["0", evil],
    }[position]
    with open(path, "wb") as f:
        for obj in pickles:
            pickle.dump(obj, f, protocol=protocol)
    return path


def test_the_payload_is_live(tmp_path):
    """Guard for the tests below: plain pickle really does run it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("position", range(len(PICKLES)), ids=PICKLES)
def test_reader_never_runs_a_hostile_global(tmp_path, position, protocol):
    from retrainer.backbones.torch_legacy import load_legacy_state_dict

    marker = tmp_path / "ran"
    evil = hostile_pth(tmp_path / "evil.pth", marker, position, protocol)
    with pytest.raises(WeightsUnavailable) as info:
        load_legacy_state_dict(evil)
    assert "not allowed" in info.value.message and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_colour_tree(tmp_path_factory.mktemp("hostile") / "images", per_class=3)


@pytest.mark.parametrize("position", range(len(PICKLES)), ids=PICKLES)
def test_train_with_hostile_pth_exits_1_cleanly(tmp_path, images, position):
    marker = tmp_path / "ran"
    evil = hostile_pth(tmp_path / "evil.pth", marker, position)
    result = CliRunner().invoke(cli, [
        "train", "--image-dir", str(images), "--architecture", "efficientnet_lite0",
        "--weights", str(evil), "--output-dir", str(tmp_path / "out"),
        "--bottleneck-dir", str(tmp_path / "bn")], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "evil.pth" in errors[0] and "not allowed" in errors[0], result.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _lambda_model(path, marker):
    """A .keras file whose Lambda layer writes the marker when its code runs."""
    import keras

    target = str(marker)

    inputs = keras.Input((8, 8, 3))
    touch = lambda x: (open(target, "w").close(), x)[1]  # noqa: E731, SIM115 - serialised as code
    x = keras.layers.Lambda(touch, output_shape=(8, 8, 3))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x).save(path)
    marker.unlink(missing_ok=True)  # building the model above ran it once
    return path


def test_keras_file_with_code_is_refused(tmp_path):
    from retrainer.backbones.keras_file import spec_for_file

    marker = tmp_path / "ran"
    path = _lambda_model(tmp_path / "lambda.keras", marker)
    with pytest.raises(RetrainerError) as info:
        spec_for_file(path)
    assert "holds Python code" in info.value.message and "\n" not in info.value.message
    assert not marker.exists()
    result = CliRunner().invoke(cli, ["train", "--image-dir", str(tmp_path), "--architecture",
                                      str(path), "--output-dir", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "Error: " in result.output and "holds Python code" in result.output
    assert not marker.exists()


def test_weights_and_model_files_that_are_folders_or_junk_say_what_they_are(tmp_path):
    from retrainer.backbones.efficientnet_lite import build
    from retrainer.backbones.keras_file import spec_for_file
    from retrainer.backbones.registry import get_spec

    folder = tmp_path / "weights.pth"
    folder.mkdir()
    with pytest.raises(WeightsUnavailable, match=r"weights\.pth is a folder, not a file"):
        build(get_spec("efficientnet_lite0"), str(folder))
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build(get_spec("efficientnet_lite0"), str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.keras"
    junk.write_bytes(os.urandom(512))
    with pytest.raises(WeightsUnavailable, match=r"is not a Keras model file") as info:
        spec_for_file(junk)
    assert "model.save('NAME.keras')" in (info.value.hint or "")
    with pytest.raises(WeightsUnavailable, match="is a folder, not a file"):
        spec_for_file(folder)
