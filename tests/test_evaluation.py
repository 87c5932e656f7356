"""Evaluation reports: metrics equal to scikit-learn's, ROC AUC, the confusion PNG, and the CLI around them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COLOURS, TINY, make_colour_tree, make_image
from PIL import Image

from retrainer.cli import cli
from retrainer.evaluation import evaluate_predictions

LABELS = ["cat", "dog", "fox"]


def probs_for(y_pred: list[int], confidence: list[float]) -> np.ndarray:
    out = np.zeros((len(y_pred), 3))
    for i, (p, c) in enumerate(zip(y_pred, confidence)):
        out[i] = (1 - c) / 2
        out[i, p] = c
    return out


def test_metrics_match_scikit_learn_and_mistakes_are_listed_most_confident_first():
    from sklearn.metrics import f1_score, roc_auc_score

    y_true = [0, 0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 0]
    conf = [0.9, 0.8, 0.6, 0.7, 0.55, 0.9, 0.8, 0.95]
    probs = probs_for(y_pred, conf)
    paths = [f"img{i}.jpg" for i in range(8)]
    report = evaluate_predictions(y_true, probs, LABELS, paths, split="testing")
    assert report.accuracy == pytest.approx(5 / 8)
    assert report.macro["f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert report.weighted["f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert report.confusion == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    expected_auc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    assert report.roc_auc["macro"] == pytest.approx(expected_auc)
    assert [(m.path, m.true, m.predicted) for m in report.misclassified] == [
        ("img7.jpg", "fox", "cat"), ("img2.jpg", "cat", "dog"), ("img4.jpg", "dog", "fox")]
    text = report.table()
    assert "roc_auc" in text and "accuracy 0.6250 (N=8)" in text
    assert "confusion matrix (rows: true, columns: predicted)" in text
    assert "  2  fox" in text


@pytest.mark.parametrize("seed", range(4))
def test_every_figure_equals_scikit_learns_on_random_predictions(seed: int):
    """Five classes, one never true and one never predicted (zero division), tied scores."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    rng = np.random.default_rng(seed)
    labels = [f"c{i}" for i in range(5)]
    y_true = rng.choice([0, 1, 2, 3], size=60)  # class 4 never true
    probs = np.round(rng.dirichlet(np.ones(5), size=60), 1)  # coarse: many ties
    probs[:, 2] = 0.0  # class 2 never predicted
    report = evaluate_predictions(y_true, probs, labels)
    y_pred = probs.argmax(axis=1)
    idx = list(range(5))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    for i, label in enumerate(labels):
        row = report.per_class[label]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert row["support"] == s[i]
    for avg in ("macro", "weighted"):  # over the classes that occur, scikit-learn's default
        expected = precision_recall_fscore_support(y_true, y_pred, average=avg,
                                                   zero_division=0)[:3]
        got = report.macro if avg == "macro" else report.weighted
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(expected)
    assert report.confusion == confusion_matrix(y_true, y_pred, labels=idx).tolist()
    for i, label in enumerate(labels[:4]):
        expected_auc = roc_auc_score(y_true == i, probs[:, i])
        assert report.roc_auc["per_class"][label] == pytest.approx(expected_auc, abs=1e-12)
    assert report.roc_auc["per_class"]["c4"] is None


