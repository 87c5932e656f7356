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
