"""MicroBatcher: concurrent submissions share forward passes and each gets its own row."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest

from retrainer.serve.batcher import MicroBatcher, QueueFull


class Recorder:
    """A 'model' that returns each image's mean and records the batch sizes it saw."""

    def __init__(self, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.fail = fail
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(5)
        self.sizes.append(len(batch))
        if self.fail:
            raise RuntimeError("model exploded")
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)


def image(value: float) -> np.ndarray:
    return np.full((2, 2, 3), value, np.float32)


async def submit_all(batcher: MicroBatcher, n: int) -> list[np.ndarray]:
    return await asyncio.wait_for(asyncio.gather(*(batcher.enqueue(image(i)) for i in range(n))),
                                  timeout=20)


def run(batcher: MicroBatcher, n: int) -> list[np.ndarray]:
    batcher.start()
    try:
        return asyncio.run(submit_all(batcher, n))
    finally:
        batcher.stop()


def test_concurrent_requests_share_one_pass_and_get_their_own_rows():
    model = Recorder()
    rows = run(MicroBatcher(model, max_batch_size=32, max_wait_ms=200), 10)
    assert model.sizes == [10]
    assert [float(r[0]) for r in rows] == [float(i) for i in range(10)]


def test_a_lone_request_does_not_wait():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch_size=32, max_wait_ms=5000)
    t = time.perf_counter()
    run(batcher, 1)
    assert time.perf_counter() - t < 2 and model.sizes == [1]


def test_the_batch_waits_for_an_announced_request():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch_size=32, max_wait_ms=5000)
    batcher.start()

    async def main() -> list[np.ndarray]:
        with batcher.incoming() as ticket:  # as if this request's image were still decoding
            first = asyncio.ensure_future(batcher.enqueue(image(0)))
            await asyncio.sleep(0.2)
            assert not first.done()
            second = batcher.enqueue(image(1), ticket)
            assert batcher._incoming == 0  # handed over as it was queued
        with batcher.incoming():  # a request that fails before queueing is forgotten
            pass
        assert batcher._incoming == 0
        return await asyncio.gather(first, second)

    try:
        rows = asyncio.run(main())
    finally:
        batcher.stop()
    assert model.sizes == [2] and [float(r[0]) for r in rows] == [0.0, 1.0]


def test_batches_never_exceed_the_maximum():
    model = Recorder()
    rows = run(MicroBatcher(model, max_batch_size=4, max_wait_ms=200), 10)
    assert model.sizes == [4, 4, 2]
    assert [float(r[0]) for r in rows] == [float(i) for i in range(10)]


def test_batch_size_one_turns_batching_off():
    model = Recorder()
    run(MicroBatcher(model, max_batch_size=1, max_wait_ms=200), 5)
    assert model.sizes == [1] * 5


