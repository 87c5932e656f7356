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
        deadline = time.monotonic() + 120
        while not any((s / "retrained_graph.pb").exists() for s in _staged(tmp_path)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the stuck export never staged its graph"
            time.sleep(0.05)
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
