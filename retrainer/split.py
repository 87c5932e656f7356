"""A stable train/validation/test split in which copies of one image never straddle splits.

As in retrain.py, the split is a hash of the name, so adding images never moves old ones between
sets, and ``_nohash_`` groups files (``bob_nohash_1.jpg``, ``bob_nohash_2.jpg``) into one set.
Unlike retrain.py the hash covers the path *relative to the image folder*, so moving or mounting
the folder elsewhere does not reshuffle it.

Once the images' content hashes (and, for a real backbone, their bottlenecks) are known,
:func:`assign_splits` also groups identical files and near-duplicates: a group lands in one split,
the split its member with the smallest key would get on its own. Splits the source gives
(train/ val/ test/ folders, database roles) are kept, and a group that straddles them is counted.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from .errors import DatasetError
from .sources.base import TESTING, TRAINING, VALIDATION, Dataset

log = logging.getLogger(__name__)

_BUCKETS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")

#: Cosine similarity of two (centred) bottlenecks above which they are one image: resized,
#: re-encoded, slightly cropped or brightened copies. Measured with bench/audit.py on
#: efficientnet_lite0 (docs/audit.md).
NEAR_DUPLICATE_SIMILARITY = 0.80
#: Bottlenecks narrower than this say too little for a similarity threshold measured on a real
#: backbone (a 3-d mean colour makes every image of one colour a "near-duplicate").
NEAR_DUPLICATE_MIN_DIM = 64
#: Copies of one photo are few. Near-duplicate links join groups most similar first, and never
#: into a group larger than this: a chain of look-alikes (frames of one production line) must
#: not swallow a class and leave nothing to validate or test on.
MAX_NEAR_GROUP = 16
#: For the same reason an image "near" MAX_NEAR_GROUP or more others is a look-alike, not a
#: copy: its links are not used. When the links average that many per image, none are.


def split_of(key: str, validation_percentage: float, testing_percentage: float) -> str:
    """The split for one relative path (any str; undecodable file-name bytes included)."""
    head, _, name = key.rpartition("/")
    group = f"{head}/{_NOHASH.sub('', name)}" if head else _NOHASH.sub("", name)
    # surrogateescape: a file name that is not UTF-8 (caf\xe9.jpg) hashes as its own bytes.
    digest = hashlib.sha1(group.encode("utf-8", "surrogateescape")).hexdigest()
    percent = (int(digest, 16) % (_BUCKETS + 1)) * (100.0 / _BUCKETS)
    if percent < validation_percentage:
        return VALIDATION
    if percent < validation_percentage + testing_percentage:
        return TESTING
    return TRAINING


@dataclass
class Grouping:
    """What :func:`assign_splits` found about copies of one image (counts, for the summary)."""

    exact_groups: int = 0  # sets of 2+ files with identical bytes
    merged_copies: int = 0  # identical files under one label beyond the first: one image each
    near_groups: int = 0  # sets joined by near-duplicate bottlenecks (not identical bytes)
    moved: int = 0  # records given their group's split instead of their own hash split
    straddling: int = 0  # groups spread over source-given splits (kept as given)
    conflicting: int = 0  # files whose bytes are also under another label
    excluded: int = 0  # of those, left out of training and evaluation
    conflicting_paths: list[str] = field(default_factory=list)
    lookalikes: int = 0  # images near too many others to be copies: not grouped by similarity
    near_skipped: bool = False  # the whole set looks alike: only identical files grouped

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"duplicates: {self.exact_groups} group(s) of identical files "
                f"({self.merged_copies} extra copies counted once), {self.near_groups} "
                f"near-duplicate group(s), {self.moved} image(s) moved to their group's split, "
                f"{self.straddling} group(s) straddle the given splits, {self.conflicting} "
                f"identical file(s) under different labels ({self.excluded} left out)"
                + ("; near-duplicates not grouped (most images look alike to the backbone)"
                   if self.near_skipped else "")
                + (f"; {self.lookalikes} look-alike image(s) not grouped by similarity"
                   if self.lookalikes else ""))


class _Union:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int, max_size: int | None = None) -> bool:
        """Join the groups of ``a`` and ``b`` unless the result would exceed ``max_size``."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return True
        if max_size is not None and self.size[a] + self.size[b] > max_size:
            return False
        keep, gone = min(a, b), max(a, b)
        self.parent[gone] = keep
        self.size[keep] += self.size[gone]
        return True


