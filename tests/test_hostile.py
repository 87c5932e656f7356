"""Hostile conditions: concurrent runs on one cache, files that change under a run, exports
that fail half-way, names that break line-based files, folders that cannot be written."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrainer.bottlenecks import cache as cache_mod
from retrainer.bottlenecks.cache import BottleneckCache

TINY = "tiny_test_backbone"

ROOT = Path(__file__).resolve().parents[1]
DIM = 8

# One process of the concurrency test: several rounds of (write a few entries as many small
# shards, read what it and the others wrote from an index built earlier, close = compaction).
WORKER = textwrap.dedent("""
    import hashlib, json, random, sys, time
    import numpy as np
    from retrainer.bottlenecks import cache as cache_mod
    from retrainer.bottlenecks.cache import BottleneckCache

    root, me, rounds, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cache_mod.FLUSH_EVERY = 1      # a shard per entry
    cache_mod.COMPACT_ABOVE = 0    # compaction forced at every close
    cache_mod.COMPACT_WAIT = 30.0

    def key(name):
        return hashlib.sha256(name.encode()).hexdigest()

    def value(k):
        return np.frombuffer(bytes.fromhex(k)[:dim], np.uint8).astype(np.float32)

    shared = [key(f"shared{i}") for i in range(20)]
    mine = []
    rng = random.Random(me)
    for r in range(rounds):
        cache = BottleneckCache(root, "bb", dim)
        cache.missing(shared)  # the index is built now; others compact before the reads
        new = [key(f"w{me}-r{r}-{i}") for i in range(6)] + rng.sample(shared, 3)
        for k in new:
            cache.add([k], value(k)[None])
        mine += new
        time.sleep(rng.random() * 0.05)
        got = cache.load(mine)
        want = np.stack([value(k) for k in mine])
        if not np.array_equal(got, want):
            sys.exit(f"worker {me}: wrong rows in round {r}")
        cache.close()
    print(json.dumps(mine))
""")


def _value(k: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(k)[:DIM], np.uint8).astype(np.float32)


def test_processes_sharing_a_cache_with_compaction_forced_lose_nothing(tmp_path):
    """Each process compacts when it closes while the others read shards they indexed before."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "bn"), str(w), "8",
                               str(DIM)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for w in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, errs) in zip(procs, outs):
        assert p.returncode == 0, errs[-2000:]
        assert "damaged shard" not in errs, errs[-2000:]
    assert not list((tmp_path / "bn" / "bb").glob("*.bad"))
    written = sorted({k for out, _ in outs for k in json.loads(out.strip().splitlines()[-1])})
    again = BottleneckCache(tmp_path / "bn", "bb", DIM)
    assert again.missing(written) == []
    assert np.array_equal(again.load(written), np.stack([_value(k) for k in written]))


def test_a_shard_merged_away_by_another_process_is_found_again(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 1)
    keys = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    with BottleneckCache(tmp_path, "bb", DIM) as writer:
        for k in keys:
            writer.add([k], _value(k)[None])
    reader = BottleneckCache(tmp_path, "bb", DIM)
    assert reader.missing(keys) == []  # indexed: four shards
    BottleneckCache(tmp_path, "bb", DIM).compact()  # as another run closing would
    assert len(reader.shards()) == 1
    assert np.array_equal(reader.load(keys), np.stack([_value(k) for k in keys]))


@pytest.mark.parametrize("code", ["EACCES", "EMFILE"])
def test_an_unreadable_shard_is_not_set_aside(tmp_path, monkeypatch, code):
    """Permissions or too many open files say nothing about a shard: it stays, and is used
    again once it can be read."""
    import errno

    k = hashlib.sha256(b"x").hexdigest()
    with BottleneckCache(tmp_path, "bb", DIM) as writer:
        writer.add([k], _value(k)[None])
    shard = writer.shards()[0]
    real_load = np.load

    def failing(path, *a, **kw):
        raise OSError(getattr(errno, code), "simulated", str(path))

    monkeypatch.setattr(cache_mod.np, "load", failing)
    assert BottleneckCache(tmp_path, "bb", DIM).missing([k]) == [k]
    monkeypatch.setattr(cache_mod.np, "load", real_load)
    assert shard.exists() and not shard.with_suffix(".bad").exists()
    assert BottleneckCache(tmp_path, "bb", DIM).missing([k]) == []


