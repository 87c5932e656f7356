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
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import DatasetError, RetrainerError
from .sources.base import TESTING, TRAINING, VALIDATION, Dataset

log = logging.getLogger(__name__)

_BUCKETS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")

#: Cosine similarity of two (centred) bottlenecks above which they are one image on that signal
#: alone: slightly cropped, brightened or re-encoded copies. Measured with bench/audit.py on
#: efficientnet_lite0 (docs/audit.md): 5 % crops >= 0.907, different photos <= 0.83.
NEAR_DUPLICATE_SIMILARITY = 0.87
#: The second signal, for copies the backbone sees differently (a small photo downscaled to half
#: falls to a cosine of 0.68): two images whose grey THUMBNAIL_SIZE thumbnails correlate at
#: NEAR_DUPLICATE_PIXEL_CORRELATION or more (normalised cross-correlation: blind to brightness
#: and contrast, robust to resizing and re-encoding) are one image when their bottleneck cosine
#: is at least NEAR_DUPLICATE_PIXEL_FLOOR too.
NEAR_DUPLICATE_PIXEL_CORRELATION = 0.992
NEAR_DUPLICATE_PIXEL_FLOOR = 0.50
THUMBNAIL_SIZE = 32
#: Images smaller than this on their short side (28-px digits, icons) reach the backbone blown
#: up many times, and its cosine measured on photos says little: different handwritten 1s of
#: MNIST reach 0.9. For them both signals must agree.
NEAR_DUPLICATE_MIN_SIDE = 64
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


class LookAlikes(Exception):
    """More near-duplicate candidates than copies could make: the set is full of look-alikes."""


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


def thumbnail(data: bytes) -> tuple[np.ndarray | None, int]:
    """(thumbnail, short side in pixels) of encoded image bytes.

    The thumbnail is THUMBNAIL_SIZE x THUMBNAIL_SIZE grey (Lanczos, upright), centred and
    scaled to unit length, so a dot product is a normalised cross-correlation; None (and side
    0) for bytes that do not decode, None for an image of one flat tone (no pattern to compare).
    A large JPEG is decoded at a reduced DCT scale no smaller than 8x the thumbnail: the 1/4 and
    1/8 scales are too coarse (a photo and its half-size copy then correlate at 0.96, not 0.999).
    """
    from PIL import Image

    from .images import decode_rgb

    side = THUMBNAIL_SIZE
    try:
        pixels = decode_rgb(data, min_size=(8 * side, 8 * side))
    except RetrainerError:
        return None, 0
    short = min(pixels.shape[:2])
    grey = Image.fromarray(pixels).convert("L").resize((side, side), Image.LANCZOS)
    t = np.asarray(grey, np.float32).ravel()
    t -= t.mean()
    norm = float(np.linalg.norm(t))
    return (t / norm if norm > 1e-3 * side else None), short


