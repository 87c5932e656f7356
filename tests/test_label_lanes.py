"""`label` decoding on the runner's lanes: the same results as a decoding pool, in input order."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrainer.images import load_pixels
from retrainer.predict import Classifier
from retrainer.runner import LaneRunner

from conftest import COLOURS, make_image


class ChannelMeans(LaneRunner):
    """A real (if tiny) model in NumPy: softmax of each image's mean colour / 50.

    It records which threads ran batches and how many ran at once.
    """

    runtime = "numpy"

    def __init__(self, replicas: int = 2, size: int = 24) -> None:
        self.input_shape = (None, size, size, 3)
        self.output_dim = 3
        self.threads: set[str] = set()
        self.running = self.most_running = self.largest = 0
        self._count = threading.Lock()
        super().__init__(replicas)

    def run_on(self, replica: int, batch: np.ndarray) -> np.ndarray:
        with self._count:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.threads.add(threading.current_thread().name)
            self.largest = max(self.largest, len(batch))
        try:
            logits = batch.mean(axis=(1, 2)) / 50.0
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        finally:
            with self._count:
                self.running -= 1


def classifier(replicas: int = 2) -> Classifier:
    return Classifier(None, ["red", "green", "blue"], {}, runner=ChannelMeans(replicas))


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    good = [str(make_image(tmp_path / f"{i}.png", rgb, size=40 + i, seed=i))
            for i, rgb in enumerate(list(COLOURS.values()) * 4)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    missing = str(tmp_path / "missing.png")
    # failures first, between, and filling a whole share of a batch (4 in a row)
    return ([str(bad)] + good[:5] + [missing, str(bad), str(bad), str(bad)] + good[5:]
            + [str(bad)])


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_lanes_give_the_decoding_pools_results_in_input_order(paths: list[str],
                                                              batch_size: int) -> None:
    model = classifier()
    on_lanes = list(model.label_paths(paths, top_k=2, batch_size=batch_size))
    runner = model.runner
    lane_threads, most_running, largest = set(runner.threads), runner.most_running, runner.largest
    on_pool = list(model.label_paths(paths, top_k=2, batch_size=batch_size, workers=2))
    assert [r.path for r in on_lanes] == paths
    assert [r.to_dict() for r in on_lanes] == [r.to_dict() for r in on_pool]
    assert sum(r.error is not None for r in on_lanes) == 6
    assert "cannot read" in on_lanes[6].error and "not an image" in on_lanes[0].error
    for a, b in zip(on_lanes, on_pool):
        if a.error is None:
            assert np.array_equal(a.probabilities, b.probabilities)
            assert len(a.predictions) == 2
    # each lane decoded and ran its own shares: no more threads at once than lanes
    assert most_running <= 2
    assert largest <= 2  # each share runs two images at a time (LANE_STEP)
    assert lane_threads and all(name.startswith("numpy-made") for name in lane_threads)


def test_a_share_run_in_steps_scores_as_in_one_run() -> None:
    runner = ChannelMeans()
    batch = np.random.default_rng(1).uniform(0, 255, (7, 24, 24, 3)).astype(np.float32)
    jobs = [lambda i=i: (i, batch[i:i + 3]) for i in range(0, 7, 3)]
    whole = dict(runner.stream_made(iter(jobs)))
    stepped = dict(runner.stream_made(iter(jobs), step=2))
    assert list(stepped) == [0, 3, 6] and runner.largest == 3
    for tag in whole:
        assert np.array_equal(whole[tag], stepped[tag])


def test_one_lane_labels_on_the_calling_thread(paths: list[str]) -> None:
    model = classifier(replicas=1)
    results = list(model.label_paths(paths, batch_size=4))
    assert [r.path for r in results] == paths
    assert model.runner.threads == {threading.current_thread().name}


def test_stopping_early_leaves_no_job_running(paths: list[str]) -> None:
    model = classifier()
    results = model.label_paths(paths * 5, batch_size=2)
    first = [next(results) for _ in range(3)]
    results.close()  # the consumer stops: the queued jobs are dropped, the running ones end
    assert [r.path for r in first] == paths[:3]
    assert model.runner.running == 0


def test_pixels_written_into_a_batch_row_are_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 255, (375, 500, 3), np.uint8))
    encoded = []
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        photo.save(buf, fmt)
        encoded.append(buf.getvalue())
    small = io.BytesIO()
    photo.resize((60, 40)).save(small, "JPEG")
    encoded.append(small.getvalue())
    for size, resize in [((224, 224), "bilinear"), ((32, 24), "bilinear"), ((64, 64), "bicubic")]:
        fresh = [load_pixels(data, size, resize) for data in encoded]
        kept = [f.copy() for f in fresh]
        batch = np.full((len(encoded), *size, 3), -1.0, np.float32)
        for i, data in enumerate(encoded):
            load_pixels(data, size, resize, out=batch[i])
        # one decode's buffers are not another's result: earlier results are unchanged
        for f, k, row in zip(fresh, kept, batch):
            assert f.dtype == np.float32 and np.array_equal(f, k)
            assert np.array_equal(row, k)
