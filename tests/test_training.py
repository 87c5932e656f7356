"""train(): the pipeline end to end on generated colours with the tiny backbone."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COLOURS, make_colour_tree, make_image

from retrainer.config import AugmentConfig, HeadConfig
from retrainer.errors import AccuracyGateFailed, DatasetError
from retrainer.training import train


def test_train_exports_everything_and_learns_the_colours(colour_tree, fast_config):
    config = fast_config(colour_tree, source=dict(testing_percentage=25),
                         export=dict(formats=("graph", "saved_model", "tflite")))
    result = train(config)
    assert result.labels == sorted(COLOURS)
    assert result.bottlenecks_computed == 36 and result.bottlenecks_cached == 0
    assert result.test is not None and result.test.n > 0 and result.test_accuracy == 1.0
    out = config.export.output_dir
    for name in ("retrained_graph.pb", "retrained_labels.txt", "model.tflite", "metadata.json",
                 "saved_model/saved_model.pb"):
        assert (result_path := __import__("pathlib").Path(out) / name).exists(), result_path
    labels = open(f"{out}/retrained_labels.txt", encoding="utf-8").read().splitlines()
    assert labels == sorted(COLOURS)  # "blue sky" kept verbatim
    meta = json.load(open(f"{out}/metadata.json", encoding="utf-8"))
    assert meta["backbone"]["input_size"] == [32, 32] and meta["labels"] == labels
    assert meta["backbone"]["mean"] == 0.0 and meta["backbone"]["std"] == 255.0
    assert meta["training"]["test_accuracy"] == 1.0


def test_second_run_computes_nothing_and_edits_are_recomputed(colour_tree, fast_config):
    train(fast_config(colour_tree))
    again = train(fast_config(colour_tree))
    assert (again.bottlenecks_computed, again.bottlenecks_cached) == (0, 36)
    (colour_tree / "red" / "img000.png").rename(colour_tree / "red" / "renamed.png")
    make_image(colour_tree / "red" / "img001.png", COLOURS["red"], seed=424242)  # edited
    third = train(fast_config(colour_tree))
    assert (third.bottlenecks_computed, third.bottlenecks_cached) == (1, 35)


def test_bad_files_are_skipped_counted_and_never_abort(colour_tree, fast_config, caplog):
    red = colour_tree / "red"
    (red / "empty.jpg").write_bytes(b"")
    (red / "notes.txt").write_text("not an image")
    good = (red / "img002.png").read_bytes()
    (red / "truncated.png").write_bytes(good[: len(good) // 3])
    make_image(red / "real_png_named.jpg", COLOURS["red"], seed=99, fmt="PNG")
    result = train(fast_config(colour_tree))
    skipped = {s.name.rsplit("/", 1)[-1]: s.reason for s in result.skipped}
    assert sorted(skipped) == ["empty.jpg", "notes.txt", "truncated.png"]
    assert skipped["empty.jpg"] == "empty file" and "not an image" in skipped["notes.txt"]
    assert result.bottlenecks_computed == 37  # 36 colours + the PNG named .jpg


def test_a_class_without_usable_images_is_a_clear_error(colour_tree, fast_config):
    empty = colour_tree / "purple"
    empty.mkdir()
    (empty / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match="'purple' has no usable image"):
        train(fast_config(colour_tree))


def test_accuracy_gate_fails_and_exports_nothing(tmp_path, fast_config):
    rng = np.random.default_rng(1)
    for label in ("a", "b", "c"):  # labels unrelated to the pixels: nothing to learn
        for i in range(15):
            make_image(tmp_path / "noise" / label / f"{i}.png", tuple(rng.integers(0, 255, 3)), seed=i)
    config = fast_config(tmp_path / "noise", export=dict(assert_accuracy_at_least=0.999),
                         source=dict(validation_percentage=20, testing_percentage=20))
    with pytest.raises(AccuracyGateFailed) as info:
        train(config)
    assert info.value.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_steps_and_tiny_classes_do_not_crash(tmp_path, fast_config):
    root = make_colour_tree(tmp_path / "img", per_class=8)
    make_image(root / "single" / "only.png", (128, 0, 128))
    head = HeadConfig(search="off", steps=5, batch_size=4, learning_rate=0.05, dropout=0, l2=0)
    result = train(fast_config(root, head=head,
                               source=dict(validation_percentage=40, testing_percentage=40)))
    assert "single" in result.labels and result.counts["training"]["single"] == 1
    n_train = sum(result.counts["training"].values())
    steps_per_epoch = -(-n_train // 4)
    assert len(result.history) == -(-5 // steps_per_epoch)


def test_explicit_output_graph_and_labels_paths(colour_tree, fast_config, tmp_path):
    config = fast_config(colour_tree, export=dict(output_graph=str(tmp_path / "g" / "my.pb"),
                                                  output_labels=str(tmp_path / "g" / "my.txt"),
                                                  formats=("graph",)))
    result = train(config)
    assert result.outputs["graph"].endswith("my.pb") and (tmp_path / "g" / "my.pb").is_file()
    assert (tmp_path / "g" / "my.txt").read_text(encoding="utf-8").splitlines() == sorted(COLOURS)


@pytest.mark.parametrize("field", ["output_dir", "output_graph", "output_labels"])
def test_an_output_under_a_file_is_refused_before_any_extraction(colour_tree, fast_config,
                                                                  tmp_path, field):
    from retrainer.errors import FolderNotWritable

    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / ("model" if field == "output_dir" else "out.bin")
    config = fast_config(colour_tree, export={field: str(target)})
    with pytest.raises(FolderNotWritable, match="is a file, not a folder") as info:
        train(config)
    flag = "--" + field.replace("_", "-")
    assert flag in info.value.hint
    assert not (tmp_path / "bottlenecks").exists()  # failed before extracting anything


def test_a_single_image_class_skips_cross_validation_with_a_warning(tmp_path, fast_config,
                                                                     caplog):
    root = make_colour_tree(tmp_path / "img", per_class=8)
    make_image(root / "single" / "only.png", (128, 0, 128))
    result = train(fast_config(root, head=HeadConfig(),
                               source=dict(validation_percentage=40, testing_percentage=40)))
    assert result.cv["folds"] == 0 and result.cv["C"] == 1.0
    assert "smallest class has 1 image" in result.cv["skipped"]
    assert "without cross-validation" in caplog.text
    assert result.validation_accuracy is None and result.validation_kind is None


def test_cv_head_refits_on_training_and_validation_and_reports_out_of_fold(tmp_path,
                                                                          fast_config):
    from retrainer.bottlenecks import content_key
    from retrainer.evaluation import FITTED_IMAGES_FILE

    root = make_colour_tree(tmp_path / "img", per_class=15)
    config = fast_config(root, head=HeadConfig(),
                         source=dict(validation_percentage=20, testing_percentage=0))
    result = train(config)
    n_train = sum(result.counts["training"].values())
    n_val = sum(result.counts["validation"].values())
    assert n_val > 0 and n_train + n_val == 45
    cv = result.cv
    assert cv["folds"] == 5 and cv["images"] == 45 and cv["C"] in cv["grid"]
    assert {"C", "log_loss", "log_loss_se", "accuracy"} <= set(cv["scores"][0])
    assert result.validation_kind == "out-of-fold"
    assert result.validation_accuracy == cv["validation_accuracy"] == 1.0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["split"] == "cross-validation" and report["n"] == 45
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text(encoding="utf-8"))
    training = meta["training"]
    assert training["validation_kind"] == "out-of-fold" and training["cv"]["C"] == cv["C"]
    assert training["fitted_images"]["file"] == FITTED_IMAGES_FILE
    hashes = (tmp_path / "out" / FITTED_IMAGES_FILE).read_text().split()
    every = {content_key(p.read_bytes()) for p in root.rglob("*.png")}
    assert sorted(hashes) == hashes and set(hashes) == every
    assert training["fitted_images"]["count"] == 45 == result.fitted_images
    again = train(config)  # deterministic for a seed
    assert again.cv["scores"] == cv["scores"]


def test_augmented_variants_stay_in_their_images_fold(tmp_path, fast_config, monkeypatch):
    import retrainer.head as head_module

    seen = {}
    real = head_module._fit_head_cv

    def spy(x, y, n_classes, cfg, groups=None, scored=None):
        seen.update(groups=groups, scored=scored, n=len(x))
        return real(x, y, n_classes, cfg, groups, scored)

    monkeypatch.setattr(head_module, "_fit_head_cv", spy)
    root = make_colour_tree(tmp_path / "img", per_class=10)
    result = train(fast_config(root, head=HeadConfig(),
                               augment=AugmentConfig(flip_left_right=True, variants=2),
                               source=dict(testing_percentage=0)))
    n = result.cv["images"]
    assert seen["n"] == 3 * n - 2 * sum(result.counts["validation"].values())
    groups, scored = seen["groups"], seen["scored"]
    assert scored[:n].all() and not scored[n:].any()
    variants = groups[n:]
    n_train = sum(result.counts["training"].values())
    assert (variants < n_train).all()  # variants belong to training images only
    assert np.bincount(variants, minlength=n_train).tolist() == [2] * n_train