def near_duplicate_pairs(vectors: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY,
                         read: Callable[[int], bytes] | None = None,
                         block: int = 1024, max_pairs: int | None = None
                         ) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j that are one image (resized, re-encoded, cropped, brightened).

    Centring on the set's mean removes what every image of a backbone shares (post-ReLU
    features are all positive), so the cosine of centred, L2-normalised bottlenecks measures
    what sets two images apart. A pair is one image when:

    - the cosine is above ``threshold`` (and, with ``read``, both images are at least
      NEAR_DUPLICATE_MIN_SIDE pixels on their short side), or
    - with ``read`` (item index -> encoded bytes): the cosine is at least
      NEAR_DUPLICATE_PIXEL_FLOOR and the thumbnails correlate at
      NEAR_DUPLICATE_PIXEL_CORRELATION or more.

    Only the images of pairs with a cosine of at least the floor are decoded. Blockwise: memory
    stays ``block x n`` floats, plus a 32 x 32 thumbnail per image with ``read``. With
    ``max_pairs``, raises :class:`LookAlikes` as soon as more pairs than that are found, or more
    than four times as many candidates: copies do not make that many, look-alikes do, and they
    need not all be listed (or decoded) to know it.
    """
    x = normalised(vectors)
    n = len(x)
    if read is None:
        floor = threshold
    else:
        floor = min(threshold, NEAR_DUPLICATE_PIXEL_FLOOR)
        thumbs = np.zeros((n, THUMBNAIL_SIZE * THUMBNAIL_SIZE), np.float32)  # zero: no pattern
        sides = np.zeros(n, np.int64)  # 0: not decoded (yet), or undecodable
        done = np.zeros(n, bool)
    pairs: list[tuple[int, int, float]] = []
    candidates = 0
    for start in range(0, n, block):
        sims = x[start:start + block] @ x.T
        rows, cols = np.nonzero(sims >= floor)
        upper = start + rows < cols
        rows, cols = rows[upper], cols[upper]
        s = sims[rows, cols]
        candidates += len(s)
        if max_pairs is not None and candidates > 4 * max_pairs:
            raise LookAlikes
        if read is None:
            keep = s > threshold
        else:
            todo = [i for i in np.unique(np.concatenate([start + rows, cols])).tolist()
                    if not done[i]]
            done[todo] = True
            for i, (t, side) in zip(todo, _thumbnails(read, todo)):
                sides[i] = side
                if t is not None:
                    thumbs[i] = t
            agree = np.zeros(len(rows), bool)
            for a in range(0, len(rows), 8192):  # gathered thumbnails: 64 MB at most
                i, j = start + rows[a:a + 8192], cols[a:a + 8192]
                agree[a:a + 8192] = np.einsum("ij,ij->i", thumbs[i], thumbs[j]) \
                    >= NEAR_DUPLICATE_PIXEL_CORRELATION
            short = np.minimum(sides[start + rows], sides[cols])
            small = (short > 0) & (short < NEAR_DUPLICATE_MIN_SIDE)
            keep = agree | ((s > threshold) & ~small)
        pairs += [(start + r, c, float(v)) for r, c, v in
                  zip(rows[keep].tolist(), cols[keep].tolist(), s[keep].tolist())]
        if max_pairs is not None and len(pairs) > max_pairs:
            raise LookAlikes
    return pairs


def _thumbnails(read: Callable[[int], bytes], items: list[int]
                ) -> Iterator[tuple[np.ndarray | None, int]]:
    """:func:`thumbnail` of each item, decoded on every core (the decoders release the GIL);
    (None, 0) for an item gone since it was read (its cosine alone then decides)."""
    def one(i: int) -> tuple[np.ndarray | None, int]:
        try:
            return thumbnail(read(i))
        except (OSError, RetrainerError):
            return None, 0

    workers = min(8, os.cpu_count() or 1, len(items))
    if workers <= 1:
        yield from map(one, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(one, items)


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Centred on their mean and scaled to unit length (rows), float32."""
    x = np.asarray(vectors, dtype=np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def duplicate_groups(content_keys: Sequence[str | None], vectors: np.ndarray | None = None,
                     threshold: float = NEAR_DUPLICATE_SIMILARITY,
                     read: Callable[[int], bytes] | None = None,
                     pairs: Sequence[tuple[int, int]] | None = None,
                     grouping: Grouping | None = None) -> list[int]:
    """A group id per item: items with equal content keys or near-duplicates share one.

    ``vectors`` (one row per item; a row of NaN where unknown) adds near-duplicates, and
    ``read`` (item index -> encoded bytes) the thumbnail signal of :func:`near_duplicate_pairs`;
    ``pairs`` (item indices, most similar first) gives near-duplicates found already instead.
    Near-duplicates join most similar first, in groups of at most :data:`MAX_NEAR_GROUP`,
    leaving out look-alikes (counted in ``grouping``). Items whose key is None are their own
    group.
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
    links: list[tuple[int, int]] = [(int(i), int(j)) for i, j in pairs or ()]
    if pairs is None and vectors is not None and len(vectors) > 1:
        have = np.flatnonzero(np.isfinite(vectors).all(axis=1))
        sub_read = None if read is None else (lambda k: read(int(have[k])))
        try:
            found = near_duplicate_pairs(vectors[have], threshold, sub_read,
                                         max_pairs=MAX_NEAR_GROUP * len(have) // 2)
        except LookAlikes:
            log.warning("most of the %d images look alike to the backbone: only identical files "
                        "are grouped as copies", len(have))
            if grouping is not None:
                grouping.near_skipped = True
            found = []
        links = [(int(have[i]), int(have[j])) for i, j, _ in sorted(found, key=lambda p: -p[2])]
    join_near(union, links, grouping)
    return [union.find(i) for i in range(n)]


def join_near(union: _Union, links: Sequence[tuple[int, int]],
              grouping: Grouping | None = None) -> None:
    """Join near-duplicate ``links`` (most similar first) into groups of at most
    :data:`MAX_NEAR_GROUP`, leaving out look-alikes (counted in ``grouping``)."""
    degree = Counter(i for link in links for i in link)
    lookalike = {i for i, d in degree.items() if d >= MAX_NEAR_GROUP}
    if lookalike and grouping is not None:
        grouping.lookalikes += len(lookalike)
    for i, j in links:
        if i not in lookalike and j not in lookalike:
            union.join(i, j, MAX_NEAR_GROUP)


def assign_splits(dataset: Dataset, validation_percentage: float = 10,
                  testing_percentage: float = 10, content_keys: Sequence[str | None] | None = None,
                  vectors: np.ndarray | None = None, keep_conflicting: bool = False,
                  threshold: float = NEAR_DUPLICATE_SIMILARITY,
                  grouping: Grouping | None = None,
                  near_pairs: Sequence[tuple[int, int]] | None = None) -> Dataset:
    """Give every record without a split one, keeping each hash-split class trainable.

    With ``content_keys`` (one per record, e.g. SHA-256 of its bytes; None if unreadable) copies
    of one image form a group that lands in one split; ``vectors`` (bottlenecks, one row per
    record) add near-duplicates, read from the records' bytes where the thumbnails decide (or
    ``near_pairs``: record indices found already). Identical files under one label count once
    (the extra copies are dropped); under different labels they are left out unless
    ``keep_conflicting``. What was found is added to ``grouping`` when given. A class whose
    images all hash into validation/testing (a class of one or two images) keeps them for
    training instead, with a warning: a class the head never saw cannot be learnt.
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
               keep_conflicting, found, near_pairs)
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
           found: Grouping, near_pairs: Sequence[tuple[int, int]] | None = None) -> None:
    """Regroup ``splits`` in place so that copies share one; mark dropped records in ``keep``."""
    exact = duplicate_groups(keys)
    if near_pairs is not None:
        groups = duplicate_groups(keys, pairs=near_pairs, grouping=found)
    elif vectors is not None:
        groups = duplicate_groups(keys, vectors, threshold, lambda i: records[i].read(),
                                  grouping=found)
    else:
        groups = exact
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
