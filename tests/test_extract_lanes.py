"""Extraction on the runner's lanes: each lane decodes its own share and runs it a few images at
a time, and the bottlenecks are those of the decoding pool's whole batches."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from retrainer.backbones.factory import create_backbone
from retrainer.bottlenecks import BottleneckCache, get_engine
from retrainer.bottlenecks.extractor import make_forward
from retrainer.bottlenecks.runtime_choice import _rate
from retrainer.runner import LANE_STEP, LaneRunner
from retrainer.runtimes import RUNTIMES, installed
from retrainer.sources.base import ImageRecord

from conftest import COLOURS, TINY, make_image


class Recording(LaneRunner):
    """Wraps a runner; records the threads and the largest batch it ran."""

    def __init__(self, inner: LaneRunner) -> None:
        self.inner, self.runtime = inner, inner.runtime
        self.input_shape, self.output_dim = inner.input_shape, inner.output_dim
        self.threads: set[str] = set()
        self.largest = 0
        self._lock = threading.Lock()
        super().__init__(inner.replicas)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.largest = max(self.largest, len(batch))
        return self.inner.run_on(replica, batch)


@pytest.fixture
def items(tmp_path: Path) -> list[tuple[str, ImageRecord]]:
    paths = [make_image(tmp_path / f"{i}.png", rgb, size=30 + i, seed=i)
             for i, rgb in enumerate(list(COLOURS.values()) * 5)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    paths[3:3] = [bad, bad, bad, bad, tmp_path / "missing.png"]  # a whole share fails
    paths.append(bad)
    return [(f"{i:064x}", ImageRecord(key=str(p), label="", read=p.read_bytes, path=str(p)))
            for i, p in enumerate(paths)]


def extract(tmp_path: Path, name: str, items, runner, workers: int | None):
    spec = create_backbone(TINY).spec
    cache = BottleneckCache(tmp_path / name, "tiny", spec.feature_dim)
    skipped = get_engine("local", workers=workers).extract(
        items, runner, spec.input_size, spec.resize, cache, batch_size=8)
    cache = BottleneckCache(tmp_path / name, "tiny", spec.feature_dim)
    keys = [k for k, _ in items if k in cache]
    return skipped, dict(zip(keys, cache.load(keys))) if keys else {}


@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r != "auto"])
def test_lanes_cache_the_pools_bottlenecks(tmp_path: Path, items, runtime: str) -> None:
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    backbone = create_backbone(TINY)
    backbone.runtime = runtime
    runner = Recording(make_forward(backbone, tmp_path / "graphs"))
    assert runner.replicas == 2 or pytest.skip("one core: one lane")
    skipped, on_lanes = extract(tmp_path, "lanes", items, runner, None)
    lane_threads, largest = set(runner.threads), runner.largest
    pool_skipped, on_pool = extract(tmp_path, "pool", items, runner, 2)
    assert len(on_lanes) == 15 and on_lanes.keys() == on_pool.keys()
    for key in on_lanes:
        if runtime == "onnxruntime":  # its kernel for one image rounds off apart
            np.testing.assert_allclose(on_lanes[key], on_pool[key], rtol=2e-5, atol=1e-6)
        else:  # the other runtimes' outputs do not depend on the batch at all
            assert np.array_equal(on_lanes[key], on_pool[key]), key
    assert sorted(s.reason for s in skipped) == sorted(s.reason for s in pool_skipped)
    assert len(skipped) == 6
    # the lanes decoded and ran their own shares, LANE_STEP images at a time
    assert largest <= LANE_STEP < runner.largest
    assert lane_threads and all("-made" in name for name in lane_threads)


def test_auto_times_the_runtimes_as_extraction_runs_them(tmp_path: Path) -> None:
    runner = Recording(make_forward(create_backbone(TINY), tmp_path))
    x = np.zeros((16, *runner.input_size, 3), np.float32)
    assert _rate(runner, x, 0.05) > 0
    assert runner.largest <= LANE_STEP
    assert all("-made" in name for name in runner.threads) or runner.replicas == 1

