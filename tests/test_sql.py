"""The SQL source and sink against SQLite, MariaDB and PostgreSQL (real servers, see sql_servers).

Every test taking ``db_url`` runs once per database. Servers that are not installed fail these
tests with a clear message; set RETRAINER_TEST_SKIP_SERVERS=1 to skip them instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_colour_tree, make_image, train_tiny_model
from PIL import Image
from sql_servers import PASSWORD, SERVERS, ServerMissing

from retrainer.db.importer import import_folder
from retrainer.db.predictions import ACCURACY_SQL, label_database, model_id_of
from retrainer.db.stats import class_distribution
from retrainer.db.url import DatabaseError, connect
from retrainer.db.source import scan_database

SKIP_SERVERS = os.environ.get("RETRAINER_TEST_SKIP_SERVERS") == "1"
EVIL = "x'); DROP TABLE images; --"


def _start(kind: str):
    try:
        return SERVERS[kind]().start()
    except ServerMissing as exc:
        if SKIP_SERVERS:
            pytest.skip(f"{exc} (RETRAINER_TEST_SKIP_SERVERS=1)")
        pytest.fail(f"{exc}: install it (scripts/apt-packages.txt, 'make system-deps') or set "
                    "RETRAINER_TEST_SKIP_SERVERS=1 to skip the tests that need it", pytrace=False)


@pytest.fixture(scope="session")
def mariadb_server():
    server = _start("mariadb")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgresql_server():
    server = _start("postgresql")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "mariadb", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh empty database: a SQLite file path, or a URL on a real server."""
    if request.param == "sqlite":
        return str(tmp_path / "images.db")
    return request.getfixturevalue(f"{request.param}_server").new_database()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny colour classifier exported once (trained from a folder: the model does not care)."""
    return train_tiny_model(tmp_path_factory.mktemp("model"))


def split_tree(root: Path, per_split: dict[str, int]) -> Path:
    """root/{train,val,test}/<colour>/*.png."""
    for s, (split, n) in enumerate(per_split.items()):
        for c, (name, rgb) in enumerate(COLOURS.items()):
            for i in range(n):
                make_image(root / split / name / f"{i}.png", rgb, seed=10_000 * s + 100 * c + i)
    return root


def count(db_url: str, sql: str, **params) -> int:
    from sqlalchemy import text

    with connect(db_url).connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def test_import_is_idempotent_and_skips_bad_files(db_url, tmp_path):
    images = make_colour_tree(tmp_path / "images", per_class=6)
    (images / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(images / "green" / "img000.png", images / "green" / "copy.png")

    first = import_folder(db_url, images, batch_size=5)
    assert (first.added, first.existing, len(first.skipped)) == (18, 1, 1)
    assert "broken.png" in first.skipped[0].name
    again = import_folder(db_url, images)
    assert (again.added, again.existing, len(again.skipped)) == (0, 19, 1)

    dist = class_distribution(db_url)
    assert dist.total == 18 and dist.classes == sorted(COLOURS)
    assert dist.to_dict()["per_class"] == {c: 6 for c in COLOURS}
    dataset = scan_database(db_url)
    from retrainer.split import split_of

    for rec in dataset.records:  # roles are the folder's own stable hash split
        assert rec.split == split_of(rec.key, 10, 10)
        assert hashlib.sha256(rec.read()).digest() == hashlib.sha256(
            (images / rec.key).read_bytes()).digest()


def test_train_and_label_from_the_database(db_url, tmp_path, fast_config):
    from sqlalchemy import text

    from retrainer.evaluation import evaluate_folder
    from retrainer.predict import Classifier
    from retrainer.training import train

    tree = split_tree(tmp_path / "tree", {"train": 6, "val": 2, "test": 3})
    import_folder(db_url, tree)
    config = fast_config(None, source=dict(db=db_url))
    result = train(config)
    assert result.counts == {"training": {c: 6 for c in COLOURS},
                             "validation": {c: 2 for c in COLOURS},
                             "testing": {c: 3 for c in COLOURS}}
    assert result.bottlenecks_computed == 33 and result.test_accuracy == 1.0
    if "://" not in db_url:  # the folder's images hit the same cache entries (content keys)
        assert train(fast_config(tree)).bottlenecks_cached == 33

    classifier = Classifier.load(config.export.output_dir)
    model_id = model_id_of(config.export.output_dir)
    done = label_database(db_url, classifier, model_id, where="role = 'testing'", batch_size=4)
    assert (done.selected, done.labelled, done.already, done.failed) == (9, 9, 0, 0)
    with connect(db_url).connect() as conn:
        acc, n = conn.execute(text(ACCURACY_SQL), {"model_id": model_id, "role": "testing"}).one()
    report = evaluate_folder(str(tree), config.export.output_dir)  # scores test/
    assert n == report.n == 9 and float(acc) == pytest.approx(report.accuracy) == done.accuracy

    again = label_database(db_url, classifier, model_id, where="role = 'testing'")
    assert (again.labelled, again.already) == (0, 9)
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == 9


def test_killed_labelling_resumes_without_duplicates_or_gaps(db_url, tmp_path, model_dir):
    """SIGKILL in the middle of a run, then run again: every image once, none missing."""
    from retrainer.predict import Classifier

    import_folder(db_url, make_colour_tree(tmp_path / "images", per_class=10))
    script = textwrap.dedent(f"""
        import os, signal
        from retrainer.db.predictions import label_database, model_id_of
        from retrainer.predict import Classifier
        classifier = Classifier.load({str(model_dir)!r})
        runner = classifier.runner
        seen, forward = [], runner.run_on
        def run_on(session, pixels):
            seen.extend(pixels)
            if len(seen) > 8:  # the third batch of 4 is in flight
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(session, pixels)
        runner.run_on = run_on
        label_database({db_url!r}, classifier, model_id_of({str(model_dir)!r}), batch_size=4,
                       workers=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # whole batches only: the first is committed before the third starts, the second may be
    committed = count(db_url, "SELECT COUNT(*) FROM predictions")
    assert committed in (4, 8)

    result = label_database(db_url, Classifier.load(model_dir), model_id_of(model_dir),
                            batch_size=4)
    assert (result.selected, result.already, result.labelled) == (30, committed, 30 - committed)
    assert result.accuracy == 1.0
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == 30
    assert count(db_url, "SELECT COUNT(DISTINCT image_id) FROM predictions") == 30
    assert count(db_url, "SELECT COUNT(*) FROM images i WHERE NOT EXISTS "
                         "(SELECT 1 FROM predictions p WHERE p.image_id = i.id)") == 0


def test_a_one_megabyte_blob_round_trips_and_is_labelled(db_url, tmp_path, model_dir):
    from retrainer.predict import Classifier

    images = make_colour_tree(tmp_path / "images", per_class=2)
    noise = np.random.default_rng(0).integers(0, 255, (620, 620, 3), dtype=np.uint8)
    noise[..., 1:] //= 8  # mostly red
    big = images / "red" / "big.png"
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > 1_000_000
    assert import_folder(db_url, images).added == 7
    [rec] = [r for r in scan_database(db_url).records if r.key == "red/big.png"]
    assert rec.read() == big.read_bytes()
    result = label_database(db_url, Classifier.load(model_dir), model_id_of(model_dir),
                            where="path LIKE '%big%'")
    assert (result.labelled, result.failed) == (1, 0)


def test_malicious_labels_and_filters_stay_data(db_url, tmp_path):
    from retrainer.db.filters import FilterError

    names = {EVIL: (200, 0, 0), 'a"; DELETE FROM roles; --': (0, 0, 200), "café ☕ 猫": (0, 200, 0)}
    images = make_colour_tree(tmp_path / "images", per_class=2, colours=names)
    import_folder(db_url, images)
    assert class_distribution(db_url).classes == sorted(names)
    assert len(scan_database(db_url, labels=["café ☕ 猫", EVIL]).records) == 4
    quoted = EVIL.replace("'", "''")
    from retrainer.db.source import list_images

    engine = connect(db_url)
    assert len(list_images(engine, where=f"label = '{quoted}'")) == 2
    assert len(list_images(engine, labels=[EVIL])) == 2
    assert list_images(engine, labels=["x' OR '1'='1"]) == []
    for where in ("role = 'testing'; DROP TABLE images", "1=1", "role = 'a' OR 1=1",
                  "label = (SELECT name FROM roles)", "id > 0 UNION SELECT 1", "label = 'x"):
        with pytest.raises(FilterError):
            list_images(engine, where=where)
    assert count(db_url, "SELECT COUNT(*) FROM images") == 6
    assert count(db_url, "SELECT COUNT(*) FROM roles") == 3


def test_images_without_a_role_are_split_by_hash(db_url, tmp_path):
    from retrainer.db.importer import import_dataset
    from retrainer.sources.folder import scan_folder
    from retrainer.split import assign_splits, split_of

    dataset = scan_folder(make_colour_tree(tmp_path / "images", per_class=8))
    assert import_dataset(db_url, dataset).added == 24
    assert class_distribution(db_url).roles == ["(no role)"]
    split = assign_splits(scan_database(db_url), 25, 25)
    assert {r.split for r in split.records} == {"training", "validation", "testing"}
    assert all(r.split == split_of(r.key, 25, 25) for r in split.records)


@pytest.mark.parametrize("kind", ["mariadb", "postgresql"])
def test_special_character_password_works_and_is_never_shown(kind, request, tmp_path):
    from click.testing import CliRunner

    from retrainer.cli import cli
    from retrainer.db.url import masked

    server = request.getfixturevalue(f"{kind}_server")
    url = server.new_database()
    images = make_colour_tree(tmp_path / "images", per_class=2)
    result = CliRunner().invoke(cli, ["-v", "db", "import", "--image-dir", str(images),
                                      "--db", url])
    assert result.exit_code == 0, result.output
    assert "Imported 6 image(s)" in result.output and "***" in result.output
    secret_forms = {PASSWORD, url.split("//", 1)[1].split("@127")[0].split(":", 1)[1]}
    assert not any(s in result.output for s in secret_forms)

    # the password from the environment, not the URL
    bare = server.url(url.rsplit("/", 1)[1], password=None)
    env = CliRunner(env={"RETRAINER_DB_PASSWORD": PASSWORD})
    stats = env.invoke(cli, ["db", "stats", "--json", "--db", bare])
    assert stats.exit_code == 0 and '"total": 6' in stats.output

    wrong = server.url("t1", password="wrong" + PASSWORD)
    with pytest.raises(DatabaseError) as err:
        connect(wrong)
    assert PASSWORD not in str(err.value) and "***" in str(err.value)
    assert "user and password" in (err.value.hint or "")
    assert PASSWORD not in masked(connect(url).url)

    from retrainer.db.functions import run_query

    assert run_query(url, "SELECT COUNT(*) FROM images WHERE path LIKE '%red%'").rows == [(2,)]
    with pytest.raises(DatabaseError, match="SQLite only"):
        run_query(url, "SELECT 1", classifier=object())


def test_classify_runs_inside_a_sqlite_query(tmp_path, model_dir):
    from retrainer.db.functions import run_query
    from retrainer.predict import Classifier

    db = str(tmp_path / "images.db")
    images = make_colour_tree(tmp_path / "images", per_class=3)
    (images / "red" / "broken.png").write_bytes(b"junk")
    import_folder(db, images)
    classifier = Classifier.load(model_dir)
    result = run_query(db, "SELECT i.id, c.name, classify(blob), classify_score(blob) FROM images i"
                           " JOIN categories c ON c.id = i.label_id ORDER BY i.id", classifier)
    assert result.columns[2:] == ["classify(blob)", "classify_score(blob)"]
    assert len(result.rows) == 9
    assert all(label == predicted and score > 0.5 for _, label, predicted, score in result.rows)
    with pytest.raises(DatabaseError, match="readonly|read-only|query_only|attempt to write"):
        run_query(db, "DELETE FROM images")
    assert run_query(db, "SELECT COUNT(*) FROM images").rows == [(9,)]
