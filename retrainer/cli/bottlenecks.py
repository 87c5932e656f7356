"""``retrainer bottlenecks``: fill the bottleneck cache only (local or on Spark)."""
from __future__ import annotations

import click

from ..config import ExtractionConfig, SourceConfig, TrainConfig
from .common import backbone_configs, backbone_options, echo_json, json_option

ENGINES = ("local", "spark")


def engine_options(fn):  # noqa: ANN001, ANN201 - click decorator
    """--engine and --spark-master, shared by train, bottlenecks and label."""
    fn = click.option("--spark-master", default=None, metavar="URL",
                      help="With --engine spark: local[N], spark://HOST:PORT, yarn... "
                           "(default: the running session, else local[*]).")(fn)
    fn = click.option("--engine", default=ExtractionConfig().engine, show_default=True,
                      type=click.Choice(ENGINES),
                      help="Where images go through the backbone: here, or on Spark.")(fn)
    return fn


def check_engine(engine: str, spark_master: str | None) -> None:
    """Fail before any slow work: pyspark missing, a master without Spark, unreachable master."""
    if engine != "spark":
        if spark_master:
            raise click.UsageError("--spark-master needs --engine spark.")
        return
    from ..spark.session import DEFAULT_MASTER, check_master, import_pyspark

    import_pyspark()
    check_master(spark_master or DEFAULT_MASTER)


@click.command()
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder with one sub-folder of images per class (as for train).")
@backbone_options
@engine_options
@json_option
def bottlenecks(as_json: bool, **options: object) -> None:
    """Compute and cache the bottlenecks of an image folder, without training.

    A later 'retrainer train' with the same --backbone and --bottleneck-dir finds them all.

    \b
      retrainer bottlenecks --image-dir photos/ --engine spark --spark-master 'local[4]'
      retrainer bottlenecks --image-dir /shared/photos --engine spark \\
          --spark-master spark://head:7077 --bottleneck-dir /shared/cache
    """
    from ..bottlenecks.fill import fill_cache

    check_engine(str(options["engine"]), options.get("spark_master"))  # type: ignore[arg-type]
    source = SourceConfig(image_dir=options.pop("image_dir"))  # type: ignore[arg-type]
    backbone, extraction = backbone_configs(options)
    assert not options, f"options in no config group: {sorted(options)}"
    result = fill_cache(TrainConfig(source=source, backbone=backbone, extraction=extraction))
    if as_json:
        echo_json(result.to_dict())
        return
    for s in result.skipped:
        click.echo(f"skipped {s.name}: {s.reason}", err=True)
    click.echo(f"Bottlenecks: {result.computed} computed, {result.cached} already cached, "
               f"{len(result.skipped)} skipped ({result.engine} engine, "
               f"{result.timings['extract']:.1f} s) in {result.cache_dir}")