def test_requests_queue_while_the_model_is_busy():
    """No wait at all: what arrives during a pass forms the next batch."""
    gate = threading.Event()
    model = Recorder(gate=gate)
    batcher = MicroBatcher(model, max_batch_size=32, max_wait_ms=0)
    batcher.start()

    async def main() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.enqueue(image(0)))
        await asyncio.sleep(0.05)  # the first pass is now running (held by the gate)
        rest = [asyncio.ensure_future(batcher.enqueue(image(i))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    try:
        rows = asyncio.run(main())
    finally:
        batcher.stop()
    assert model.sizes == [1, 5] and [float(r[0]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert batcher.stats.to_dict()["mean_batch"] == 3.0


def test_a_failing_pass_fails_its_requests_and_the_thread_survives():
    model = Recorder(fail=True)
    batcher = MicroBatcher(model, max_batch_size=8, max_wait_ms=50)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            asyncio.run(submit_all(batcher, 3))
        model.fail = False
        assert float(asyncio.run(submit_all(batcher, 1))[0][0]) == 0.0
    finally:
        batcher.stop()


def test_a_full_queue_refuses_instead_of_growing():
    gate = threading.Event()
    batcher = MicroBatcher(Recorder(gate=gate), max_batch_size=1, max_wait_ms=0, max_queue=2)
    batcher.start()

    async def main() -> None:
        held = [asyncio.ensure_future(batcher.enqueue(image(0)))]
        await asyncio.sleep(0.05)  # in the model, held there by the gate
        held += [asyncio.ensure_future(batcher.enqueue(image(i))) for i in (1, 2)]
        await asyncio.sleep(0.05)  # two queued
        with pytest.raises(QueueFull):
            batcher.enqueue(image(9))
        gate.set()
        await asyncio.gather(*held)

    try:
        asyncio.run(main())
    finally:
        batcher.stop()


def test_closed_loop_clients_settle_into_full_batches():
    """N clients that each send again once answered: the batch waits for the N it saw in
    flight (within max_wait) instead of running the stragglers as a second, small pass."""
    class SlowModel(Recorder):  # a pass takes time, as a real one does
        def __call__(self, batch: np.ndarray) -> np.ndarray:
            time.sleep(0.02)
            return super().__call__(batch)

    model = SlowModel()
    batcher = MicroBatcher(model, max_batch_size=32, max_wait_ms=500)
    batcher.start()

    async def client(i: int) -> None:
        for round_ in range(6):
            await asyncio.sleep(0.002 * i)  # answers reach the clients at different times
            with batcher.incoming() as ticket:
                await asyncio.sleep(0.001)  # reading and decoding the body
                future = batcher.enqueue(image(i), ticket)
            assert float((await future)[0]) == float(i)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(6))), timeout=20)

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    # The first passes start before all six are seen, and the clients that got in early
    # finish early; in between, every pass holds all six.
    assert sum(model.sizes) == 36 and max(model.sizes) == 6
    assert model.sizes.count(6) >= 3, model.sizes


def test_a_smaller_crowd_is_not_waited_for_after_the_peak_window(monkeypatch):
    import retrainer.serve.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "PEAK_WINDOW_S", 0.05)
    model = Recorder()
    batcher = MicroBatcher(model, max_batch_size=32, max_wait_ms=3000)
    run(batcher, 6)  # a peak of 6 in flight
    batcher.start()
    try:
        time.sleep(0.1)
        t = time.perf_counter()
        asyncio.run(submit_all(batcher, 1))
        assert time.perf_counter() - t < 1.5  # not the 3 s max_wait
    finally:
        batcher.stop()


def test_lanes_share_the_crowd_and_run_side_by_side():
    """Two lanes (one per session): each pass takes at most ceil(peak / (2 x lanes)) images,
    both lanes work at the same time, and every request still gets its own row."""
    passes: list[tuple[int, int, float, float]] = []  # lane, size, start, end

    def lane(number: int):
        def predict(batch: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            time.sleep(0.05)
            passes.append((number, len(batch), start, time.perf_counter()))
            return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)
        return predict

    batcher = MicroBatcher([lane(0), lane(1)], max_batch_size=32, max_wait_ms=200)
    batcher.start()

    async def main() -> list[np.ndarray]:
        with ExitStack() as stack:  # eight requests announced at once: a peak of 8
            tickets = [stack.enter_context(batcher.incoming()) for _ in range(8)]
            futures = [batcher.enqueue(image(i), t) for i, t in enumerate(tickets)]
        return await asyncio.wait_for(asyncio.gather(*futures), timeout=20)

    try:
        rows = asyncio.run(main())
    finally:
        batcher.stop()
    assert [float(r[0]) for r in rows] == [float(i) for i in range(8)]
    assert sum(size for _, size, _, _ in passes) == 8
    assert max(size for _, size, _, _ in passes) == 2  # ceil(8 / 4)
    assert {number for number, _, _, _ in passes} == {0, 1}
    first = {number: min((s, e) for n, _, s, e in passes if n == number) for number in (0, 1)}
    assert first[0][0] < first[1][1] and first[1][0] < first[0][1]  # their first passes overlap
    assert batcher.stats.to_dict()["images"] == 8  # counted across the lanes