def test_an_image_replaced_after_hashing_is_never_cached_under_its_old_key(tmp_path, monkeypatch):
    """The key must be the hash of the bytes that were decoded: new pixels under the old key
    would be reused for the old content for good."""
    import retrainer.bottlenecks as bn
    from conftest import COLOURS, TINY, make_colour_tree, make_image
    from retrainer.bottlenecks.fill import fill
    from retrainer.config import BackboneConfig, ExtractionConfig, SourceConfig, TrainConfig

    images = make_colour_tree(tmp_path / "images", per_class=3)
    victim = images / "red" / "img000.png"
    old_key = bn.content_key(victim.read_bytes())
    real_hash = bn.hash_records

    def hash_then_replace(records, workers=None):
        out = real_hash(records, workers)
        make_image(victim, COLOURS["blue sky"], seed=99)  # replaced before it is decoded
        return out

    monkeypatch.setattr(bn, "hash_records", hash_then_replace)
    config = TrainConfig(source=SourceConfig(image_dir=str(images)), backbone=BackboneConfig(TINY),
                         extraction=ExtractionConfig(bottleneck_dir=str(tmp_path / "bn"),
                                                     workers=2))
    done = fill(config)
    assert old_key not in done.cache
    assert any("changed" in s.reason and s.name.endswith("img000.png") for s in done.skipped)
    assert done.computed == 8

    monkeypatch.setattr(bn, "hash_records", real_hash)
    again = fill(config)  # the next run takes the new content, under its own key
    assert bn.content_key(victim.read_bytes()) in again.cache and not again.skipped


@pytest.mark.timeout(120, method="thread")  # a regression blocks in a worker thread
def test_a_fifo_a_symlink_loop_and_a_folder_named_like_images_are_counted_skips(tmp_path):
    """A FIFO named x.jpg must not block the run until a writer comes, and a symlink loop must
    not vanish from the counts: each is a skipped file with its reason."""
    import os

    from conftest import make_colour_tree
    from retrainer.bottlenecks.fill import fill
    from retrainer.config import BackboneConfig, ExtractionConfig, SourceConfig, TrainConfig

    images = make_colour_tree(tmp_path / "images", per_class=3)
    os.mkfifo(images / "red" / "fifo.jpg")
    os.symlink("loop2.jpg", images / "red" / "loop1.jpg")
    os.symlink("loop1.jpg", images / "red" / "loop2.jpg")
    config = TrainConfig(source=SourceConfig(image_dir=str(images)), backbone=BackboneConfig(TINY),
                         extraction=ExtractionConfig(bottleneck_dir=str(tmp_path / "bn")))
    done = fill(config)
    reasons = {Path(s.name).name: s.reason for s in done.skipped}
    assert "FIFO" in reasons["fifo.jpg"]
    assert "symbolic links" in reasons["loop1.jpg"] and "symbolic links" in reasons["loop2.jpg"]
    assert done.computed == 9


@pytest.mark.timeout(120, method="thread")  # a regression blocks in a worker thread
def test_label_names_a_fifo_or_a_device_as_unreadable_without_blocking(tmp_path):
    import os

    from click.testing import CliRunner
    from conftest import COLOURS, make_image, train_tiny_model
    from retrainer.cli import cli

    model = train_tiny_model(tmp_path)
    os.mkfifo(tmp_path / "fifo.jpg")
    good = make_image(tmp_path / "red.png", COLOURS["red"])
    result = CliRunner().invoke(cli, ["label", "--model-dir", str(model), "--json",
                                      str(tmp_path / "fifo.jpg"), "/dev/zero", str(good)])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_path = {r["path"]: r for r in rows}
    assert "FIFO" in by_path[str(tmp_path / "fifo.jpg")]["error"]
    assert "device" in by_path["/dev/zero"]["error"]
    assert by_path[str(good)]["predictions"][0]["label"] == "red"


