"""Runs stopped at any moment, and runs at the same time: the model folder holds one whole
model (every file of it describing it), nothing is left behind, and the next run goes on."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_colour_tree, tiny_config

from retrainer.training import train

TESTS = Path(__file__).resolve().parent

# A training run whose TFLite conversion never ends: it is stopped while the model is staged.
STUCK_EXPORT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import tensorflow  # noqa: F401 - started here: no export helper process
    import conftest
    from retrainer import export
    from retrainer.training import train

    next(conftest.registered_backbone(conftest.TINY, 32, 3, conftest.tiny_builder))
    export.tflite_for_devices = lambda *args, **kwargs: time.sleep(3600)
    train(conftest.tiny_config(sys.argv[2], sys.argv[3], sys.argv[4],
                               export=dict(formats=("graph", "tflite"))))
""")


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fitted_lines(model: Path) -> int:
    return len((model / "fitted_images.sha256").read_text().splitlines())


def test_a_run_stopped_while_exporting_leaves_the_old_model_and_its_files(tmp_path,
                                                                          monkeypatch):
    """Ctrl-C while the new model is written: the old model keeps its own fitted-image hashes
    and report (they were written before the model, so 'evaluate' on the old model scored
    the images it was fitted on and left out others)."""
    from retrainer import export

    out = tmp_path / "model"
    old = make_colour_tree(tmp_path / "old", per_class=8)
    train(tiny_config(old, out, tmp_path / "bn", export=dict(formats=("graph", "tflite"))))
    meta = json.loads((out / "metadata.json").read_text())
    assert _fitted_lines(out) == meta["training"]["fitted_images"]["count"]
    before = _files(out)

    def interrupted(*args, **kwargs):  # Ctrl-C after the graph was staged, before the TFLite model
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "tflite_for_devices", interrupted)
    new = make_colour_tree(tmp_path / "new", per_class=5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(new, out, tmp_path / "bn", export=dict(formats=("graph", "tflite"))))
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn", "model", "new", "old"]


def test_the_report_and_hashes_are_files_of_the_model(tmp_path):
    out = tmp_path / "model"
    train(tiny_config(make_colour_tree(tmp_path / "images", per_class=8), out, tmp_path / "bn"))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["files"]["fitted_images"] == "fitted_images.sha256"
    assert meta["files"]["report"] == "report.json"
    assert _fitted_lines(out) == meta["training"]["fitted_images"]["count"]
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == meta["labels"] and report["backbone"] == "tiny_test_backbone"
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _staged(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob(".model.export-*"))


