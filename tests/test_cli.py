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
    result = run("-q", "train", "--image-dir", str(colour_tree), "--backbone", TINY,
                 "--output-dir", str(out), "--bottleneck-dir", str(tmp_path / "bn"),
                 "--epochs", "12", "--learning-rate", "0.3", "--testing-percentage", "25", "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.parametrize("command", ["train", "bottlenecks", "audit"])
def test_help_names_backbone_first_and_architecture_as_its_alias(command):
    assert "--backbone, --architecture NAME" in run(command, "--help").output


def test_architecture_is_the_same_option_as_backbone(trained, colour_tree, tmp_path):
    """train --backbone filled the cache; bottlenecks --architecture finds all of it."""
    out, summary = trained
    assert summary["backbone"] == TINY
    again = run("-q", "bottlenecks", "--image-dir", str(colour_tree), "--architecture", TINY,
                "--bottleneck-dir", str(tmp_path / "bn"), "--json")
    assert again.exit_code == 0, again.output
    filled = json.loads(again.stdout)
    assert (filled["computed"], filled["cached"]) == (0, 36)


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
    assert "Misclassified test images: none" in result.stdout  # all right: said, not blank


def test_quiet_label_prints_the_labels_and_no_summary(colour_tree, tmp_path):
    out = tmp_path / "m"
    assert run("-q", "train", "--image-dir", str(colour_tree), "--architecture", TINY,
               "--output-dir", str(out), "--bottleneck-dir", str(tmp_path / "bn"),
               "--epochs", "3").exit_code == 0
    probe = next(colour_tree.rglob("*.png"))
    loud = run("label", "--model-dir", str(out), str(probe))
    quiet = run("-q", "label", "--model-dir", str(out), str(probe))
    assert loud.exit_code == quiet.exit_code == 0
    assert "labelled 1 image(s), 0 failed" in loud.stderr
    assert quiet.stderr == "" and quiet.stdout == loud.stdout
    # --graph alone: the labels written beside it; a graph with none beside it: say what to pass
    graph = run("label", "--graph", str(out / "retrained_graph.pb"), str(probe))
    assert graph.exit_code == 0 and graph.stdout == loud.stdout
    lonely = tmp_path / "lonely.pb"
    lonely.write_bytes((out / "retrained_graph.pb").read_bytes())
    alone = run("label", "--graph", str(lonely), str(probe))
    assert alone.exit_code == 1 and "Pass --labels FILE too" in alone.stderr


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


def test_global_flags_also_work_after_the_subcommand(tmp_path):
    import logging

    result = run("backbones", "--json", "-v")
    assert result.exit_code == 0, result.output
    assert logging.getLogger("retrainer").level == logging.DEBUG
    result = run("backbones", "-q", "--json")
    assert result.exit_code == 0 and logging.getLogger("retrainer").level == logging.WARNING
    assert run("db", "stats", "--debug", "-q", "--help").exit_code == 0
    img = make_image(tmp_path / "x.png", (1, 2, 3))
    result = run("label", "--model-dir", str(tmp_path / "none"), str(img), "-q")
    assert result.exit_code == 1 and "No such option" not in result.output
    assert "retrainer train" in result.output


def test_unwritable_cache_folder_is_one_line_naming_it(colour_tree, tmp_path):
    (tmp_path / "file").write_text("x")
    bn = tmp_path / "file" / "bn"
    result = run("train", "--image-dir", str(colour_tree), "--architecture", TINY,
                 "--output-dir", str(tmp_path / "model"), "--bottleneck-dir", str(bn))
    assert result.exit_code == 1
    assert "Error: cannot write to the bottleneck cache folder" in result.output
    assert str(bn) in result.output and "--bottleneck-dir" in result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output


def test_label_json_and_damaged_metadata(tmp_path):
    """Every input gets a JSON row; a damaged metadata.json is a one-line error with a hint."""
    model = train_tiny_model(tmp_path)
    good = str(next((tmp_path / "images").rglob("*.png")))
    result = run("label", "--json", "--model-dir", str(model), good, str(tmp_path / "nope.jpg"))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1
    assert rows[0] == {"path": str(tmp_path / "nope.jpg"), "error": "no such file"}
    assert rows[1]["path"] == good and rows[1]["predictions"]

    meta = model / "metadata.json"
    data = json.loads(meta.read_text())
    data["backbone"]["resize"] = "lanczos9"
    meta.write_text(json.dumps(data))
    result = run("label", "--model-dir", str(model), good)
    assert result.exit_code == 1 and "unknown resize method 'lanczos9'" in result.output
    meta.write_text('{"backbone": ')
    result = run("label", "--model-dir", str(model), good)
    assert result.exit_code == 1 and "is not valid JSON" in result.output
    assert "unexpected" not in result.output and len(result.output.strip().splitlines()) == 2


def test_library_messages_name_parameters_and_the_cli_says_flags():
    import click

    from retrainer.cli.main import as_flags

    @click.command()
    @click.option("--weights")
    @click.option("--overwrite", is_flag=True)
    def cmd(weights, overwrite):  # noqa: ANN001
        pass

    options = {p.name: p for p in cmd.params}
    text = "Pass weights=FILE, or overwrite=True; keep db=URL and ?password=x as they are."
    assert as_flags(text, options) == ("Pass --weights FILE, or --overwrite; keep db=URL and "
                                       "?password=x as they are.")


def test_library_errors_speak_of_parameters(tmp_path):
    """The library's own message says image_dir=DIR; the CLI test above shows it as a flag."""
    from retrainer.config import TrainConfig
    from retrainer.dataset import open_source
    from retrainer.errors import DatasetError

    with pytest.raises(DatasetError, match=r"image_dir=DIR\) or a database \(db=URL"):
        open_source(TrainConfig())
