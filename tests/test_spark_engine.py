"""Engines without a Spark session: picked by name, one protocol, and the model the Spark engine
ships is read from the kept files, with no runner built on the driver."""
from __future__ import annotations

import pytest

from retrainer.backbones.factory import create_backbone
from retrainer.bottlenecks import BackboneModel, Engine, get_engine
from retrainer.errors import RetrainerError
from retrainer.runner import shippable
from retrainer.runtimes import RUNTIMES, installed

from conftest import TINY


def test_engines_by_name_satisfy_one_protocol() -> None:
    local = get_engine("local", workers=3, master=None)
    assert isinstance(local, Engine) and (local.name, local.workers) == ("local", 3)
    # --workers sizes the driver's hashing; it is no Spark option, and not an error there
    spark = get_engine("spark", workers=3, master="local[1]")
    assert isinstance(spark, Engine) and (spark.name, spark.master) == ("spark", "local[1]")
    assert not hasattr(spark, "workers")
    with pytest.raises(RetrainerError, match="master applies to the spark engine only"):
        get_engine("local", master="local[2]")
    with pytest.raises(RetrainerError, match="unknown engine 'ray'"):
        get_engine("ray")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_shipped_model_is_the_runners_without_building_one(tmp_path, monkeypatch,
                                                               runtime: str) -> None:
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    from retrainer.bottlenecks.extractor import make_forward
    from retrainer.runner import LaneRunner

    backbone = create_backbone(TINY)
    backbone.runtime = runtime
    expected = shippable(make_forward(backbone, tmp_path))  # also keeps the graph files

    def no_runner(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise AssertionError(f"{type(self).__name__} built on the driver")

    monkeypatch.setattr(LaneRunner, "__init__", no_runner)
    got = BackboneModel(backbone, tmp_path).shippable()
    assert got[:2] == expected[:2]
    if runtime == "tensorflow":  # the same graph (a proto's maps serialise in any order)
        from retrainer.graph import parse_graph_def

        assert parse_graph_def(got[2]) == parse_graph_def(expected[2])
    else:
        assert got[2] == expected[2]
