"""The Spark engine on a real local[2] Spark: same cache, same features, same labels."""
from __future__ import annotations

import dataclasses
import json
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

from retrainer.bottlenecks import BottleneckCache  # noqa: E402
from retrainer.bottlenecks.fill import fill_cache  # noqa: E402
from retrainer.bottlenecks.spark import SparkEngine, read_images, spark_path  # noqa: E402
from retrainer.cli import cli  # noqa: E402
from retrainer.spark_session import SparkError, check_master, find_java, start_session  # noqa: E402


@pytest.fixture(scope="session")
def spark():
    session, log_path = start_session("local[2]", "retrainer tests")
    yield session
    session.stop()
    log_path.unlink(missing_ok=True)


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
    from retrainer.training import train

    def config(cache: str, **kw):
        return dataclasses.replace(fast_config(tree, **kw), bottleneck_dir=str(tmp_path / cache))

    by_spark = fill_cache(config("spark"), engine=SparkEngine(spark=spark))
    by_local = fill_cache(config("local"))
    assert (by_spark.computed, by_spark.cached) == (30, 0) and by_spark.engine == "spark"
    reasons = {Path(s.name).name: s.reason for s in by_spark.skipped}
    assert reasons == {Path(s.name).name: s.reason for s in by_local.skipped}
    assert sorted(reasons) == ["empty.png", "notes.jpg", "truncated[1].png"]

    spark_rows = _all_rows(Path(by_spark.cache_dir))
    local_rows = _all_rows(Path(by_local.cache_dir))
    assert Path(by_spark.cache_dir).name == Path(by_local.cache_dir).name  # same backbone id
    assert sorted(spark_rows) == sorted(local_rows) and len(spark_rows) == 30
    for key, row in local_rows.items():
        np.testing.assert_allclose(spark_rows[key], row, atol=1e-5)

    result = train(config("spark", testing_percentage=25))
    assert (result.bottlenecks_computed, result.bottlenecks_cached) == (0, 30)
    assert result.test_accuracy == 1.0
    again = fill_cache(config("spark"), engine=SparkEngine(spark=spark))
    assert (again.computed, again.cached) == (0, 30)


def test_many_small_files_share_tasks(spark, tree):
    files = sorted(str(p) for p in tree.rglob("img*.png"))
    frame = read_images(spark, [spark_path(p) for p in files])
    parts = frame.rdd.getNumPartitions()
    assert 2 <= parts <= 8, parts  # not one task per image: 30 files, 2 cores
    assert frame.count() == len(files) == 30


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
