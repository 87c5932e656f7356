"""Hostile input against the SQL side: writes through ``db query``, overlapping ``label --db``
runs, deep filters, passwords in query strings, case-folding class names, unbounded results.

Every test taking ``db_url`` runs on SQLite, MariaDB and PostgreSQL (real servers on 127.0.0.1,
see sql_servers and test_sql).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_colour_tree, make_image
from sql_servers import PASSWORD
from test_sql import count, db_url, mariadb_server, model_dir, postgresql_server  # noqa: F401

from retrainer.db.filters import MAX_DEPTH, FilterError, parse_filter
from retrainer.db.functions import DEFAULT_LIMIT, MEMO_SIZE, register_classify, run_query
from retrainer.db.importer import import_folder
from retrainer.db.predictions import label_database, model_id_of
from retrainer.db.url import DatabaseError, connect, masked

WRITES = ["DELETE FROM images; COMMIT", "COMMIT; DELETE FROM images", "DELETE FROM images",
          "DROP TABLE images", "CREATE TABLE x(a INTEGER)", "UPDATE images SET path = 'x'"]


def test_db_query_cannot_change_anything(db_url, tmp_path):
    import_folder(db_url, make_colour_tree(tmp_path / "images", per_class=2))
    for sql in WRITES:
        with pytest.raises(DatabaseError) as err:
            run_query(db_url, sql)
        assert "\n" not in str(err.value), sql
        assert count(db_url, "SELECT COUNT(*) FROM images") == 6, sql
        assert count(db_url, "SELECT COUNT(*) FROM images WHERE path = 'x'") == 0, sql
    with connect(db_url).connect() as conn:
        from sqlalchemy import inspect

        assert "x" not in inspect(conn).get_table_names()
    cli = CliRunner().invoke(_cli(), ["db", "query", "--db", db_url, "DROP TABLE images"])
    assert cli.exit_code == 1 and "Traceback" not in cli.output
    assert cli.output.startswith("Error: database") and PASSWORD not in cli.output
    assert run_query(db_url, "SELECT COUNT(*) FROM images WHERE path LIKE '%red%'").rows == [(2,)]


def test_db_query_rows_are_bounded_by_default(tmp_path):
    db = str(tmp_path / "images.db")
    import_folder(db, make_colour_tree(tmp_path / "images", per_class=1))
    many = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) "
            "SELECT i FROM n")
    result = run_query(db, many)
    assert len(result.rows) == DEFAULT_LIMIT and result.truncated
    assert not run_query(db, many, limit=6000).truncated
    out = CliRunner().invoke(_cli(), ["db", "query", "--db", db, "--limit", "10", "--json", many])
    assert out.exit_code == 0 and json.loads(out.stdout)["truncated"] is True
    assert len(json.loads(out.stdout)["rows"]) == 10 and "--limit" in out.stderr
    with pytest.raises(DatabaseError, match="no SQLite database"):
        run_query(str(tmp_path / "missing.db"), "SELECT 1")
    assert not (tmp_path / "missing.db").exists()


def test_the_classify_memo_stays_bounded(tmp_path, model_dir):  # noqa: F811
    import sqlite3

    from retrainer.predict import Classifier

    conn = sqlite3.connect(":memory:")
    memo = register_classify(conn, Classifier.load(model_dir))
    blobs = [f"not an image {i}".encode() for i in range(3 * MEMO_SIZE)]
    blobs.append(make_image(tmp_path / "r.png", (220, 30, 30)).read_bytes())
    for blob in blobs:
        conn.execute("SELECT classify(?), classify_score(?)", (blob, blob)).fetchone()
    assert 0 < len(memo) <= MEMO_SIZE
    assert conn.execute("SELECT classify(?)", (blobs[-1],)).fetchone() == ("red",)


LABEL_ALL = textwrap.dedent("""
    import sys
    from retrainer.db.predictions import label_database, model_id_of
    from retrainer.predict import Classifier
    url, model = sys.argv[1], sys.argv[2]
    done = label_database(url, Classifier.load(model), model_id_of(model), batch_size=4)
    print(done.labelled)
