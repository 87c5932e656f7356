"""Near-duplicate grouping never swallows a class: look-alikes are not copies."""
from __future__ import annotations

from collections import Counter

import numpy as np

from retrainer.sources.base import Dataset, ImageRecord
from retrainer.split import MAX_NEAR_GROUP, Grouping, assign_splits, duplicate_groups


def _dataset(n: int) -> Dataset:
    return Dataset(classes=["a"], records=[
        ImageRecord(key=f"a/{i:04d}.jpg", label="a", read=lambda: b"") for i in range(n)])


def test_a_set_of_look_alikes_keeps_its_hash_split() -> None:
    # Frames of one production line, three kinds of part: within a kind every image is "near"
    # every other one (what sets images apart, once the set's mean is removed, is the kind).
    rng = np.random.default_rng(0)
    kinds = rng.normal(size=(3, 128))
    vectors = (kinds[np.arange(300) % 3] + rng.normal(scale=0.1, size=(300, 128))).astype(np.float32)
    g = Grouping()
    ds = assign_splits(_dataset(300), 20, 20, content_keys=[f"h{i}" for i in range(300)],
                       vectors=vectors, grouping=g)
    plain = assign_splits(_dataset(300), 20, 20)
    assert g.near_skipped and g.moved == 0 and g.near_groups == 0
    assert [r.split for r in ds.records] == [r.split for r in plain.records]
    assert len({r.split for r in ds.records}) == 3  # something left to validate and test on
    assert "look alike" in g.summary()


def test_near_groups_stay_small_along_a_chain() -> None:
    # A chain: each image a little further from the first; neighbours are near-duplicates.
    rng = np.random.default_rng(1)
    others = rng.normal(size=(400, 256)).astype(np.float32)  # unrelated images around them
    start, step = rng.normal(size=256), rng.normal(size=256)
    chain = np.array([start + 0.08 * k * step for k in range(60)], np.float32)
    vectors = np.concatenate([chain, others])
    groups = duplicate_groups([f"h{i}" for i in range(len(vectors))], vectors)
    sizes = Counter(groups)
    assert max(sizes.values()) <= MAX_NEAR_GROUP
    assert sizes[groups[0]] > 1  # the chain's first image still has its near copy


def test_an_image_near_many_others_is_not_grouped_but_copies_still_are() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=(300, 128)).astype(np.float32)
    hub = base[:40].mean(axis=0)
    lookalikes = hub + rng.normal(scale=0.01, size=(30, 128)).astype(np.float32)
    copies = base[100:110] + rng.normal(scale=0.02, size=(10, 128)).astype(np.float32)
    vectors = np.concatenate([base, lookalikes, copies])
    g = Grouping()
    groups = duplicate_groups([f"h{i}" for i in range(len(vectors))], vectors, grouping=g)
    assert g.lookalikes >= 30
    assert all(groups[100 + i] == groups[330 + i] for i in range(10))
    assert len({groups[300 + i] for i in range(30)}) == 30