def near_duplicate_pairs(vectors: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY,
                         block: int = 1024, max_pairs: int | None = None
                         ) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j whose centred, L2-normalised bottlenecks are above ``threshold``.

    Centring on the set's mean removes what every image of a backbone shares (post-ReLU features
    are all positive), so the cosine measures what sets two images apart. Blockwise: memory
    stays ``block x n`` floats. With ``max_pairs``, stops once more than that many are found
    (the caller then knows the set is full of look-alikes, without listing them all).
    """
    x = normalised(vectors)
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(x), block):
        sims = x[start:start + block] @ x.T
        rows, cols = np.nonzero(sims > threshold)
        upper = start + rows < cols
        rows, cols = rows[upper], cols[upper]
        pairs += zip((start + rows).tolist(), cols.tolist(), sims[rows, cols].tolist())
        if max_pairs is not None and len(pairs) > max_pairs:
            break
    return pairs


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Centred on their mean and scaled to unit length (rows), float32."""
    x = np.asarray(vectors, dtype=np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def duplicate_groups(content_keys: Sequence[str | None], vectors: np.ndarray | None = None,
                     threshold: float = NEAR_DUPLICATE_SIMILARITY,
                     grouping: Grouping | None = None) -> list[int]:
    """A group id per item: items with equal content keys or near-duplicate vectors share one.

    ``vectors`` (one row per item; a row of NaN where unknown) adds near-duplicates, most
    similar first, in groups of at most :data:`MAX_NEAR_GROUP`, leaving out look-alikes (counted
    in ``grouping``).
    Items whose key is None are their own group.
    """
    n = len(content_keys)
    union = _Union(n)
    first: dict[str, int] = {}
    for i, key in enumerate(content_keys):
        if key is None:
            continue
        if key in first:
            union.join(first[key], i)
        else:
            first[key] = i
    if vectors is not None and len(vectors) > 1:
        have = np.flatnonzero(np.isfinite(vectors).all(axis=1))
        # Copies link an image to a few others; look-alikes to many. Past MAX_NEAR_GROUP links
        # per image on average the pairs need not all be listed to know it.
        limit = MAX_NEAR_GROUP * len(have) // 2
        pairs = near_duplicate_pairs(vectors[have], threshold, max_pairs=limit)
        if len(pairs) > limit:
            log.warning("most of the %d images look alike to the backbone: only identical files "
                        "are grouped as copies", len(have))
            if grouping is not None:
                grouping.near_skipped = True
            pairs = []
        degree = Counter(i for p in pairs for i in p[:2])
        lookalike = {i for i, d in degree.items() if d >= MAX_NEAR_GROUP}
        if lookalike and grouping is not None:
            grouping.lookalikes += len(lookalike)
        for i, j, _ in sorted(pairs, key=lambda p: -p[2]):
            if i not in lookalike and j not in lookalike:
                union.join(int(have[i]), int(have[j]), MAX_NEAR_GROUP)
    return [union.find(i) for i in range(n)]


def assign_splits(dataset: Dataset, validation_percentage: float = 10,
                  testing_percentage: float = 10, content_keys: Sequence[str | None] | None = None,
                  vectors: np.ndarray | None = None, keep_conflicting: bool = False,
                  threshold: float = NEAR_DUPLICATE_SIMILARITY,
                  grouping: Grouping | None = None) -> Dataset:
    """Give every record without a split one, keeping each hash-split class trainable.

    With ``content_keys`` (one per record, e.g. SHA-256 of its bytes; None if unreadable) copies
    of one image form a group that lands in one split; ``vectors`` (bottlenecks, one row per
    record) add near-duplicates. Identical files under one label count once (the extra copies
    are dropped); under different labels they are left out unless ``keep_conflicting``. What was
    found is added to ``grouping`` when given. A class whose images all hash into
    validation/testing (a class of one or two images) keeps them for training instead, with a
    warning: a class the head never saw cannot be learnt.
    """
    if not 0 <= validation_percentage <= 100 or not 0 <= testing_percentage <= 100 \
            or validation_percentage + testing_percentage >= 100:
        raise DatasetError(
            f"validation ({validation_percentage}%) + testing ({testing_percentage}%) must be "
            "between 0 and 100%, leaving images for training.")
    found = grouping if grouping is not None else Grouping()
    records = list(dataset.records)
    hashed = [rec.split is None for rec in records]
    splits = [rec.split or split_of(rec.key, validation_percentage, testing_percentage)
              for rec in records]
    keep = [True] * len(records)
    if content_keys is not None:
        if len(content_keys) != len(records):
            raise ValueError("one content key per record is needed")
        _group(records, list(content_keys), vectors, threshold, hashed, splits, keep,
               keep_conflicting, found)
    records = [replace(rec, split=s) for rec, s in zip(records, splits)]
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        if hashed[i] and keep[i]:
            by_class[rec.label].append(i)
    for label, idx in sorted(by_class.items()):
        if idx and not any(records[i].split == TRAINING for i in idx):
            log.warning("class '%s' has only %d image(s), none of them in the training split; "
                        "using %s for training (not for validation/testing)",
                        label, len(idx), "it" if len(idx) == 1 else "them all")
            for i in idx:
                records[i] = replace(records[i], split=TRAINING)
    if content_keys is None:
        return replace(dataset, records=records)
    return replace(dataset, records=[r for r, k in zip(records, keep) if k])


def _group(records: list, keys: list[str | None], vectors: np.ndarray | None, threshold: float,
           hashed: list[bool], splits: list[str], keep: list[bool], keep_conflicting: bool,
           found: Grouping) -> None:
    """Regroup ``splits`` in place so that copies share one; mark dropped records in ``keep``."""
    exact = duplicate_groups(keys)
    groups = duplicate_groups(keys, vectors, threshold, found) if vectors is not None else exact
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if keys[i] is not None:
            members[g].append(i)
    exact_members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(exact):
        if keys[i] is not None:
            exact_members[g].append(i)
    for idx in exact_members.values():
        if len(idx) < 2:
            continue
        found.exact_groups += 1
        labels = {records[i].label for i in idx}
        if len(labels) > 1:
            found.conflicting += len(idx)
            found.conflicting_paths += [records[i].display for i in idx]
            if not keep_conflicting:
                found.excluded += len(idx)
                for i in idx:
                    keep[i] = False
                continue
        seen: set[tuple[str, str | None]] = set()
        for i in sorted(idx, key=lambda i: records[i].key):
            if (records[i].label, records[i].split) in seen or \
                    (records[i].label, None) in seen:
                keep[i] = False
                found.merged_copies += 1
            seen.add((records[i].label, records[i].split if not hashed[i] else None))
    exact_sets = {frozenset(v) for v in exact_members.values()}
    for idx in members.values():
        if len(idx) < 2:
            continue
        if frozenset(idx) not in exact_sets:
            found.near_groups += 1
        given = sorted((records[i].key, splits[i]) for i in idx if not hashed[i])
        if len({s for _, s in given}) > 1:
            found.straddling += 1
        target = given[0][1] if given else splits[min(idx, key=lambda i: records[i].key)]
        for i in idx:
            if hashed[i] and splits[i] != target:
                splits[i] = target
                found.moved += 1
