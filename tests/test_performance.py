"""The fast paths: frozen graphs kept and spliced, bf16 extraction, bounded decoding."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY

from retrainer.backbones.factory import create_backbone
from retrainer.errors import RetrainerError


@pytest.fixture(scope="module")
def tiny():
    return create_backbone(TINY)


def pixels(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)


def test_composed_graph_equals_the_frozen_keras_classifier(tiny):
    import keras

    from retrainer.graph import INPUT_NAME, GraphRunner, compose, freeze
    from retrainer.head import build_head

    head = build_head(3, 4)
    inputs = keras.Input(tiny.model.input_shape[1:], name=INPUT_NAME)  # one Keras model
    whole = GraphRunner(freeze(keras.Model(inputs, head(tiny.model(inputs)))))
    spliced = GraphRunner(compose(freeze(tiny.model), freeze(head)))
    assert spliced.input_shape == (None, 32, 32, 3) and spliced.output_dim == 4
    np.testing.assert_allclose(spliced(pixels()), whole(pixels()), atol=1e-6)


def test_frozen_graph_is_kept_and_read_back_without_building(tiny, tmp_path, caplog):
    from retrainer.graph import GraphRunner, cached_freeze

    path = tmp_path / "g" / "frozen.pb"
    first = cached_freeze(path, lambda: tiny.model)
    assert path.is_file()

    def must_not_build():
        raise AssertionError("the kept graph should have been used")

    again = cached_freeze(path, must_not_build)
    np.testing.assert_array_equal(GraphRunner(again)(pixels()), GraphRunner(first)(pixels()))
    path.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="retrainer"):
        rebuilt = cached_freeze(path, lambda: tiny.model)
    assert "damaged" in caplog.text
    np.testing.assert_array_equal(GraphRunner(rebuilt)(pixels()), GraphRunner(first)(pixels()))


def test_optimized_graph_folds_batchnorm_and_scores_as_the_frozen_one():
    """The rewriting a session does on its first run, done ahead: same scores, fewer ops."""
    import keras

    from retrainer.graph import GraphRunner, freeze, optimize

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3), name="input")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    x = keras.layers.ReLU(6.0)(bn(x))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    gamma, beta, _, _ = bn.get_weights()
    rng = np.random.default_rng(1)
    bn.set_weights([gamma * 1.5, beta + 0.2, rng.normal(size=8) * 30, rng.uniform(1, 900, 8)])
    frozen = freeze(model)
    optimized = optimize(frozen)
    ops = {n.op for n in optimized.node}
    assert {"Rsqrt", "FusedBatchNormV3"} & {n.op for n in frozen.node}
    assert not {"Rsqrt", "FusedBatchNormV3"} & ops and len(optimized.node) < len(frozen.node)
    assert not [n.device for n in optimized.node if n.device]  # placement left to the session
    expected = GraphRunner(frozen)(pixels(6))
    for replicas in (1, 2):
        runner = GraphRunner(optimized, optimized=True, replicas=replicas)
        np.testing.assert_allclose(runner(pixels(6)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(expected, model(pixels(6)).numpy(), rtol=1e-4, atol=1e-3)


def test_bf16_copy_computes_in_bfloat16_close_to_fp32(tiny):
    from retrainer.graph import GraphRunner, freeze

    bf16 = create_backbone(TINY, precision="bf16")
    assert bf16.cache_id != tiny.cache_id and "-bf16-" in bf16.cache_id
    assert bf16.id_for("fp32") == tiny.cache_id
    model = bf16.model_for()
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {"mixed_bfloat16"}
    graph = freeze(model)
    assert any("T" in n.attr and n.attr["T"].type == 14 for n in graph.node)  # DT_BFLOAT16 ops in the graph
    a, b = GraphRunner(freeze(tiny.model))(pixels()), GraphRunner(graph)(pixels())
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2)
    assert not np.array_equal(a, b)  # really computed in lower precision


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(RetrainerError, match="unknown precision 'fp8'"):
        create_backbone(TINY, precision="fp8")


def test_bf16_training_caches_apart_and_exports_fp32(colour_tree, fast_config, tmp_path,
                                                    monkeypatch):
    from retrainer.graph import load_graph_def
    from retrainer.training import train

    monkeypatch.setenv("RETRAINER_CACHE_DIR", str(tmp_path / "cache"))
    fp32 = train(fast_config(colour_tree))
    bf16 = train(fast_config(colour_tree, backbone=dict(precision="bf16")))
    assert bf16.bottlenecks_computed == 36 and bf16.cache_dir != fp32.cache_dir
    graph = load_graph_def(bf16.outputs["graph"])
    assert not [n.name for n in graph.node if "T" in n.attr and n.attr["T"].type == 14]  # exported in fp32
    kept = sorted(p.name for p in (tmp_path / "cache" / "graphs").glob("*/frozen-graph-*.pb"))
    assert len(kept) == 2  # one per precision, in the cache dir
    assert not list((tmp_path / "bottlenecks").glob("*/*.pb"))
    assert bf16.validation_accuracy == fp32.validation_accuracy


def test_a_new_bottleneck_dir_reuses_the_kept_frozen_graph(colour_tree, fast_config, tmp_path,
                                                           monkeypatch):
    """The frozen graph, and the optimized one extraction runs, belong to the backbone, not to
    a data set or a bottleneck dir."""
    from retrainer.training import train

    monkeypatch.setenv("RETRAINER_CACHE_DIR", str(tmp_path / "cache"))
    train(fast_config(colour_tree, export=dict(formats=("graph", "tflite"))))
    graphs = tmp_path / "cache" / "graphs"
    kept = [*graphs.glob("*/frozen-graph-*.pb"), *graphs.glob("*/optimized-graph-*.pb"),
            *graphs.glob("*/tflite-graph-*.tflite")]
    assert len(kept) == 3
    stamps = [path.stat().st_mtime_ns for path in kept]
    again = train(fast_config(colour_tree, extraction=dict(bottleneck_dir=str(tmp_path / "other")),
                              export=dict(formats=("graph", "tflite"))))
    assert again.bottlenecks_computed == 36  # a new, empty bottleneck cache...
    assert [path.stat().st_mtime_ns for path in kept] == stamps  # ...and no graph made again


def test_decoding_keeps_a_bounded_window_in_flight():
    """Never more than ``window`` images read ahead of the consumer, however long the list."""
    import io

    from PIL import Image

    from retrainer.decoding import decode_stream
    from retrainer.sources.base import ImageRecord

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    lock = threading.Lock()
    reads = [0]

    def reader() -> bytes:
        with lock:
            reads[0] += 1
        return data

    items = [(str(i), ImageRecord(key=str(i), label="x", read=reader)) for i in range(200)]
    ahead = []
    for consumed, (_, _, px, err) in enumerate(decode_stream(items, (8, 8), "bilinear", 4, 10), 1):
        assert err is None and px.shape == (8, 8, 3)
        ahead.append(reads[0] - consumed)
    assert len(ahead) == 200 and max(ahead) <= 10


def test_cli_train_offers_precision():
    from retrainer.cli import cli

    result = CliRunner().invoke(cli, ["train", "--help"])
    assert "--precision [fp32|bf16]" in result.output
    bad = CliRunner().invoke(cli, ["train", "--image-dir", ".", "--precision", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output


def test_lazy_backbone_skips_the_build_when_its_weights_file_is_known(tmp_path):
    """A warm run needs the weights digest, not the model: it is remembered per weights file."""
    from retrainer.backbones import BackboneSpec, register, unregister

    built = []

    def builder(spec, weights):  # noqa: ANN001
        from conftest import tiny_builder

        built.append(weights)
        return tiny_builder(spec, weights)

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights v1")
    register(BackboneSpec("lazy_test", (32, 32), 0.0, 255.0, 3, builder), replace=True)
    try:
        first = create_backbone("lazy_test", str(weights), lazy=True)
        assert first.is_built and len(built) == 1
        second = create_backbone("lazy_test", str(weights), lazy=True)
        assert not second.is_built and second.cache_id == first.cache_id and len(built) == 1
        assert second.model.output_shape == (None, 3) and len(built) == 2  # built on demand
        weights.write_bytes(b"weights v2, a different size")
        assert create_backbone("lazy_test", str(weights), lazy=True).is_built  # changed: rebuilt
        create_backbone("lazy_test", "random", lazy=True)
        assert create_backbone("lazy_test", "random", lazy=True).is_built  # random: never memoised
    finally:
        unregister("lazy_test")


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_replicated_sessions_give_the_single_session_result(tiny, n):
    """A batch split over two sessions (own threads each) returns every row, in order."""
    from retrainer.graph import GraphRunner, freeze

    graph = freeze(tiny.model)
    single = GraphRunner(graph, replicas=1)
    split = GraphRunner(graph, replicas=2)
    assert (single.replicas, split.replicas) == (1, 2)
    x = pixels(n, seed=n)
    np.testing.assert_allclose(split(x), single(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.run_on(1, x[:1]), single(x[:1]), rtol=1e-5, atol=1e-6)
    split.close()


def test_pipelined_batches_come_back_in_order_with_their_tags(tiny):
    """``stream`` keeps several batches in flight over two sessions; each output is its own."""
    from retrainer.graph import GraphRunner, freeze

    graph = freeze(tiny.model)
    single = GraphRunner(graph, replicas=1)
    split = GraphRunner(graph, replicas=2)
    batches = [(f"b{i}", pixels(n, seed=i)) for i, n in enumerate([4, 1, 7, 2, 5, 3])]
    got = list(split.stream(iter(batches)))
    assert [tag for tag, _ in got] == [tag for tag, _ in batches]
    for (_, x), (_, out) in zip(batches, got):
        np.testing.assert_allclose(out, single(x), rtol=1e-5, atol=1e-6)
    plain = list(single.stream(iter(batches)))  # one session: one batch at a time
    assert [tag for tag, _ in plain] == [tag for tag, _ in batches]
    # a consumer that stops early leaves the runner usable
    assert next(split.stream(iter(batches)))[0] == "b0"
    np.testing.assert_allclose(split(batches[2][1]), single(batches[2][1]), rtol=1e-5, atol=1e-6)
    split.close()


def test_tensorflow_is_imported_without_keras_which_still_imports_later():
    """Labelling and exporting skip Keras's ~1.5 s import; building a backbone still gets it."""
    script = """
import sys
from retrainer._tf_internals import KERAS_EAGER_IMPORT, import_tensorflow
tf = import_tensorflow()
assert import_tensorflow() is tf
print(sorted(m for m in ("keras", "sklearn", KERAS_EAGER_IMPORT) if m in sys.modules))
import keras
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
print(model(tf.ones((1, 3))).shape, type(tf.keras.layers.Dense(1)).__module__.split(".")[0])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "(1, 2) keras"]