""")


def test_overlapping_label_runs_skip_each_others_rows(db_url, tmp_path, model_dir):  # noqa: F811
    """A second process labels everything while the first is under way, and an image is
    deleted mid-run: the first run finishes, skips what the other wrote, counts the deletion."""
    from sqlalchemy import text

    from retrainer.predict import Classifier

    import_folder(db_url, make_colour_tree(tmp_path / "images", per_class=4))
    last = count(db_url, "SELECT MAX(id) FROM images")
    model_id = model_id_of(model_dir)
    other: list[subprocess.CompletedProcess] = []

    def overlap(done: int) -> None:
        if other:
            return
        other.append(subprocess.run([sys.executable, "-c", LABEL_ALL, db_url, str(model_dir)],
                                    capture_output=True, text=True, timeout=300))
        with connect(db_url).begin() as conn:
            conn.execute(text("DELETE FROM images WHERE id = :i"), {"i": last})

    result = label_database(db_url, Classifier.load(model_dir), model_id, batch_size=2,
                            on_batch=overlap)
    assert other[0].returncode == 0, other[0].stderr[-2000:]
    assert int(other[0].stdout.split()[-1]) == 12 - 2  # the first run had written one batch
    assert result.deleted == 1 and result.failed == 0
    assert result.labelled + result.deleted == 12
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == 11
    assert count(db_url, "SELECT COUNT(DISTINCT image_id) FROM predictions") == 11


def test_deeply_nested_filters_are_refused_clearly():
    with pytest.raises(FilterError, match="nests"):
        parse_filter("(" * 3000 + "id = 1" + ")" * 3000)
    with pytest.raises(FilterError, match="nests"):
        parse_filter("NOT " * 3000 + "id = 1")
    assert parse_filter("(" * MAX_DEPTH + "id = 1" + ")" * MAX_DEPTH) is not None


def test_a_password_in_the_query_string_is_masked(postgresql_server, tmp_path,  # noqa: F811
                                                  fast_config):
    from sqlalchemy.engine import URL

    from retrainer.training import train

    for text in ("postgresql://u@h/db?password=s3cret&sslmode=require",
                 "mysql://u:pw@h/db?sslmode=x&PassWord=s3cret"):
        assert "s3cret" not in masked(text) and "***" in masked(text)
    server = postgresql_server
    name = server.new_database().rsplit("/", 1)[1]
    url = URL.create("postgresql+psycopg", "retrainer_test", None, "127.0.0.1", server.port,
                     name, query={"password": PASSWORD}).render_as_string(hide_password=False)
    assert PASSWORD not in masked(url) and PASSWORD not in masked(connect(url).url)
    tree = make_colour_tree(tmp_path / "images", per_class=4)
    imported = CliRunner().invoke(_cli(), ["db", "import", "--image-dir", str(tree), "--db", url])
    assert imported.exit_code == 0, imported.output
    secret_forms = {PASSWORD, url.split("password=", 1)[1]}
    assert not any(s in imported.output for s in secret_forms)
    config = fast_config(None, source=dict(db=url))
    train(config)
    metadata = (Path(config.export.output_dir) / "metadata.json").read_text()
    assert not any(s in metadata for s in secret_forms) and "***" in metadata
    wrong = url.replace("password=", "password=wrong")
    with pytest.raises(DatabaseError) as err:
        connect(wrong)
    assert not any(s in str(err.value) for s in secret_forms)


def test_class_names_differing_only_in_case_import(db_url, tmp_path):
    tree = tmp_path / "images"
    for i in range(3):
        make_image(tree / "Cat" / f"{i}.png", (220, 30, 30), seed=i)
        make_image(tree / "cat" / f"{i}.png", (30, 200, 40), seed=10 + i)
    result = import_folder(db_url, tree)
    assert result.added == 6 and result.categories_added == 2
    assert count(db_url, "SELECT COUNT(*) FROM categories") == 2


def _cli():
    from retrainer.cli import cli

    return cli


def test_a_sqlite_path_under_a_file_is_a_one_line_error(tmp_path):
    from retrainer.cli import cli

    (tmp_path / "afile").write_text("x")
    for db in (tmp_path / "afile" / "x.db", tmp_path / "afile" / "sub" / "x.db"):
        result = CliRunner().invoke(cli, ["db", "stats", "--db", str(db)])
        assert result.exit_code == 1, result.output
        assert "cannot write to the database's folder" in result.output
        assert "unexpected" not in result.output and "--db PATH" in result.output


def test_text_or_numbers_in_the_blob_column_are_counted_skips(tmp_path):
    """SQLite lets any column hold TEXT or a number; such a row was 'unexpected TypeError' for
    train, label, evaluate and audit, and a failing classify() in db query."""
    import sqlite3

    from conftest import tiny_config
    from retrainer.cli import cli
    from retrainer.training import train

    db = tmp_path / "images.db"
    import_folder(str(db), make_colour_tree(tmp_path / "images", per_class=4))
    with sqlite3.connect(db) as conn:
        label, role = conn.execute("SELECT label_id, role_id FROM images LIMIT 1").fetchone()
        for path, value, digest in [("text.jpg", "a text value", "d"), ("int.jpg", 12345, "e")]:
            conn.execute("INSERT INTO images (label_id, role_id, blob, path, sha256) "
                         "VALUES (?, ?, ?, ?, ?)", (label, role, value, path, digest * 64))
    result = train(tiny_config(None, tmp_path / "model", tmp_path / "bn",
                               source={"db": str(db), "validation_percentage": 0.0}))
    reasons = {s.name: s.reason for s in result.skipped}
    assert "its blob is TEXT, not bytes" in reasons["#13 text.jpg"]
    assert "its blob is an INTEGER, not bytes" in reasons["#14 int.jpg"]

    labelled = CliRunner().invoke(cli, ["label", "--model-dir", str(tmp_path / "model"),
                                        "--db", str(db), "--json"])
    assert "unexpected" not in labelled.output, labelled.output
    query = CliRunner().invoke(cli, ["db", "query", "--db", str(db), "--model-dir",
                                     str(tmp_path / "model"), "--json",
                                     "SELECT path, classify(blob) AS label FROM images "
                                     "WHERE path IN ('text.jpg', 'int.jpg')"])
    assert query.exit_code == 0, query.output
    assert "null" in query.stdout and "unexpected" not in query.output
