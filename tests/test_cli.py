"""The command line: help without TensorFlow, exit codes, JSON output, errors with hints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import COLOURS, TINY, loaded_after_help, make_image, train_tiny_model

from retrainer.cli import cli
from retrainer.cli.main import COMMANDS


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_does_not_import_tensorflow():
    assert loaded_after_help([["--help"], ["label", "--help"], ["train", "--help"]],
                             ("tensorflow",)) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_unknown_command_suggests_the_closest():
    result = CliRunner().invoke(cli, ["lable"])
    assert result.exit_code == 2 and "Did you mean 'label'?" in result.output


def test_backbones_lists_the_registry_as_json():
    names = {b["name"] for b in json.loads(run("backbones", "--json").output)}
    assert {"inception_v3", "mobilenet_v2", "efficientnet_lite0"} <= names


def test_unknown_backbone_is_an_error_with_a_suggestion(colour_tree, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--image-dir", str(colour_tree), "--architecture",
                                      "mobilenetv2", "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "unknown backbone 'mobilenetv2'" in result.output and "Did you mean 'mobilenet_v2'?" in result.output
    assert "Traceback" not in result.output


def test_folder_without_classes_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "photos").mkdir()
    make_image(tmp_path / "photos" / "a.png", (1, 2, 3))
    result = CliRunner().invoke(cli, ["train", "--image-dir", str(tmp_path / "photos")])
    assert result.exit_code == 1 and "need at least 2 class folders" in result.output


def test_bad_percentage_is_a_usage_error(colour_tree):
    result = CliRunner().invoke(cli, ["train", "--image-dir", str(colour_tree),
                                      "--validation-percentage", "120"])
    assert result.exit_code == 2 and "between 0 and 100" in result.output


@pytest.fixture
def trained(colour_tree, tmp_path):
    out = tmp_path / "model"
    result = run("-q", "train", "--image-dir", str(colour_tree), "--architecture", TINY,
                 "--output-dir", str(out), "--bottleneck-dir", str(tmp_path / "bn"),
                 "--epochs", "12", "--learning-rate", "0.3", "--testing-percentage", "25", "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_train_json_then_label_and_evaluate(trained, colour_tree, tmp_path):
    out, summary = trained
    assert summary["labels"] == sorted(COLOURS) and summary["bottlenecks_computed"] == 36
    assert summary["test_accuracy"] == 1.0

    probe = make_image(tmp_path / "probe" / "x.png", COLOURS["green"], seed=5)
    bad = tmp_path / "probe" / "broken.jpg"
    bad.write_bytes(b"\x00" * 10)
    result = CliRunner().invoke(cli, ["label", "--model-dir", str(out), "--top-k", "2", "--json",
                                      str(tmp_path / "probe")])
    assert result.exit_code == 1  # one image failed; the other was still labelled
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(probe)]["predictions"][0]["label"] == "green"
    assert len(by_path[str(probe)]["predictions"]) == 2 and "error" in by_path[str(bad)]

    text = run("label", "--model-dir", str(out), str(probe))
    assert text.exit_code == 0 and "green (score=" in text.stdout

    report = json.loads(run("evaluate", "--image-dir", str(colour_tree), "--model-dir", str(out),
                            "--include-training-images", "--json").stdout)
    assert report["n"] == 36 and report["accuracy"] == 1.0
    assert report["per_class"]["blue sky"]["f1"] == 1.0


def test_train_text_summary_and_misclassified(colour_tree, tmp_path):
    result = run("-q", "train", "--image-dir", str(colour_tree), "--architecture", TINY,
                 "--output-dir", str(tmp_path / "m"), "--bottleneck-dir", str(tmp_path / "bn"),
                 "--epochs", "12", "--learning-rate", "0.3", "--testing-percentage", "25",
                 "--print-misclassified")
    assert result.exit_code == 0
    assert "Bottlenecks: 36 computed, 0 cached" in result.stdout
    assert "Final test accuracy = 100.0% (N=" in result.stdout
    assert "Misclassified test images:" in result.stdout


def test_label_with_no_model_says_how_to_get_one(tmp_path):
    img = make_image(tmp_path / "x.png", (1, 2, 3))
    result = CliRunner().invoke(cli, ["label", "--model-dir", str(tmp_path / "none"), str(img)])
    assert result.exit_code == 1 and "retrainer train" in result.output


def test_label_of_a_missing_file_fails_cleanly(tmp_path):
    result = CliRunner().invoke(cli, ["label", str(tmp_path / "nope.jpg")])
    assert result.exit_code == 1 and "no such file" in result.output


def test_a_reader_that_quits_early_ends_label_quietly(tmp_path):
    """``retrainer label ... | head``: no 'unexpected error', the SIGPIPE status instead."""
    model = train_tiny_model(tmp_path)
    images = sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    proc = subprocess.Popen([sys.executable, "-m", "retrainer", "label", "--model-dir",
                             str(model), *images], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err
    assert "Error" not in err and "Traceback" not in err
