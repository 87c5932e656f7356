"""The Spark engine on a real local[2] Spark: same cache, same features, same labels."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COLOURS, TINY, make_colour_tree

pytest.importorskip("pyspark")

from retrainer.bottlenecks.fill import fill_cache  # noqa: E402
from retrainer.cli import cli  # noqa: E402
from retrainer.spark.session import SparkError, check_master, find_java, start_session  # noqa: E402
from retrainer.spark.workers import read_images, spark_path  # noqa: E402


@pytest.fixture(scope="session")
def spark():
    session, log_path = start_session("local[2]", "retrainer tests")
    yield session
    session.stop()
    shutil.rmtree(log_path.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Three colour classes plus one file of each kind of failure."""
    root = make_colour_tree(tmp_path_factory.mktemp("spark") / "images", per_class=10)
    red = root / "red"
    (red / "empty.png").write_bytes(b"")
    (red / "notes.jpg").write_text("not an image")
    good = (red / "img002.png").read_bytes()
    (red / "truncated[1].png").write_bytes(good[: len(good) // 3])  # glob characters in a name
    return root


def _all_rows(cache_dir: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for shard in sorted(cache_dir.glob("shard-*.npz")):
        with np.load(shard) as npz:
            for key, row in zip(npz["keys"], npz["bottlenecks"]):
                out[key.tobytes().hex()] = row
    return out


def test_spark_fills_the_cache_local_train_uses_with_the_same_features(
        spark, tree, fast_config, tmp_path):
    """train --engine spark (on the running session), then an ordinary local train."""
    from retrainer.training import train

    def config(cache: str, **kw):
        return fast_config(tree, source=dict(testing_percentage=25),
                           extraction=dict(bottleneck_dir=str(tmp_path / cache), **kw))

    on_spark = train(config("spark", engine="spark"))
    assert (on_spark.bottlenecks_computed, on_spark.bottlenecks_cached) == (30, 0)
    by_local = fill_cache(config("local"))
    reasons = {Path(s.name).name: s.reason for s in on_spark.skipped}
    assert reasons == {Path(s.name).name: s.reason for s in by_local.skipped}
    assert sorted(reasons) == ["empty.png", "notes.jpg", "truncated[1].png"]

    spark_rows = _all_rows(Path(on_spark.cache_dir))
    local_rows = _all_rows(Path(by_local.cache_dir))
    assert Path(on_spark.cache_dir).name == Path(by_local.cache_dir).name  # same backbone id
    assert sorted(spark_rows) == sorted(local_rows) and len(spark_rows) == 30
    for key, row in local_rows.items():
        np.testing.assert_allclose(spark_rows[key], row, atol=1e-5)

    local = train(config("spark"))
    assert (local.bottlenecks_computed, local.bottlenecks_cached) == (0, 30)
    assert local.test_accuracy == on_spark.test_accuracy == 1.0


def test_many_small_files_share_tasks(spark, tmp_path):
    rng = np.random.default_rng(0)
    files = [tmp_path / f"{i:03d}.jpg" for i in range(300)]
    for f in files:
        f.write_bytes(rng.bytes(2000))
    frame = read_images(spark, [spark_path(str(p)) for p in files])
    parts = frame.rdd.getNumPartitions()
    cores = spark.sparkContext.defaultParallelism
    assert cores <= parts <= 4 * cores + 1, parts  # a few tasks per core, not one per image
    assert frame.count() == 300


def test_unreachable_master_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(SparkError, match=f"cannot reach the Spark master at 127.0.0.1:{port}"):
        check_master(f"spark://127.0.0.1:{port}")
    assert time.perf_counter() - t < 10
    with pytest.raises(SparkError, match="bad Spark master"):
        check_master("spark://nohostport")
    check_master("local[2]")  # local masters need no probe


def test_missing_java_and_missing_pyspark_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SparkError, match="Spark needs Java") as info:
        find_java()
    assert "openjdk-17-jre-headless" in info.value.hint
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(SparkError, match="has no bin/java"):
        find_java()
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "from retrainer.cli import cli\n"
            "cli(['bottlenecks', '--image-dir', sys.argv[1], '--engine', 'spark'],"
            " prog_name='retrainer')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 1, out.stderr
    assert "needs pyspark" in out.stderr and "retrainer[spark]" in out.stderr
    assert "Traceback" not in out.stderr


def test_parquet_labels_match_retrainer_label(spark, tree, fast_config, tmp_path):
    import pandas as pd

    from retrainer.predict import Classifier, expand_inputs
    from retrainer.training import train

    config = fast_config(tree)
    train(config)
    out = tmp_path / "labels.parquet"
    args = ["label", "--engine", "spark", "--model-dir", config.export.output_dir, "--top-k", "2",
            "--output", str(out), str(tree)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output  # the three broken files
    assert f"labelled 30 image(s), 3 failed -> {out}" in result.output
    table = pd.read_parquet(out).set_index("path")
    assert list(table.columns) == ["label", "score", "top_k", "error"]

    paths, _ = expand_inputs([str(tree)])
    expected = list(Classifier.load(config.export.output_dir).label_paths(paths, top_k=2))
    assert sorted(table.index) == sorted(r.path for r in expected) and len(expected) == 33
    for want in expected:
        row = table.loc[want.path]
        if want.error:
            assert row["error"] == want.error and row["label"] is None
            continue
        assert row["error"] is None and row["label"] == want.predictions[0].label
        assert row["score"] == pytest.approx(want.predictions[0].score, abs=1e-6)
        assert [t["label"] for t in row["top_k"]] == [p.label for p in want.predictions]
        np.testing.assert_allclose([t["score"] for t in row["top_k"]],
                                   [p.score for p in want.predictions], atol=1e-6)
    assert set(table["label"].dropna()) == set(COLOURS)

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output and "--overwrite" in again.output
    wrong = CliRunner().invoke(cli, ["label", "--output", str(out), str(tree)])
    assert wrong.exit_code == 2 and "needs --engine spark" in wrong.output


def test_bottlenecks_command_reports_json(spark, tree, tmp_path):
    args = ["bottlenecks", "--image-dir", str(tree), "--architecture", TINY,
            "--bottleneck-dir", str(tmp_path / "cache"), "--engine", "spark", "--json"]
    first = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)
    assert (first["computed"], first["cached"], len(first["skipped"])) == (30, 0, 3)
    assert first["engine"] == "spark"
    second = json.loads(CliRunner().invoke(cli, args[:-3] + ["--json"]).stdout)  # local engine
    assert (second["computed"], second["cached"], second["engine"]) == (0, 30, "local")
    mixed = CliRunner().invoke(cli, args[:-3] + ["--spark-master", "local[2]"])
    assert mixed.exit_code == 2 and "--spark-master needs --engine spark" in mixed.output


_CLI = """
import sys
sys.path.insert(0, sys.argv.pop(1))
from conftest import TINY, tiny_builder
from retrainer.backbones import BackboneSpec, register
register(BackboneSpec(TINY, (32, 32), 0.0, 255.0, 3, tiny_builder, weights="none"))
from retrainer.cli import main
sys.argv[0] = "retrainer"
main()
"""


def test_a_fresh_spark_from_the_command_line_is_quiet(tree, tmp_path):
    """The real entry point, a new JVM on local[1]: Spark's console noise stays off stderr."""
    args = [sys.executable, "-c", _CLI, str(Path(__file__).parent), "bottlenecks",
            "--image-dir", str(tree), "--architecture", TINY, "--bottleneck-dir",
            str(tmp_path / "cache"), "--engine", "spark", "--spark-master", "local[1]", "--json"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["computed"] == 30
    noise = [line for line in out.stderr.splitlines()
             if not line.startswith("warning: skipped") and line.strip()]
    assert all(word not in "\n".join(noise) for word in ("WARN", "INFO", "log4j", "Stage ")), noise
