"""Folder scanning and the stable split."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest

from retrainer.errors import DatasetError
from retrainer.sources.base import TESTING, TRAINING, VALIDATION
from retrainer.sources.folder import scan_folder
from retrainer.split import assign_splits, split_of

from conftest import make_image


def test_labels_are_folder_names_verbatim_and_sorted(tmp_path):
    names = ["Siamese cat", "maine-coon", "british_shorthair", "Ägyptische Mau", "猫"]
    for name in names:
        make_image(tmp_path / name / "a.png", (10, 10, 10))
    assert scan_folder(tmp_path).classes == sorted(names)


def test_hidden_files_and_own_output_folders_are_ignored(tmp_path):
    for name in ("cats", "dogs"):
        make_image(tmp_path / name / "a.png", (10, 10, 10))
    make_image(tmp_path / "cats" / ".hidden.png", (10, 10, 10))
    make_image(tmp_path / ".git" / "x.png", (10, 10, 10))
    make_image(tmp_path / "retrained" / "x.png", (10, 10, 10))
    make_image(tmp_path / "mycache" / "x.png", (10, 10, 10))
    ds = scan_folder(tmp_path, exclude=[tmp_path / "mycache"])
    assert ds.classes == ["cats", "dogs"]
    assert sorted(r.key for r in ds.records) == ["cats/a.png", "dogs/a.png"]


def test_fewer_than_two_classes_is_a_clear_error(tmp_path):
    make_image(tmp_path / "loose.png", (1, 2, 3))
    make_image(tmp_path / "only" / "a.png", (1, 2, 3))
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path)
    assert "at least 2 class folders" in info.value.message and "1 loose files" in info.value.message
    assert "subfolder" in info.value.hint


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nope")


def test_train_val_test_tree_defines_the_split(tmp_path):
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            make_image(tmp_path / split / label / f"{split}.png", (1, 2, 3))
    ds = assign_splits(scan_folder(tmp_path), 10, 10)
    assert ds.classes == ["a", "b"]
    assert {r.key: r.split for r in ds.records if r.label == "a"} == {
        "train/a/train.png": TRAINING, "val/a/val.png": VALIDATION, "test/a/test.png": TESTING}


def test_split_depends_only_on_the_relative_path(tmp_path):
    first = tmp_path / "one"
    for label in ("x", "y"):
        for i in range(30):
            make_image(first / label / f"{i}.png", (1, 2, 3), size=4)
    moved = shutil.copytree(first, tmp_path / "elsewhere" / "two")
    a = {r.key: r.split for r in assign_splits(scan_folder(first)).records}
    b = {r.key: r.split for r in assign_splits(scan_folder(moved)).records}
    assert a == b and set(a.values()) == {TRAINING, VALIDATION, TESTING}


def test_split_proportions_and_stability():
    keys = [f"class/{i}.jpg" for i in range(4000)]
    counts = Counter(split_of(k, 10, 20) for k in keys)
    assert abs(counts[VALIDATION] / 4000 - 0.10) < 0.025
    assert abs(counts[TESTING] / 4000 - 0.20) < 0.025
    assert [split_of(k, 10, 20) for k in keys[:50]] == [split_of(k, 10, 20) for k in keys[:50]]


def test_nohash_groups_files_into_one_split():
    splits = {split_of(f"speech/bob_nohash_{i}.wav", 30, 30) for i in range(50)}
    assert len(splits) == 1


def test_a_class_too_small_to_split_stays_trainable(tmp_path, caplog):
    for i in range(20):
        make_image(tmp_path / "big" / f"{i}.png", (1, 2, 3), size=4)
    make_image(tmp_path / "tiny" / "only.png", (1, 2, 3), size=4)
    ds = assign_splits(scan_folder(tmp_path), validation_percentage=45, testing_percentage=50)
    tiny = [r for r in ds.records if r.label == "tiny"]
    assert [r.split for r in tiny] == [TRAINING]


@pytest.mark.parametrize("val, test", [(-1, 10), (60, 40), (10, 101)])
def test_impossible_percentages_are_rejected(tmp_path, val, test):
    for label in ("a", "b"):
        make_image(tmp_path / label / "x.png", (1, 2, 3), size=4)
    with pytest.raises(DatasetError, match="must be between"):
        assign_splits(scan_folder(tmp_path), val, test)


def _two_classes(root, n=5):
    for label, colour in (("cats", (200, 10, 10)), ("dogs", (10, 10, 200))):
        for i in range(n):
            make_image(root / label / f"{i}.png", colour, size=4, seed=i + (50 if label == "dogs" else 0))


def test_symlink_loops_are_walked_once_and_fast(tmp_path):
    import os
    import time

    _two_classes(tmp_path)
    os.symlink("..", tmp_path / "cats" / "loop")
    os.symlink("..", tmp_path / "dogs" / "loop")
    os.symlink("../..", tmp_path / "cats" / "up2")
    t = time.perf_counter()
    ds = scan_folder(tmp_path)
    assert time.perf_counter() - t < 0.5
    assert sorted(r.key for r in ds.records) == sorted(
        f"{label}/{i}.png" for label in ("cats", "dogs") for i in range(5))


def test_a_linked_folder_is_followed_once_and_a_linked_file_counted_once(tmp_path):
    import os

    _two_classes(tmp_path / "set")
    extra = tmp_path / "more_cats"
    make_image(extra / "x.png", (200, 10, 10), size=4, seed=99)
    os.symlink(extra, tmp_path / "set" / "cats" / "more")
    os.symlink(extra, tmp_path / "set" / "cats" / "again")
    os.symlink(tmp_path / "set" / "cats" / "0.png", tmp_path / "set" / "cats" / "zz_link.png")
    ds = scan_folder(tmp_path / "set")
    cats = sorted(r.key for r in ds.records if r.label == "cats")
    assert cats == ["cats/0.png", "cats/1.png", "cats/2.png", "cats/3.png", "cats/4.png",
                    "cats/again/x.png"]


def test_a_link_into_another_class_does_not_relabel_its_images(tmp_path):
    import os

    _two_classes(tmp_path)
    os.symlink("../dogs", tmp_path / "cats" / "dogs_too")
    ds = scan_folder(tmp_path)
    assert {r.key: r.label for r in ds.records if "dogs" in r.key} == {
        f"dogs/{i}.png": "dogs" for i in range(5)}


def test_non_utf8_file_names_are_scanned_and_split(tmp_path):
    import os

    _two_classes(tmp_path)
    name = os.fsdecode(b"caf\xe9.png")
    make_image(tmp_path / "cats" / name, (200, 10, 10), size=4, seed=7)
    ds = assign_splits(scan_folder(tmp_path), 10, 10)
    (rec,) = [r for r in ds.records if r.key == f"cats/{name}"]
    assert rec.split in (TRAINING, VALIDATION, TESTING)
    assert split_of(f"cats/{name}", 10, 10) == rec.split
    assert rec.read()[:4] == b"\x89PNG"
