"""Copies of one image (identical bytes, near-duplicate bottlenecks) never straddle splits."""
from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import numpy as np

from retrainer.sources.base import TESTING, TRAINING, VALIDATION, Dataset, ImageRecord
from retrainer.split import (Grouping, assign_splits, duplicate_groups, near_duplicate_pairs,
                             split_of)


def _records(keys, labels=None, splits=None):
    labels = labels or ["a"] * len(keys)
    splits = splits or [None] * len(keys)
    return Dataset(classes=sorted(set(labels)), records=[
        ImageRecord(key=k, label=l, read=lambda: b"", split=s)
        for k, l, s in zip(keys, labels, splits)])


def test_identical_files_land_in_one_split_the_smallest_keys():
    keys = [f"a/{i:03d}.jpg" for i in range(300)]
    # every 3 consecutive files are one image saved three times
    content = [f"h{i // 3}" for i in range(300)]
    g = Grouping()
    ds = assign_splits(_records(keys), 20, 20, content_keys=content, grouping=g)
    # copies under one label count once: the smallest key of each trio stays
    assert [r.key for r in ds.records] == [k for i, k in enumerate(keys) if i % 3 == 0]
    assert g.exact_groups == 100 and g.merged_copies == 200
    # without merging, all members of a group get the split of the smallest key
    labels = ["a", "b", "c"] * 100
    ds = assign_splits(_records(keys, labels), 20, 20, content_keys=content, keep_conflicting=True)
    by_group: dict[str, set] = {}
    for rec, c in zip(ds.records, content):
        by_group.setdefault(c, set()).add(rec.split)
    assert all(len(s) == 1 for s in by_group.values())
    for i in range(0, 300, 3):
        assert ds.records[i].split == split_of(min(keys[i:i + 3]), 20, 20)
    assert set(Counter(r.split for r in ds.records)) == {TRAINING, VALIDATION, TESTING}


def test_identical_bytes_under_two_labels_are_left_out_and_counted():
    keys = ["cat/x.jpg", "dog/x_copy.jpg", "cat/y.jpg", "dog/z.jpg"]
    g = Grouping()
    ds = assign_splits(_records(keys, ["cat", "dog", "cat", "dog"]), 0, 0,
                       content_keys=["h1", "h1", "h2", "h3"], grouping=g)
    assert [r.key for r in ds.records] == ["cat/y.jpg", "dog/z.jpg"]
    assert g.conflicting == 2 and g.excluded == 2 and "left out" in g.summary()
    kept = assign_splits(_records(keys, ["cat", "dog", "cat", "dog"]), 0, 0,
                         content_keys=["h1", "h1", "h2", "h3"], keep_conflicting=True)
    assert len(kept.records) == 4


def test_given_splits_are_kept_and_straddling_groups_counted():
    keys = ["train/a/1.jpg", "val/a/1_again.jpg", "train/a/2.jpg"]
    g = Grouping()
    ds = assign_splits(_records(keys, splits=[TRAINING, VALIDATION, TRAINING]), 10, 10,
                       content_keys=["h", "h", "k"], grouping=g)
    assert [r.split for r in ds.records] == [TRAINING, VALIDATION, TRAINING]
    assert g.straddling == 1 and g.moved == 0


def test_near_duplicates_join_a_group_and_different_images_do_not():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 128)).astype(np.float32)
    copies = base[:10] + rng.normal(scale=0.05, size=(10, 128)).astype(np.float32)
    vectors = np.concatenate([base, copies])
    pairs = {(i, j) for i, j, _ in near_duplicate_pairs(vectors)}
    assert pairs == {(i, 50 + i) for i in range(10)}
    groups = duplicate_groups([f"k{i}" for i in range(60)], vectors)
    assert all(groups[i] == groups[50 + i] for i in range(10))
    assert len(set(groups)) == 50
    # an unknown row (NaN) is its own group
    vectors[55] = np.nan
    groups = duplicate_groups([f"k{i}" for i in range(60)], vectors)
    assert groups[55] == 55 and len(set(groups)) == 51


def test_near_duplicates_share_the_split_in_assign_splits():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 96)).astype(np.float32)
    vectors = np.concatenate([base, base + rng.normal(scale=0.02, size=base.shape)])
    keys = [f"a/{i:03d}.jpg" for i in range(200)] + [f"a/copy_{i:03d}.jpg" for i in range(200)]
    g = Grouping()
    ds = assign_splits(_records(keys), 25, 25, content_keys=[f"h{i}" for i in range(400)],
                       vectors=vectors, grouping=g)
    split = {r.key: r.split for r in ds.records}
    assert all(split[f"a/{i:03d}.jpg"] == split[f"a/copy_{i:03d}.jpg"] for i in range(200))
    assert g.near_groups == 200 and g.moved > 0


