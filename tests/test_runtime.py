"""Exported models on LiteRT: the same scores as the frozen graph on TensorFlow, no TF import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrainer.errors import ModelDirError
from retrainer.predict import Classifier
from retrainer.runner import LiteRTRunner

from conftest import COLOURS, make_image

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import tiny_config
    from retrainer.training import train

    from conftest import make_colour_tree

    root = tmp_path_factory.mktemp("runtime")
    images = make_colour_tree(root / "images", per_class=8)
    train(tiny_config(images, root / "model", root / "bn",
                      export=dict(formats=("graph", "tflite"))))
    return root / "model"


def test_litert_scores_match_the_frozen_graph(model_dir: Path, tmp_path: Path) -> None:
    paths = [str(make_image(tmp_path / f"{i}.png", rgb, seed=500 + i))
             for i, rgb in enumerate(COLOURS.values())]
    tf_model = Classifier.load(model_dir, runtime="tensorflow")
    lite = Classifier.load(model_dir, runtime="litert")
    assert (tf_model.runtime, lite.runtime) == ("tensorflow", "litert")
    a = [r.probabilities for r in tf_model.label_paths(paths)]
    b = [r.probabilities for r in lite.label_paths(paths)]
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-4
    assert [np.argmax(x) for x in a] == [np.argmax(x) for x in b]
    tops = [r.predictions[0].label for r in lite.label_paths(paths)]
    assert tops == list(COLOURS)


def test_lanes_split_a_batch_and_keep_order(model_dir: Path) -> None:
    runner = LiteRTRunner(model_dir / "model.tflite", threads=2, replicas=2)
    batch = np.random.default_rng(0).uniform(0, 255, (7, 32, 32, 3)).astype(np.float32)
    whole = runner(batch)
    one_by_one = np.concatenate([runner.run_on(0, batch[i:i + 1]) for i in range(7)])
    assert whole.shape == (7, 3) and np.allclose(whole, one_by_one, atol=1e-6)
    streamed = [tag for tag, _ in runner.stream((i, batch[i:i + 2]) for i in range(4))]
    assert streamed == [0, 1, 2, 3]
    runner.close()


def test_auto_runs_litert_without_importing_tensorflow(model_dir: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "x.png", COLOURS["red"], seed=9)
    code = ("import sys; from retrainer.predict import Classifier\n"
            f"c = Classifier.load({str(model_dir)!r})\n"
            f"r = next(c.label_paths([{str(image)!r}]))\n"
            "print(c.runtime, r.predictions[0].label, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["litert", "red", "False"]


def test_auto_falls_back_to_tensorflow_without_a_tflite_file(model_dir: Path, tmp_path: Path) -> None:
    graph_only = tmp_path / "m"
    graph_only.mkdir()
    for name in ("retrained_graph.pb", "retrained_labels.txt", "metadata.json"):
        (graph_only / name).write_bytes((model_dir / name).read_bytes())
    assert Classifier.load(graph_only).runtime == "tensorflow"
    with pytest.raises(ModelDirError, match="no model.tflite"):
        Classifier.load(graph_only, runtime="litert")
    with pytest.raises(ModelDirError, match="unknown runtime 'onnx'"):
        Classifier.load(graph_only, runtime="onnx")


def test_a_damaged_tflite_file_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "b"
    broken.mkdir()
    for name in ("retrained_graph.pb", "retrained_labels.txt", "metadata.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "model.tflite").write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(ModelDirError, match="not a TFLite model"):
        Classifier.load(broken, runtime="litert")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_every_runtime_scores_an_export_as_tensorflow_does(model_dir: Path, tmp_path: Path,
                                                          runtime: str) -> None:
    from retrainer.runtimes import installed

    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    paths = [str(make_image(tmp_path / f"{i}.png", rgb, seed=700 + i))
             for i, rgb in enumerate(COLOURS.values())]
    reference = Classifier.load(model_dir, runtime="tensorflow")
    other = Classifier.load(model_dir, runtime=runtime)
    assert other.runtime == runtime
    a = np.array([r.probabilities for r in reference.label_paths(paths)])
    b = np.array([r.probabilities for r in other.label_paths(paths)])
    assert np.abs(a - b).max() < 1e-5
    assert [r.predictions[0].label for r in other.label_paths(paths)] == list(COLOURS)
