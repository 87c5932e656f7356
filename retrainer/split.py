"""A stable train/validation/test split decided by each image's relative path.

As in retrain.py, the split is a hash of the name, so adding images never moves old ones between
sets, and ``_nohash_`` groups files (``bob_nohash_1.jpg``, ``bob_nohash_2.jpg``) into one set.
Unlike retrain.py the hash covers the path *relative to the image folder*, so moving or mounting
the folder elsewhere does not reshuffle it.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from dataclasses import replace

from .errors import DatasetError
from .sources.base import TESTING, TRAINING, VALIDATION, Dataset

log = logging.getLogger(__name__)

_BUCKETS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")


def split_of(key: str, validation_percentage: float, testing_percentage: float) -> str:
    """The split for one relative path."""
    head, _, name = key.rpartition("/")
    group = f"{head}/{_NOHASH.sub('', name)}" if head else _NOHASH.sub("", name)
    digest = hashlib.sha1(group.encode("utf-8")).hexdigest()
    percent = (int(digest, 16) % (_BUCKETS + 1)) * (100.0 / _BUCKETS)
    if percent < validation_percentage:
        return VALIDATION
    if percent < validation_percentage + testing_percentage:
        return TESTING
    return TRAINING


def assign_splits(dataset: Dataset, validation_percentage: float = 10,
                  testing_percentage: float = 10) -> Dataset:
    """Give every record without a split one, keeping each hash-split class trainable.

    A class whose images all hash into validation/testing (a class of one or two images) keeps
    them for training instead, with a warning: a class the head never saw cannot be learnt.
    """
    if not 0 <= validation_percentage <= 100 or not 0 <= testing_percentage <= 100 \
            or validation_percentage + testing_percentage >= 100:
        raise DatasetError(
            f"validation ({validation_percentage}%) + testing ({testing_percentage}%) must be "
            "between 0 and 100%, leaving images for training.")
    hashed = [rec.split is None for rec in dataset.records]
    records = [
        rec if rec.split else replace(
            rec, split=split_of(rec.key, validation_percentage, testing_percentage))
        for rec in dataset.records
    ]
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        if hashed[i]:
            by_class[rec.label].append(i)
    for label, idx in sorted(by_class.items()):
        if idx and not any(records[i].split == TRAINING for i in idx):
            log.warning("class '%s' has only %d image(s), none of them in the training split; "
                        "using %s for training (not for validation/testing)",
                        label, len(idx), "it" if len(idx) == 1 else "them all")
            for i in idx:
                records[i] = replace(records[i], split=TRAINING)
    return replace(dataset, records=records)