def test_symlink_loop_tree_trains_each_image_once(tmp_path, fast_config):
    """The reported case: a loop link multiplied the images over every split (a second hung)."""
    import os
    import time

    from conftest import make_colour_tree
    from retrainer.bottlenecks.fill import fill
    from retrainer.training import train

    images = make_colour_tree(tmp_path / "images", per_class=10)
    os.symlink("..", images / "red" / "loop")
    os.symlink("..", images / "green" / "loop")
    shutil.copy(images / "red" / "img000.png", images / "blue sky" / "same_as_red.png")
    for i in range(1, 9):  # copies under other names: the path hash alone would scatter them
        shutil.copy(images / "red" / f"img{i:03d}.png", images / "red" / f"z_copy_{i}.png")
    t = time.perf_counter()
    result = train(fast_config(images))
    assert time.perf_counter() - t < 60
    assert sum(sum(c.values()) for c in result.counts.values()) == 29  # 39 files - 2 - 8
    assert result.duplicates["conflicting"] == 2 and result.duplicates["excluded"] == 2
    assert result.duplicates["merged_copies"] == 8
    filled = fill(fast_config(images))  # the split train used
    filled.cache.close()
    assert not any("loop" in r.key for r in filled.dataset.records)
    content: dict[str, set] = defaultdict(set)
    for rec, key in zip(filled.dataset.records, filled.keys):
        content[rec.split].add(key)
    assert len(filled.keys) == len(set(filled.keys)) == 29  # every image once
    # no image in the test (or validation) split has its bytes in the training split
    assert not content[TESTING] & content[TRAINING] and not content[VALIDATION] & content[TRAINING]
    assert (result.test.n if result.test else 0) == len(content[TESTING])


def _photo(seed: int, size: tuple[int, int] = (160, 120)):
    """A smooth random 'photo' (upsampled noise): structure at every scale, like a real one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _jpeg(img, quality: int = 92) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _vectors_with(cosines: dict[tuple[int, int], float], n: int, extra: int = 60, seed: int = 0):
    """n vectors whose centred cosines are about the given ones, plus ``extra`` random others."""
    from retrainer.split import normalised

    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n + extra, 256)).astype(np.float32)
    for (i, j), c in cosines.items():
        v[j] = c * v[i] + np.sqrt(1 - c * c) * v[j]
    x = normalised(v)
    return v, {ij: float(x[ij[0]] @ x[ij[1]]) for ij in cosines}


def test_a_resized_copy_the_backbone_sees_differently_is_found_by_its_pixels():
    from PIL import ImageEnhance

    from retrainer.split import NEAR_DUPLICATE_PIXEL_FLOOR, NEAR_DUPLICATE_SIMILARITY

    photo = _photo(1)
    data = [_jpeg(photo),  # 0: the photo
            _jpeg(photo.resize((80, 60)), 60),  # 1: half size, JPEG quality 60
            _jpeg(ImageEnhance.Brightness(photo).enhance(1.15)),  # 2: brightened
            _jpeg(_photo(2))]  # 3: another photo
    vectors, cos = _vectors_with({(0, 1): 0.7, (0, 2): 0.7, (0, 3): 0.7}, 4)
    assert all(NEAR_DUPLICATE_PIXEL_FLOOR < c < NEAR_DUPLICATE_SIMILARITY for c in cos.values())
    read = {i: d for i, d in enumerate(data)}
    found = {(i, j) for i, j, _ in near_duplicate_pairs(vectors, read=lambda i: read.get(i, b""))
             if j < 4}
    assert found == {(0, 1), (0, 2)}  # not the other photo at the same cosine (1-2: 0.49)
    assert not near_duplicate_pairs(vectors)  # the cosine alone finds none of them
    # the split, which reads the records, groups them the same way
    keys = [f"a/{i:03d}.jpg" for i in range(64)]
    ds = Dataset(classes=["a"], records=[
        ImageRecord(key=k, label="a", read=(lambda i=i: read.get(i, b""))) for i, k in
        enumerate(keys)])
    g = Grouping()
    ds = assign_splits(ds, 30, 30, content_keys=[f"h{i}" for i in range(64)], vectors=vectors,
                       grouping=g)
    split = {r.key: r.split for r in ds.records}
    assert g.near_groups == 1 and split[keys[0]] == split[keys[1]] == split[keys[2]]


def test_tiny_images_need_the_pixels_to_agree_as_well():
    from PIL import Image

    def digit(seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB")

    import io

    png = io.BytesIO()
    digit(1).save(png, format="PNG")
    data = [png.getvalue(), _jpeg(digit(1), 100), _jpeg(digit(2), 100)]
    vectors, cos = _vectors_with({(0, 1): 0.95, (0, 2): 0.95}, 3)
    assert min(cos.values()) > 0.9
    found = {(i, j) for i, j, _ in near_duplicate_pairs(vectors, read=lambda i: data[i])
             if j < 3}
    # two different 28-px images at a cosine of 0.95 are not one image; a re-encoded copy is
    assert found == {(0, 1)}
    assert {(i, j) for i, j, _ in near_duplicate_pairs(vectors) if j < 3} == {(0, 1), (0, 2),
                                                                                (1, 2)}