def _wait_for_staged_graph(proc: subprocess.Popen, tmp_path: Path) -> None:
    """Until the export in ``proc`` has staged its graph (it must stay alive meanwhile)."""
    deadline = time.monotonic() + 120
    while not any((s / "retrained_graph.pb").exists() for s in _staged(tmp_path)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the stuck export never staged its graph"
        time.sleep(0.05)


def test_staging_left_by_a_killed_export_is_removed_by_the_next_one(tmp_path):
    """SIGKILL while the model is staged leaves the staging folder (no clean-up can run): the
    next export to that folder removes it, and never one that a live run is writing."""
    out, bn = tmp_path / "model", tmp_path / "bn"
    images = make_colour_tree(tmp_path / "images", per_class=6)
    config = tiny_config(images, out, bn, export=dict(formats=("graph", "tflite")))
    train(config)
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_EXPORT)
    proc = subprocess.Popen([sys.executable, str(script), str(TESTS), str(images), str(out),
                             str(bn)], stderr=subprocess.PIPE)
    try:
        _wait_for_staged_graph(proc, tmp_path)
        live = _staged(tmp_path)
        train(config)  # meanwhile: the live run's staging folder is left alone
        assert _staged(tmp_path) == live
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert _staged(tmp_path) == live  # left behind by the killed run
    train(config)
    assert _staged(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn", "images", "model", "stuck.py"]
    assert json.loads((out / "metadata.json").read_text())["labels"] == \
        (out / "retrained_labels.txt").read_text().splitlines()


# Exports two models in turn (3 and 2 classes) to one folder for a few seconds.
ALTERNATE_EXPORTS = textwrap.dedent("""
    import hashlib, json, sys, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import conftest
    from retrainer.backbones.factory import create_backbone
    from retrainer.export import export_graph
    from retrainer.graph import compose, dense_softmax_graph, freeze

    next(conftest.registered_backbone(conftest.TINY, 32, 3, conftest.tiny_builder))
    backbone = freeze(create_backbone(conftest.TINY).model)
    models = []
    for n in (3, 2):
        kernel = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
        models.append((compose(backbone, dense_softmax_graph(kernel, np.zeros(n, np.float32))),
                       [f"class{i}" for i in range(n)]))
    export_graph(*models[0], {"classes": 3}, sys.argv[2], formats=("graph", "tflite"))
    digests = {len(labels): hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()
               for graph, labels in models}
    print(json.dumps(digests), flush=True)
    end, i = time.monotonic() + float(sys.argv[3]), 1
    while time.monotonic() < end:
        graph, labels = models[i % 2]
        export_graph(graph, labels, {"classes": len(labels)}, sys.argv[2],
                     formats=("graph", "tflite"))
        i += 1
    print(i, flush=True)
""")


def test_a_model_loaded_while_exports_replace_it_is_one_whole_model(tmp_path):
    """label/serve/evaluate load the metadata, the graph and the labels one after the other:
    an export replacing the folder in between gave a mix ('the model has 3 outputs but the
    labels file lists 2 labels', or another model's metadata), and 'label --db' filed the
    predictions under the id of the graph the folder held a moment later."""
    import numpy as np

    from retrainer.predict import Classifier

    script, out = tmp_path / "exports.py", tmp_path / "model"
    script.write_text(ALTERNATE_EXPORTS)
    proc = subprocess.Popen([sys.executable, str(script), str(TESTS), str(out), "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("{"), proc.stderr.read()[-2000:]
        digests = {int(k): v for k, v in json.loads(line).items()}
        loads, mixed = 0, []
        while proc.poll() is None:
            try:
                model = Classifier.load(out, graph_digest=True)
                classes = model.predict(np.zeros((1, 32, 32, 3), np.float32)).shape[1]
                if not classes == len(model.labels) == model.metadata["classes"]:
                    mixed.append("metadata of another model")
                elif model.graph_sha256 != digests[classes]:
                    mixed.append("the digest of another model's graph")
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                mixed.append(str(exc))
            loads += 1
        exports = int(proc.stdout.read().split()[-1])
    finally:
        proc.kill()
        proc.wait()
    assert exports > 20 and loads > 100, (exports, loads)
    assert mixed == [], f"{len(mixed)} of {loads} loads: {sorted(set(mixed))[:3]}"


def test_a_relabel_list_is_written_whole_or_not_at_all(tmp_path):
    """The list was written row by row into the file itself: stopped half-way (here: a row it
    cannot write) it left the first rows only, a list that looks complete, in place of the
    previous one."""
    from retrainer.audit import AuditResult

    rows = [{"_path": f"cats/{i}.jpg", "label": "cats", "suggested_label": "dogs"}
            for i in range(3)]
    done = AuditResult(rows, [], [], {})
    fix = tmp_path / "fix.csv"
    assert done.write_relabel(fix) == 3
    before = fix.read_bytes()
    assert before.decode().splitlines()[1] == "cats/0.jpg,cats,dogs"
    stopped = AuditResult([*rows[:2], {"_path": "dogs/9.jpg", "label": "dogs"}], [], [], {})
    with pytest.raises(KeyError):
        stopped.write_relabel(fix)
    assert fix.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fix.csv"]


# `retrainer train` (the real command line) whose TFLite conversion never ends.
STUCK_CLI = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv.pop(1))
    import tensorflow  # noqa: F401 - started here: no export helper process
    import conftest
    from retrainer import export
    from retrainer.cli.main import main

    next(conftest.registered_backbone(conftest.TINY, 32, 3, conftest.tiny_builder))
    export.tflite_for_devices = lambda *args, **kwargs: time.sleep(3600)
    sys.argv[0] = "retrainer"
    main()
""")


def test_sigterm_while_exporting_unwinds_like_ctrl_c(tmp_path):
    """SIGTERM (kill, timeout, docker stop) ended the process where it stood: no message, the
    staged model left beside the folder, the bottlenecks computed in the last seconds lost."""
    out, bn = tmp_path / "model", tmp_path / "bn"
    images = make_colour_tree(tmp_path / "images", per_class=6)
    train(tiny_config(images, out, bn, export=dict(formats=("graph", "tflite"))))
    before = _files(out)
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_CLI)
    proc = subprocess.Popen([sys.executable, str(script), str(TESTS), "train", "--image-dir",
                             str(images), "--backbone", "tiny_test_backbone", "--output-dir",
                             str(out), "--bottleneck-dir", str(bn), "--export-formats",
                             "graph,tflite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_staged_graph(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err.decode()[-2000:]
    assert err.decode().rstrip().endswith("Terminated.")
    assert _staged(tmp_path) == []
    assert _files(out) == before


# A run exporting into its working directory (files renamed in one by one): Ctrl-C arrives
# as the first file has been renamed in.
INTERRUPTED_COMMIT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import conftest
    from retrainer.training import train

    next(conftest.registered_backbone(conftest.TINY, 32, 3, conftest.tiny_builder))

    def ctrl_c_after_the_first_rename(frame, event, arg):
        if event == "c_return" and arg is os.replace and \\
                frame.f_code.co_name == "_commit_in_place":
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)

    sys.setprofile(ctrl_c_after_the_first_rename)
    try:
        train(conftest.tiny_config(sys.argv[2], ".", sys.argv[3],
                                   export=dict(formats=("graph", "saved_model"))))
    except KeyboardInterrupt:
        sys.exit(130)
""")


def test_ctrl_c_while_files_are_renamed_in_leaves_one_whole_model(tmp_path):
    """Exporting into the working directory, the files are renamed in one by one; Ctrl-C or
    SIGTERM between two renames left the new graph beside the old labels and metadata."""
    from retrainer.predict import Classifier

    out, bn = tmp_path / "model", tmp_path / "bn"
    out.mkdir()
    old = make_colour_tree(tmp_path / "old", per_class=6)
    new = make_colour_tree(tmp_path / "new", per_class=6,
                           colours={"black": (10, 10, 10), "white": (240, 240, 240)})
    config = tiny_config(old, ".", bn, export=dict(formats=("graph", "saved_model")))
    cwd = os.getcwd()
    os.chdir(out)
    try:
        train(config)
    finally:
        os.chdir(cwd)
    assert len(Classifier.load(out).labels) == 3
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_COMMIT)
    done = subprocess.run([sys.executable, str(script), str(TESTS), str(new), str(bn)],
                          cwd=out, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    # one whole model, the old one or the new one: every file of it describes it
    meta = json.loads((out / "metadata.json").read_text())
    assert Classifier.load(out).labels == meta["labels"]
    assert json.loads((out / "report.json").read_text())["labels"] == meta["labels"]
    assert _fitted_lines(out) == meta["training"]["fitted_images"]["count"]
    assert not list(out.glob(".export-*"))