def test_macro_average_leaves_out_classes_neither_true_nor_predicted():
    """Scoring a test set where "fox" does not occur: all right is 1.0, not 2/3."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_pred = [0, 0, 1, 1], [0, 0, 1, 1]
    report = evaluate_predictions(y_true, probs_for(y_pred, [0.9] * 4), LABELS)
    assert report.macro == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    fox_row = next(line for line in report.table().splitlines() if line.startswith("fox"))
    assert fox_row.split()[1:4] == ["-", "-", "-"]
    # a class predicted but never true still counts (its precision is 0), as in scikit-learn
    y_pred = [0, 2, 1, 1]
    report = evaluate_predictions(y_true, probs_for(y_pred, [0.9] * 4), LABELS)
    expected = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (report.macro["precision"], report.macro["recall"],
            report.macro["f1"]) == pytest.approx(expected[:3])
    assert report.macro["precision"] == pytest.approx(2 / 3)


def test_roc_auc_is_none_for_a_class_without_positives():
    report = evaluate_predictions([0, 0, 1], probs_for([0, 1, 1], [0.9, 0.6, 0.8]), LABELS)
    assert report.roc_auc["per_class"]["fox"] is None
    assert report.roc_auc["per_class"]["cat"] == 1.0
    assert "      -" in report.table()


def test_report_json_and_confusion_png(tmp_path: Path):
    y_true = [0] * 10 + [1] * 10 + [2] * 10
    y_pred = [0] * 9 + [1] + [1] * 10 + [2] * 5 + [0] * 5
    report = evaluate_predictions(y_true, probs_for(y_pred, [0.8] * 30), LABELS,
                                  split="validation")
    written = report.write(tmp_path / "out", {"backbone": "x"})
    data = json.loads(Path(written["report"]).read_text(encoding="utf-8"))
    assert data["split"] == "validation" and data["backbone"] == "x"
    assert data["confusion_matrix"][2] == [5, 0, 5] and len(data["misclassified"]) == 6
    assert set(data["roc_auc"]) == {"per_class", "macro", "weighted"}
    png = Image.open(written["confusion_png"])
    assert png.format == "PNG" and png.width >= 300 and png.height >= 300
    colours = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 20  # a drawn heat map, not a blank canvas


def test_train_writes_the_report_and_the_gate_blocks_export(tmp_path: Path):
    root = make_colour_tree(tmp_path / "img")
    out = tmp_path / "model"
    common = ["--image-dir", str(root), "--architecture", TINY, "--bottleneck-dir",
              str(tmp_path / "bn"), "--epochs", "12", "--learning-rate", "0.3",
              "--testing-percentage", "25", "--dropout", "0", "--l2", "0"]
    ok = CliRunner().invoke(cli, ["-q", "train", *common, "--output-dir", str(out),
                                  "--assert-accuracy-at-least", "0.9"])
    assert ok.exit_code == 0, ok.output
    assert "confusion matrix" in ok.stdout and "macro" in ok.stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["split"] == "testing" and report["accuracy"] == 1.0
    assert (out / "confusion_matrix.png").is_file()

    rng = np.random.default_rng(1)
    for label in ("a", "b", "c"):  # labels unrelated to the pixels
        for i in range(15):
            make_image(tmp_path / "noise" / label / f"{i}.png", tuple(rng.integers(0, 255, 3)), seed=i)
    failed = CliRunner().invoke(cli, ["train", "--image-dir", str(tmp_path / "noise"),
                                      "--architecture", TINY, "--bottleneck-dir", str(tmp_path / "bn"),
                                      "--output-dir", str(tmp_path / "gated"),
                                      "--testing-percentage", "30",
                                      "--assert-accuracy-at-least", "0.999"])
    assert failed.exit_code == 3
    assert "below the required 0.999" in failed.output and "Traceback" not in failed.output
    assert not (tmp_path / "gated").exists()

    n_test = report["n"]
    evaluated = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(root), "--model-dir",
                                         str(out), "--output-dir", str(tmp_path / "ev"),
                                         "--print-misclassified"])
    assert evaluated.exit_code == 0, evaluated.output
    # Only the test split is scored: the others were fitted on (found by content).
    assert f"accuracy 1.0000 (N={n_test})" in evaluated.stdout
    assert f"left out {36 - n_test} of 36 images" in evaluated.stderr
    data = json.loads((tmp_path / "ev" / "evaluation-img.json").read_text(encoding="utf-8"))
    assert data["split"] == "all" and data["n"] == n_test and data["misclassified"] == []
    assert data["fitted_images_left_out"] == 36 - n_test and data["fitted_images_scored"] == 0
    assert sorted(data["labels"]) == sorted(COLOURS)
    assert (tmp_path / "ev" / "evaluation-img.png").is_file()

    probe = make_image(tmp_path / "probe.png", (128, 128, 128), seed=3)  # grey: no colour wins
    plain = json.loads(CliRunner().invoke(cli, ["label", "--model-dir", str(out), "--json",
                                                str(probe)]).stdout)
    top = plain["predictions"][0]
    assert "label" not in plain
    for floor, answer in ((max(0.0, top["score"] - 0.01), top["label"]),
                          (min(1.0, top["score"] + 0.01), "unknown")):
        got = CliRunner().invoke(cli, ["label", "--model-dir", str(out), "--json",
                                       "--min-confidence", f"{floor:.6f}", str(probe)])
        assert got.exit_code == 0 and json.loads(got.stdout)["label"] == answer
    text = CliRunner().invoke(cli, ["label", "--model-dir", str(out), "--min-confidence", "1",
                                    str(probe)])
    assert text.exit_code == 0 and "answer: unknown" in text.stdout


def test_evaluate_into_an_unwritable_folder_still_prints_the_report(tmp_path: Path):
    import os

    root = make_colour_tree(tmp_path / "img", per_class=4)
    out = tmp_path / "model"
    trained = CliRunner().invoke(cli, ["-q", "train", "--image-dir", str(root), "--architecture",
                                       TINY, "--output-dir", str(out), "--bottleneck-dir",
                                       str(tmp_path / "bn"), "--epochs", "3",
                                       "--testing-percentage", "0", "--validation-percentage", "0"])
    assert trained.exit_code == 0, trained.output
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the report folder should be")
    result = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(root), "--model-dir",
                                      str(out), "--output-dir", str(blocker / "sub"),
                                      "--include-training-images"])
    assert result.exit_code == 0 and "accuracy" in result.stdout
    assert "cannot write the report" in result.output and "Traceback" not in result.output
    assert os.path.isfile(blocker)


def test_evaluate_leaves_out_fitted_images_by_content_and_keeps_the_training_report(tmp_path):
    root = make_colour_tree(tmp_path / "img", per_class=6)
    out = tmp_path / "model"
    trained = CliRunner().invoke(cli, ["-q", "train", "--image-dir", str(root), "--architecture",
                                       TINY, "--output-dir", str(out), "--bottleneck-dir",
                                       str(tmp_path / "bn"), "--testing-percentage", "0",
                                       "--json"])
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout)
    assert result["validation_kind"] == "out-of-fold" and result["cv"]["folds"] == 5
    assert result["fitted_images"] == 18
    training_report = (out / "report.json").read_bytes()
    copies = tmp_path / "copies"  # the same bytes under other names: still left out
    for path in root.rglob("*.png"):
        target = copies / path.parent.name / f"renamed-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    make_image(copies / "red" / "new.png", COLOURS["red"], seed=777)
    fresh = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(copies), "--model-dir",
                                     str(out), "--json"])
    assert fresh.exit_code == 0, fresh.output
    data = json.loads(fresh.stdout)
    assert data["n"] == 1 and data["fitted_images_left_out"] == 18
    assert data["outputs"]["report"].endswith("evaluation-copies.json")
    assert "left out 18 of 19 images" in fresh.stderr

    reds = tmp_path / "reds"  # new photos of one class only: scored, not refused
    for i in range(2):
        make_image(reds / "red" / f"new{i}.png", COLOURS["red"], seed=900 + i)
    one = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(reds), "--model-dir", str(out),
                                   "--json"])
    assert one.exit_code == 0, one.output
    data = json.loads(one.stdout)
    assert data["n"] == 2 and data["per_class"]["red"]["support"] == 2
    assert data["accuracy"] == 1.0
    assert data["macro"]["recall"] == 1.0  # the classes not scored are not in the average
    empty = tmp_path / "empty"
    empty.mkdir()
    none = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(empty), "--model-dir",
                                    str(out)])
    assert none.exit_code == 1 and "need at least 1 class folder" in none.output

    nothing = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(root), "--model-dir",
                                       str(out)])
    assert nothing.exit_code == 1 and "Traceback" not in nothing.output
    assert "all 18 images were used to fit this model" in nothing.output
    assert "--include-training-images" in nothing.output

    everything = CliRunner().invoke(cli, ["evaluate", "--image-dir", str(root), "--model-dir",
                                          str(out), "--include-training-images", "--json",
                                          "--name", "train set"])
    assert everything.exit_code == 0, everything.output
    data = json.loads(everything.stdout)
    assert data["n"] == 18 and data["fitted_images_scored"] == 18
    assert "optimistic" in everything.stderr
    assert (out / "evaluation-train_set.json").is_file()
    assert (out / "report.json").read_bytes() == training_report  # never overwritten


def test_class_names_with_dollar_signs_plot_as_text(tmp_path: Path):
    labels = ["a$_$b", "$x^2$", "plain"]
    report = evaluate_predictions([0, 1, 2, 0], probs_for([0, 1, 2, 1], [0.9] * 4), labels)
    written = report.write(tmp_path, name="dollars")
    assert Path(written["confusion_png"]).name == "evaluation-dollars.png"
    assert Image.open(written["confusion_png"]).format == "PNG"


def test_adam_options_imply_head_search_off_and_conflict_with_cv(tmp_path: Path):
    root = make_colour_tree(tmp_path / "img", per_class=6)
    common = ["-q", "train", "--image-dir", str(root), "--architecture", TINY,
              "--bottleneck-dir", str(tmp_path / "bn"), "--output-dir", str(tmp_path / "m"),
              "--json"]
    off = CliRunner().invoke(cli, [*common, "--epochs", "3", "--validation-percentage", "40"])
    assert off.exit_code == 0, off.output
    data = json.loads(off.stdout)
    assert data["cv"] is None and len(data["history"]) == 3
    assert data["validation_kind"] == "held-out"
    clash = CliRunner().invoke(cli, [*common, "--head-search", "cv", "--l2", "0.1"])
    assert clash.exit_code == 2 and "--l2" in clash.output and "Traceback" not in clash.output