def test_metadata_fields_of_the_wrong_type_are_one_line_errors(tmp_path):
    """A hand-edited metadata.json with a string where an object belongs (or a number where a
    file name belongs) names the field; a null field is as if it were absent."""
    from click.testing import CliRunner
    from conftest import train_tiny_model
    from retrainer.cli import cli

    model = train_tiny_model(tmp_path)
    images = str(tmp_path / "images")
    good = str(next((tmp_path / "images").rglob("*.png")))
    meta = model / "metadata.json"
    original = json.loads(meta.read_text())
    commands = [["label", good], ["evaluate", "--image-dir", images],
                ["export", "--format", "graph"]]
    for change, field in [(lambda d: d.update(training="x"), "'training' is a JSON string"),
                          (lambda d: d["backbone"].update(resize={"a": 1}),
                           "'backbone.resize' is a JSON object"),
                          (lambda d: d.update(files={"graph": 5}), "'files.graph' is a JSON number"),
                          (lambda d: d.update(training=None, backbone=None), None)]:
        data = json.loads(json.dumps(original))
        change(data)
        meta.write_text(json.dumps(data))
        for args in commands:
            result = CliRunner().invoke(cli, [*args[:1], "--model-dir", str(model), *args[1:]])
            assert "unexpected" not in result.output, (args, result.output)
            if field is None:
                assert result.exit_code == 0, (args, result.output)
            else:
                assert result.exit_code == 1 and field in result.output, (args, result.output)
    from retrainer.serve.server import load_model
    from retrainer.serve.settings import ServeConfig

    info = load_model(ServeConfig(model_dir=str(model), runtime="tensorflow"))[1]
    assert info["backbone"] is None and info["training"] == {}


@pytest.mark.parametrize("args", [["train", "--image-dir", ".", "--learning-rate", "nan"],
                                  ["train", "--image-dir", ".", "--dropout", "nan"],
                                  ["train", "--image-dir", ".", "--l2", "inf"],
                                  ["label", "--min-confidence", "nan", "x.jpg"],
                                  ["serve", "--max-body-mb", "inf"],
                                  ["audit", "--image-dir", ".", "--near-threshold", "nan"]])
def test_nan_and_infinity_are_refused_by_every_float_option(args):
    """nan passes click's range checks (every comparison with it is false): it trained a head
    of nan weights, or labelled every image 'unknown'."""
    from click.testing import CliRunner
    from retrainer.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "is not a finite number" in result.output, result.output


def test_serve_loads_an_export_that_has_only_its_tflite_model(tmp_path):
    """label runs a folder with model.tflite and no frozen graph on LiteRT; serve did too, then
    died with 'unexpected FileNotFoundError' hashing the missing graph for its version."""
    from conftest import make_colour_tree, tiny_config
    from retrainer.serve.server import load_model
    from retrainer.serve.settings import ServeConfig
    from retrainer.training import train

    images = make_colour_tree(tmp_path / "images", per_class=4)
    train(tiny_config(images, tmp_path / "model", tmp_path / "bn",
                      export={"formats": ("graph", "tflite")}))
    (tmp_path / "model" / "retrained_graph.pb").unlink()
    classifier, info = load_model(ServeConfig(model_dir=str(tmp_path / "model"), runtime="litert"))
    assert classifier.runtime == "litert" and len(info["version"]) == 16


def test_json_output_stays_utf8_with_a_file_name_that_is_not(tmp_path):
    """A non-UTF-8 byte of a file name went to stdout raw: no JSON parser read the line."""
    import os
    import subprocess
    import sys

    from conftest import COLOURS, make_image, train_tiny_model

    model = train_tiny_model(tmp_path)
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")
    make_image(Path(name), COLOURS["red"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "retrainer", "label", "--json", "--model-dir",
                          str(model), name], capture_output=True, env=env, check=True).stdout
    row = json.loads(out.decode("utf-8"))
    assert os.fsencode(row["path"]) == os.fsencode(name)
    assert row["predictions"][0]["label"] == "red"


