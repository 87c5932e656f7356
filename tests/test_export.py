"""The exported files work without retrainer and agree with each other and with `label`."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import COLOURS, TINY, make_colour_tree, make_image, tiny_config
from ai_edge_litert.interpreter import Interpreter  # LiteRT, tf.lite.Interpreter's successor
from PIL import Image

from retrainer.predict import Classifier
from retrainer.training import train


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_backbone):
    base = tmp_path_factory.mktemp("export")
    root = make_colour_tree(base / "images")
    config = tiny_config(root, base / "model", base / "bn",
                         export=dict(formats=("graph", "saved_model", "tflite")))
    train(config)
    probes = [make_image(base / "probe" / f"{name}.png", rgb, seed=7) for name, rgb in COLOURS.items()]
    return base / "model", probes


def pixels(paths, size=(32, 32)):
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize(size), np.float32) for p in paths])


def test_frozen_graph_loads_with_plain_tensorflow(export):
    import tensorflow as tf

    model_dir, probes = export
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((model_dir / "retrained_graph.pb").read_bytes())
    assert not [n.name for n in graph_def.node if n.op in ("VarHandleOp", "VariableV2")]
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as sess:
            probs = sess.run("final_result:0", {"input:0": pixels(probes)})
    labels = (model_dir / "retrained_labels.txt").read_text(encoding="utf-8").splitlines()
    assert [labels[i] for i in probs.argmax(1)] == list(COLOURS)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_label_equals_saved_model_and_tflite(export):
    import tensorflow as tf

    model_dir, probes = export
    classifier = Classifier.load(model_dir)
    results = list(classifier.label_paths([str(p) for p in probes], top_k=3))
    ours = np.stack([r.probabilities for r in results])
    assert [r.predictions[0].label for r in results] == list(COLOURS)

    batch = pixels(probes)
    saved = tf.saved_model.load(str(model_dir / "saved_model"))
    served = saved.signatures["serving_default"](images=tf.constant(batch))["scores"].numpy()
    np.testing.assert_allclose(served, ours, atol=1e-4)

    interpreter = Interpreter(model_path=str(model_dir / "model.tflite"))
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["scores"]}}
    runner = interpreter.get_signature_runner("serving_default")
    lite = np.concatenate([runner(images=batch[i:i + 1])["scores"] for i in range(len(batch))])
    np.testing.assert_allclose(lite, ours, atol=1e-4)
    np.testing.assert_allclose(runner(images=batch)["scores"], ours, atol=1e-4)  # any batch size


def test_tflite_head_appended_to_a_kept_backbone_equals_converting_the_whole(tiny_backbone):
    """The export appends the head to the backbone's kept TFLite model instead of converting
    the whole classifier again: same operators, same scores."""
    import tensorflow as tf

    from retrainer.backbones.factory import create_backbone
    from retrainer.export import schema, tflite_with_head, with_signature
    from retrainer.graph import tflite_model
    from retrainer.graph import compose, dense_softmax_graph, freeze

    rng = np.random.default_rng(5)
    kernel, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    backbone = freeze(create_backbone(TINY).model)
    appended = tflite_with_head(tflite_model(backbone), kernel, bias)
    whole = with_signature(tflite_model(compose(backbone, dense_softmax_graph(kernel, bias))))

    def operators(blob):
        model = schema().ModelT.InitFromPackedBuf(blob, 0)
        codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
        return [codes[op.opcodeIndex] for op in model.subgraphs[0].operators]

    assert operators(appended) == operators(whole)
    batch = rng.uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    scores = []
    for blob in (appended, whole):
        interpreter = Interpreter(model_content=blob)
        assert interpreter.get_signature_list() == {
            "serving_default": {"inputs": ["images"], "outputs": ["scores"]}}
        scores.append(interpreter.get_signature_runner("serving_default")(images=batch)["scores"])
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)
    assert not np.allclose(scores[0], scores[0][:1])  # the images score differently


def test_saved_model_takes_encoded_image_bytes(export):
    import tensorflow as tf

    model_dir, probes = export
    saved = tf.saved_model.load(str(model_dir / "saved_model"))
    encoded = []
    for p in probes:
        buf = io.BytesIO()
        Image.open(p).save(buf, format="JPEG", quality=95)
        encoded.append(buf.getvalue())
    scores = saved.signatures["classify_images"](image_bytes=tf.constant(encoded))["scores"].numpy()
    labels = (model_dir / "retrained_labels.txt").read_text(encoding="utf-8").splitlines()
    assert [labels[i] for i in scores.argmax(1)] == list(COLOURS)


def test_label_reports_bad_images_and_keeps_going(export, tmp_path):
    model_dir, probes = export
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    results = list(Classifier.load(model_dir).label_paths([str(probes[0]), str(bad), str(probes[1])]))
    assert [r.error is None for r in results] == [True, False, True]
    assert "not an image" in results[1].error
    assert results[2].predictions[0].label == list(COLOURS)[1]


def test_label_results_keep_the_input_order_across_batches(export, tmp_path):
    model_dir, probes = export
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    good = [str(p) for p in probes]
    paths = [str(bad)] + good[:3] + [str(bad)] + good * 3 + [str(bad), str(bad)]
    results = list(Classifier.load(model_dir).label_paths(paths, batch_size=2))
    assert [r.path for r in results] == paths
    assert [r.error is None for r in results] == [p != str(bad) for p in paths]


def test_graph_and_labels_files_without_a_model_dir(export):
    model_dir, probes = export
    classifier = Classifier.load(None, graph=str(model_dir / "retrained_graph.pb"),
                                 labels=str(model_dir / "retrained_labels.txt"))
    assert classifier.input_size == (32, 32)
    assert next(classifier.label_paths([str(probes[2])])).predictions[0].label == list(COLOURS)[2]


def test_mismatched_labels_file_is_a_clear_error(export, tmp_path):
    from retrainer.errors import ModelDirError

    model_dir, _ = export
    labels = tmp_path / "labels.txt"
    labels.write_text("just\ntwo\n", encoding="utf-8")
    with pytest.raises(ModelDirError, match="3 outputs but the labels file lists 2"):
        Classifier.load(None, graph=str(model_dir / "retrained_graph.pb"), labels=str(labels))


# -- the export as one set ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_graph(tiny_backbone):
    from retrainer.backbones.factory import create_backbone
    from retrainer.graph import compose, dense_softmax_graph, freeze

    rng = np.random.default_rng(3)
    kernel, bias = rng.normal(size=(3, 3)).astype(np.float32), np.zeros(3, np.float32)
    return compose(freeze(create_backbone(TINY).model), dense_softmax_graph(kernel, bias))


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_an_export_replaces_the_previous_model_as_a_whole(classifier_graph, tmp_path):
    import json

    from retrainer.export import export_graph

    out = tmp_path / "model"
    export_graph(classifier_graph, ["a", "b", "c"], {"run": 1}, out)
    assert {"retrained_graph.pb", "model.tflite", "saved_model", "metadata.json"} <= \
        {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text("{}")  # the old model's evaluation
    export_graph(classifier_graph, ["x", "y", "z"], {"run": 2}, out, formats=("graph",))
    assert sorted(p.name for p in out.iterdir()) == [
        "metadata.json", "notes.txt", "retrained_graph.pb", "retrained_labels.txt"]
    assert json.loads((out / "metadata.json").read_text())["run"] == 2
    assert (out / "retrained_labels.txt").read_text() == "x\ny\nz\n"
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging left behind


@pytest.mark.parametrize("failure", [RuntimeError("converter crashed"),
                                     OSError(28, "No space left on device")])
def test_an_export_that_fails_half_way_leaves_the_old_model_intact(classifier_graph, tmp_path,
                                                                   monkeypatch, failure):
    from retrainer import export
    from retrainer.errors import FolderNotWritable

    out = tmp_path / "model"
    export.export_graph(classifier_graph, ["a", "b", "c"], {"run": 1}, out)
    before = _files(out)

    def broken(*args, **kwargs):  # after the graph, labels and SavedModel were written
        raise failure

    monkeypatch.setattr(export, "with_signature", broken)
    expected = FolderNotWritable if isinstance(failure, OSError) else RuntimeError
    with pytest.raises(expected) as info:
        export.export_graph(classifier_graph, ["x", "y", "z"], {"run": 2}, out)
    if expected is FolderNotWritable:
        assert "No space left" in info.value.message and str(out) in info.value.message
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_explicit_graph_and_labels_paths_still_work(classifier_graph, tmp_path):
    import json

    from retrainer.export import export_graph

    written = export_graph(classifier_graph, ["a", "b", "c"], {}, tmp_path / "model",
                           formats=("graph",), output_graph=str(tmp_path / "g" / "x.pb"),
                           output_labels=str(tmp_path / "model" / "names.txt"))
    assert (tmp_path / "g" / "x.pb").is_file()
    assert (tmp_path / "model" / "names.txt").read_text() == "a\nb\nc\n"
    files = json.loads((tmp_path / "model" / "metadata.json").read_text())["files"]
    assert files["labels"] == "names.txt" and files["graph"] == str((tmp_path / "g" / "x.pb"))
    assert set(written) == {"labels", "graph", "metadata"}
    assert Classifier.load(None, graph=written["graph"], labels=written["labels"]).labels == \
        ["a", "b", "c"]


def test_an_export_into_the_working_directory_is_renamed_in_file_by_file(classifier_graph,
                                                                        tmp_path, monkeypatch):
    from retrainer.export import export_graph

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    export_graph(classifier_graph, ["a", "b", "c"], {}, ".", formats=("graph", "tflite"))
    export_graph(classifier_graph, ["a", "b", "c"], {}, ".", formats=("graph",))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metadata.json", "photos", "retrained_graph.pb", "retrained_labels.txt"]


@pytest.mark.parametrize("name, shown", [("cat\ndog", "control character"),
                                         ("tab\there", "control character"),
                                         ("caf\udce9", "caf\\xe9' is not valid UTF-8")])
def test_labels_that_a_labels_file_cannot_hold_are_refused_by_name(classifier_graph, tmp_path,
                                                                   name, shown):
    from retrainer.errors import DatasetError
    from retrainer.export import export_graph

    with pytest.raises(DatasetError, match="class folder name") as info:
        export_graph(classifier_graph, ["a", name, "c"], {}, tmp_path / "model")
    assert shown in info.value.message and info.value.hint
    assert "\n" not in info.value.message
    assert not (tmp_path / "model").exists()


def test_an_output_folder_that_cannot_be_created_is_named(classifier_graph, tmp_path):
    from retrainer.errors import FolderNotWritable
    from retrainer.export import export_graph

    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderNotWritable, match="output folder") as info:
        export_graph(classifier_graph, ["a", "b", "c"], {}, tmp_path / "file" / "model")
    assert str(tmp_path / "file" / "model") in info.value.message and info.value.hint
