"""``retrainer db ...``, ``train --db`` and ``label --db`` through the CLI, on SQLite."""
from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import COLOURS, TINY, loaded_after_help, make_colour_tree
from sql_servers import free_port

from retrainer.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_import_stats_train_label_and_query(tmp_path):
    db = str(tmp_path / "images.db")
    images = make_colour_tree(tmp_path / "images", per_class=10)
    imported = run("db", "import", "--image-dir", str(images), "--db", db, "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["added"] == 30
    stats = json.loads(run("db", "stats", "--db", db, "--json").stdout)
    assert stats["total"] == 30 and stats["per_class"] == {c: 10 for c in COLOURS}
    table = run("db", "stats", "--db", db)
    assert table.output.splitlines()[0].split() == ["class", "training", "validation", "testing",
                                                    "total"]

    model = str(tmp_path / "model")
    trained = run("train", "--db", db, "--architecture", TINY, "--output-dir", model,
                  "--bottleneck-dir", str(tmp_path / "bn"), "--epochs", "12",
                  "--learning-rate", "0.3", "--json")
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["bottlenecks_computed"] == 30

    labelled = run("label", "--db", db, "--model-dir", model, "--where", "role = 'training'",
                   "--json")
    summary = json.loads(labelled.stdout)
    assert labelled.exit_code == 0 and summary["labelled"] == stats["per_role"]["training"]
    assert summary["accuracy"] == 1.0 and summary["already_labelled"] == 0
    evaluated = run("evaluate", "--db", db, "--model-dir", model, "--where",
                    "role = 'training'", "--include-training-images", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert (report["n"], report["accuracy"]) == (summary["scored"], summary["accuracy"])
    rest = json.loads(run("label", "--db", db, "--model-dir", model, "--json").stdout)
    assert (rest["labelled"], rest["already_labelled"]) == (30 - summary["labelled"],
                                                           summary["labelled"])

    query = run("db", "query", "--db", db, "--model-dir", model, "--json",
                "SELECT p.label, classify(i.blob) FROM predictions p "
                "JOIN images i ON i.id = p.image_id")
    rows = json.loads(query.stdout)["rows"]
    assert len(rows) == 30 and all(a == b for a, b in rows)


def test_a_hostile_where_is_an_error_not_a_traceback(tmp_path):
    db = str(tmp_path / "images.db")
    run("db", "import", "--image-dir", str(make_colour_tree(tmp_path / "i", per_class=2)),
        "--db", db)
    result = run("train", "--db", db, "--where", "role = 'training'; DROP TABLE images",
                 "--architecture", TINY, "--output-dir", str(tmp_path / "m"))
    assert result.exit_code == 1 and "cannot read the filter at '; DROP TABLE" in result.output
    assert "Traceback" not in result.output
    assert json.loads(run("db", "stats", "--db", db, "--json").stdout)["total"] == 6


def test_unreachable_server_error_masks_the_password():
    url = f"mysql://someone:s3cr%40t@127.0.0.1:{free_port()}/images"
    result = run("db", "stats", "--db", url)
    assert result.exit_code == 1
    assert "mysql+pymysql://someone:***@127.0.0.1" in result.output
    assert "s3cr" not in result.output and "Is the database server running" in result.output


def test_train_and_label_need_one_source(tmp_path):
    assert run("train").exit_code == 2
    both = run("train", "--image-dir", str(tmp_path), "--db", "x.db")
    assert both.exit_code == 2 and "either --image-dir DIR or --db URL" in both.output
    assert run("label").exit_code == 2
    assert run("label", "--db", "x.db", "photo.jpg").exit_code == 2


def test_not_a_url_is_a_clear_error():
    result = run("db", "stats", "--db", "nosuchdriver://u:pw@host/db")
    assert result.exit_code == 1 and "pw" not in result.output.replace("***", "")


def test_fashion_mnist_example_loads_idx_files(tmp_path):
    """The example on tiny hand-written idx files: import, train, predictions written back."""
    import gzip
    import struct
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import fashion_mnist_sql as example

    rng = np.random.default_rng(0)
    for part, n in (("train", 60), ("t10k", 20)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = np.clip(labels[:, None, None] * 25 + rng.normal(0, 4, (n, 28, 28)), 0, 255)
        for name, arr in ((f"{part}-images-idx3-ubyte", images.astype(np.uint8)),
                          (f"{part}-labels-idx1-ubyte", labels)):
            header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    db = str(tmp_path / "fashion.db")
    summary = example.main(["--idx-dir", str(tmp_path), "--db", db, "--per-class", "0",
                            "--architecture", TINY, "--output-dir", str(tmp_path / "m"),
                            "--bottleneck-dir", str(tmp_path / "bn"), "--epochs", "5"])
    assert summary["imported"]["added"] == 80
    assert summary["predictions"]["labelled"] == 20
    stats = json.loads(run("db", "stats", "--db", db, "--json").stdout)
    assert stats["per_role"]["testing"] == 20 and stats["total"] == 80


def test_db_help_imports_neither_tensorflow_nor_sqlalchemy():
    helps = [["db", "--help"], ["db", "import", "--help"], ["db", "query", "--help"]]
    assert loaded_after_help(helps, ("tensorflow", "sqlalchemy")) == []
