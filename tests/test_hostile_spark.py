"""The Spark engine off the happy path: augmented variants and database rows (records that
are not files), and files deleted between the scan and the Spark job. Real local[2] Spark."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_colour_tree

pytest.importorskip("pyspark")

from test_spark import _all_rows  # noqa: E402

from retrainer.config import AugmentConfig  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    """The running local[2] session of test_spark when there is one; else one of our own."""
    import shutil

    from retrainer.spark.session import active_session, start_session

    running = active_session()
    if running is not None:
        yield running
        return
    session, log_path = start_session("local[2]", "retrainer tests")
    yield session
    session.stop()
    shutil.rmtree(log_path.parent, ignore_errors=True)


@pytest.fixture
def clean_tree(tmp_path) -> Path:
    return make_colour_tree(tmp_path / "images", per_class=6)


def test_spark_trains_with_augmentation(spark, clean_tree, fast_config, tmp_path):
    """The variants are not files: their bytes go to Spark under the variant keys, so a
    local run afterwards finds every variant in the cache."""
    from retrainer.training import train

    def config(engine: str):
        return fast_config(clean_tree, augment=AugmentConfig(flip_left_right=True, variants=2),
                           extraction=dict(engine=engine, bottleneck_dir=str(tmp_path / "bn")))

    on_spark = train(config("spark"))
    assert on_spark.bottlenecks_computed == 18 and not on_spark.skipped
    rows = _all_rows(Path(on_spark.cache_dir))
    training = sum(on_spark.counts["training"].values())
    assert len(rows) == 18 + 2 * training
    local = train(config("local"))
    assert local.bottlenecks_computed == 0
    assert len(_all_rows(Path(local.cache_dir))) == len(rows)  # no variant computed again


def test_spark_trains_from_a_database(spark, clean_tree, fast_config, tmp_path):
    from retrainer.db.importer import import_folder
    from retrainer.training import train

    db = str(tmp_path / "images.db")
    import_folder(db, clean_tree)
    on_spark = train(fast_config(None, source=dict(db=db), extraction=dict(engine="spark")))
    assert on_spark.bottlenecks_computed == 18 and not on_spark.skipped
    local = train(fast_config(clean_tree))  # same contents, same cache entries
    assert (local.bottlenecks_computed, local.bottlenecks_cached) == (0, 18)


def test_a_file_deleted_before_the_job_is_a_counted_skip(spark, clean_tree,
                                                         tmp_path):
    from retrainer.backbones.factory import create_backbone, resolve_spec
    from retrainer.bottlenecks import BackboneModel, BottleneckCache, hash_records
    from retrainer.bottlenecks.engines.spark import SparkEngine
    from retrainer.bottlenecks.extractor import graphs_dir
    from retrainer.sources.folder import scan_folder

    from conftest import TINY

    dataset = scan_folder(clean_tree)
    keys, _ = hash_records(dataset.records)
    items = list(zip(keys, dataset.records))
    spec = resolve_spec(TINY, None)
    backbone = create_backbone(spec, None, lazy=True)
    cache = BottleneckCache(tmp_path / "bn", backbone.cache_id, spec.feature_dim)
    gone = [rec for _, rec in items[:2]]
    for rec in gone:
        Path(rec.path).unlink()
    engine = SparkEngine(spark=spark)
    # Past the engine's own look at the files: as if deleted while the job is planned.
    by_path = {str(Path(rec.path).resolve()): rec for _, rec in items}
    shipped = BackboneModel(backbone, graphs_dir()).shippable()
    failures = engine._extract(spark, by_path, [], shipped, spec.input_size, spec.resize, cache, 8)
    assert sorted(f.name for f in failures) == sorted(rec.display for rec in gone)
    assert all("deleted" in f.reason for f in failures)
    assert len(cache.missing([k for k, _ in items[2:]])) == 0


def test_a_failed_label_job_leaves_no_output_folder_behind(spark, clean_tree, tmp_path):
    """The executors fail half-way (Spark's own raise_error, in the JVM): the new output folder
    is removed, so running again is not refused with "already exists"; an existing one stays."""
    from pyspark.sql import functions as F

    from retrainer.spark.label import _write
    from retrainer.spark.session import SparkError
    from retrainer.spark.workers import spark_path

    def failing_udf(content):
        return F.struct(F.lit("x").alias("label"), F.lit(1.0).alias("score"),
                        F.array(F.lit("x")).alias("top_labels"),
                        F.array(F.lit(1.0)).alias("top_scores"),
                        F.when(F.length(content) > 0, F.raise_error(F.lit("injected failure")))
                        .cast("string").alias("error"))

    paths = [spark_path(str(p.resolve())) for p in sorted(clean_tree.rglob("*.png"))]
    out = tmp_path / "labels.parquet"
    with pytest.raises(SparkError):
        _write(spark, paths, [], str(out), failing_udf, fresh=True)
    assert not out.exists()
    kept = tmp_path / "kept.parquet"
    kept.mkdir()
    (kept / "mine.txt").write_text("not Spark's")
    with pytest.raises(SparkError):
        _write(spark, paths, [], str(kept), failing_udf, fresh=False)
    assert kept.is_dir()