def test_a_class_emptied_by_conflicting_duplicates_says_so(tmp_path):
    """Folders 'Cat' and 'cat' holding the same files: both classes lose every image to the
    conflicting-duplicates rule, and 'add images to it' was the wrong advice."""
    import shutil

    from conftest import make_colour_tree, tiny_config
    from retrainer.errors import DatasetError
    from retrainer.training import train

    images = make_colour_tree(tmp_path / "images", per_class=4)
    shutil.copytree(images / "red", images / "Red")
    with pytest.raises(DatasetError) as err:
        train(tiny_config(images, tmp_path / "model", tmp_path / "bn"))
    assert "classes 'Red', 'red' have no usable image once the 8 identical file(s)" in str(err.value)
    assert "keep_conflicting_duplicates=True" in err.value.hint


def test_output_paths_under_a_file_fail_at_once_with_one_line(tmp_path):
    """--summaries-dir under a file was 'unexpected FailedPreconditionError' after the whole
    extraction; --write-relabel under a file 'unexpected NotADirectoryError' after the audit."""
    from click.testing import CliRunner
    from conftest import make_colour_tree
    from retrainer.cli import cli

    images = str(make_colour_tree(tmp_path / "images", per_class=3))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    common = ["--image-dir", images, "--backbone", TINY, "--bottleneck-dir", str(tmp_path / "bn")]
    for args, flag in [(["train", *common, "--output-dir", str(tmp_path / "m"), "--head-search",
                         "off", "--summaries-dir", str(blocker / "logs")], "--summaries-dir"),
                       (["audit", *common, "--write-relabel", str(blocker / "x.csv")],
                        "--write-relabel"),
                       (["audit", *common, "--report", str(blocker / "report")], "--report")]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert f"cannot write to the folder of {flag}" in result.output, result.output
        assert "is a file, not a folder" in result.output
    assert not (tmp_path / "bn").exists()  # refused before any extraction


def test_audit_write_relabel_that_cannot_be_written_is_an_error(tmp_path):
    from retrainer.audit import AuditResult
    from retrainer.errors import RetrainerError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(RetrainerError, match="cannot write the relabel CSV"):
        AuditResult(label_issues=[], duplicates=[], outliers=[], summary={}).write_relabel(
            tmp_path / "afile" / "x.csv")


def test_export_refuses_a_labels_file_that_does_not_match_the_model(tmp_path):
    """label and evaluate refused it; export wrote an ONNX/TFLite model with the wrong labels."""
    from click.testing import CliRunner
    from conftest import train_tiny_model
    from retrainer.cli import cli

    model = train_tiny_model(tmp_path)
    labels = model / "retrained_labels.txt"
    labels.write_text(labels.read_text() + "extra\n")
    result = CliRunner().invoke(cli, ["export", "--model-dir", str(model), "--format", "tflite"])
    assert result.exit_code == 1, result.output
    assert "the model has 3 outputs but" in result.output and "lists 4 labels" in result.output
    assert "Restore the labels file" in result.output
    assert not (model / "model.tflite").exists()


@pytest.mark.timeout(120, method="thread")  # a regression blocks on the FIFO
def test_a_fifo_as_the_labels_file_is_an_error_not_a_hang(tmp_path):
    import os

    from conftest import train_tiny_model
    from retrainer.errors import ModelDirError
    from retrainer.predict import Classifier

    model = train_tiny_model(tmp_path)
    (model / "retrained_labels.txt").unlink()
    os.mkfifo(model / "retrained_labels.txt")
    with pytest.raises(ModelDirError, match="not a regular file: a FIFO"):
        Classifier.load(model, runtime="tensorflow")


def test_with_json_a_failure_is_a_json_document_on_stdout_too(tmp_path):
    """A script parsing stdout got nothing to parse when the command failed."""
    from click.testing import CliRunner
    from conftest import COLOURS, make_image
    from retrainer.cli import cli

    image = str(make_image(tmp_path / "red.png", COLOURS["red"]))
    args = ["label", "--model-dir", str(tmp_path / "none"), image]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 1 and "no frozen graph" in error["message"]
    assert error["hint"].startswith("Train a model first")
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 1 and plain.stdout == ""
