"""The bottleneck cache: round trip, atomic shards, damaged entries never read back."""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from retrainer.bottlenecks import cache as cache_mod
from retrainer.bottlenecks.cache import BottleneckCache
from retrainer.errors import CacheError


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def rows(n: int, dim: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_round_trip_across_instances(tmp_path):
    data = rows(10)
    with BottleneckCache(tmp_path, "bb", 5, info={"x": 1}) as cache:
        cache.add([key(i) for i in range(10)], data)
    again = BottleneckCache(tmp_path, "bb", 5)
    assert len(again) == 10 and key(3) in again and key(99) not in again
    order = [key(i) for i in (7, 0, 3)]
    assert np.array_equal(again.load(order), data[[7, 0, 3]])
    assert again.missing([key(1), key(42)]) == [key(42)]
    assert (tmp_path / "bb" / "backbone.json").is_file()


def test_shards_are_written_every_flush_every_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 4)
    cache = BottleneckCache(tmp_path, "bb", 5)
    data = rows(10)
    for start in range(0, 10, 2):  # batches of 2, as an engine adds them
        cache.add([key(i) for i in range(start, start + 2)], data[start:start + 2])
    assert len(cache.shards()) == 2  # 10 entries: two shards of 4, 2 still buffered
    cache.close()
    assert len(cache.shards()) == 3 and len(BottleneckCache(tmp_path, "bb", 5)) == 10


def test_leftover_temporary_files_are_never_read(tmp_path):
    with BottleneckCache(tmp_path, "bb", 5) as cache:
        cache.add([key(1)], rows(1))
    (tmp_path / "bb" / ".tmp-deadbeef-shard-1.npz").write_bytes(b"half a shard")
    assert len(BottleneckCache(tmp_path, "bb", 5)) == 1


def test_a_damaged_shard_is_set_aside_and_recomputed(tmp_path, caplog):
    with BottleneckCache(tmp_path, "bb", 5) as cache:
        cache.add([key(1), key(2)], rows(2))
    shard = cache.shards()[0]
    shard.write_bytes(shard.read_bytes()[:100])  # e.g. a copy cut short
    with caplog.at_level(logging.WARNING):
        fresh = BottleneckCache(tmp_path, "bb", 5)
        assert fresh.missing([key(1), key(2)]) == [key(1), key(2)]
    assert "damaged shard" in caplog.text
    assert not shard.exists() and shard.with_suffix(".bad").exists()


def test_a_shard_of_random_bytes_is_set_aside_without_numpys_pickle_advice(tmp_path, caplog):
    with BottleneckCache(tmp_path, "bb", 5) as cache:
        cache.add([key(1)], rows(1))
    shard = cache.shards()[0]
    shard.write_bytes(np.random.default_rng(0).bytes(5000))
    with caplog.at_level(logging.WARNING):
        assert BottleneckCache(tmp_path, "bb", 5).missing([key(1)]) == [key(1)]
    assert "damaged shard" in caplog.text and "not a .npz file" in caplog.text
    assert "allow_pickle" not in caplog.text


@pytest.mark.timeout(60, method="thread")  # a regression blocks on the FIFO
def test_a_fifo_named_like_a_shard_is_set_aside_not_waited_on(tmp_path, caplog):
    import os

    with BottleneckCache(tmp_path, "bb", 5) as cache:
        cache.add([key(1)], rows(1))
    os.mkfifo(cache.dir / "shard-0-fifo.npz")
    with caplog.at_level(logging.WARNING):
        assert BottleneckCache(tmp_path, "bb", 5).missing([key(1)]) == []
    assert "not a regular file: a FIFO" in caplog.text
    assert (cache.dir / "shard-0-fifo.bad").exists()


def test_a_shard_of_the_wrong_width_is_rejected(tmp_path):
    with BottleneckCache(tmp_path, "bb", 5) as cache:
        cache.add([key(1)], rows(1))
    with pytest.raises(CacheError):
        BottleneckCache(tmp_path, "bb", 7).load([key(1)])


def test_compaction_keeps_every_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 1)
    monkeypatch.setattr(cache_mod, "COMPACT_ABOVE", 3)
    data = rows(6)
    with BottleneckCache(tmp_path, "bb", 5) as cache:
        cache.add([key(i) for i in range(6)], data)
    assert len(cache.shards()) == 1
    assert np.array_equal(BottleneckCache(tmp_path, "bb", 5).load([key(i) for i in range(6)]), data)


def test_compaction_merges_in_bounded_groups(tmp_path, monkeypatch):
    """A large cache is merged a few shards at a time: no merged shard over COMPACT_ROWS."""
    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 2)
    monkeypatch.setattr(cache_mod, "COMPACT_ABOVE", 3)
    monkeypatch.setattr(cache_mod, "COMPACT_ROWS", 6)
    data = rows(11)
    with BottleneckCache(tmp_path, "bb", 5) as cache:
        for i in range(11):
            cache.add([key(i)], data[i:i + 1])
    again = BottleneckCache(tmp_path, "bb", 5)
    sizes = sorted(len(np.load(s)["keys"]) for s in again.shards())
    assert sizes == [5, 6]  # 5 shards of 2 and one of 1, merged in groups of at most 6
    assert np.array_equal(again.load([key(i) for i in range(11)]), data)
