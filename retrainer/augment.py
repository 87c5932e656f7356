"""Cached augmentation: K distorted variants of every training image, each computed once.

retrain.py switched its bottleneck cache off when distortions were on, so every step ran the
backbone and training took hours. Here each training image gets ``variants`` fixed distortions
(flip, crop, scale, brightness, with retrain.py's option names and meanings:
:class:`retrainer.config.AugmentConfig`). A variant is decided by the image content, the
distortion settings and the variant index, and is cached under a key made of all three, so it
is computed once and reused by every later run with the same settings. The head then trains
on the originals plus their variants.
"""
from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
from PIL import Image

from .bottlenecks import verified
from .config import AugmentConfig
from .images import RESAMPLE, open_image
from .sources.base import ImageRecord


def tag(aug: AugmentConfig) -> str:
    """Every setting that changes a variant's pixels (not the count: variant i is the same
    whatever the count)."""
    return (f"flip={int(aug.flip_left_right)};crop={aug.random_crop:g};"
            f"scale={aug.random_scale:g};brightness={aug.random_brightness:g}")


def variant_key(aug: AugmentConfig, content_key: str, index: int, size: tuple[int, int],
                resize: str) -> str:
    """The cache key of variant ``index`` of the image whose bytes hash to ``content_key``."""
    blob = f"augment-v1|{content_key}|{tag(aug)}|{index}|{size[0]}x{size[1]}|{resize}"
    return hashlib.sha256(blob.encode()).hexdigest()


def distort(aug: AugmentConfig, img: Image.Image, size: tuple[int, int], resize: str,
            rng: np.random.Generator) -> Image.Image:
    """One random distortion of ``img``, resized to ``size`` (height, width)."""
    width, height = img.size
    margin = 1.0 + aug.random_crop / 100.0
    scale = 1.0 + rng.uniform(0.0, aug.random_scale / 100.0)
    keep = 1.0 / (margin * scale)  # the share of each side that stays in the crop
    cw, ch = max(1, round(width * keep)), max(1, round(height * keep))
    left = int(rng.integers(0, width - cw + 1))
    top = int(rng.integers(0, height - ch + 1))
    out = img.crop((left, top, left + cw, top + ch)).resize((size[1], size[0]), RESAMPLE[resize])
    if aug.flip_left_right and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if aug.random_brightness:
        factor = 1.0 + rng.uniform(-1.0, 1.0) * aug.random_brightness / 100.0
        arr = np.clip(np.asarray(out, np.float32) * factor, 0, 255).astype(np.uint8)
        out = Image.fromarray(arr, "RGB")
    return out


def variant_records(aug: AugmentConfig, pairs: list[tuple[str, ImageRecord]],
                    size: tuple[int, int], resize: str) -> list[tuple[str, ImageRecord]]:
    """(variant key, record) for every variant of every (content key, record) pair.

    A variant record reads as a BMP of the distorted image, already at the backbone's input
    size, so any extraction engine can process it like a normal image.
    """
    out = []
    for key, rec in pairs:
        for i in range(aug.variants):
            vkey = variant_key(aug, key, i, size, resize)
            out.append((vkey, ImageRecord(key=f"{rec.key}#augment{i}", label=rec.label,
                                          read=_variant_reader(aug, verified(rec, key), vkey, size,
                                                              resize),
                                          split=rec.split, path=f"{rec.display}#augment{i}")))
    return out


def _variant_reader(aug: AugmentConfig, rec: ImageRecord, vkey: str, size: tuple[int, int],
                    resize: str) -> Callable[[], bytes]:
    def read() -> bytes:
        img = open_image(rec.read(), rec.display)
        rng = np.random.default_rng(int(vkey[:16], 16))
        buf = io.BytesIO()
        distort(aug, img, size, resize, rng).save(buf, format="BMP")
        return buf.getvalue()

    return read


def augmented_bottlenecks(aug: AugmentConfig, pairs: list[tuple[str, ImageRecord]],
                          class_index: dict[str, int], size: tuple[int, int], resize: str,
                          cache, extract: Callable[[list[tuple[str, ImageRecord]]], list]
                          ) -> tuple[np.ndarray, np.ndarray, int, list]:
    """Bottlenecks and labels of every variant of ``pairs``; ``extract`` computes the missing.

    Returns (x, y, how many were computed now, skipped variants).
    """
    items = variant_records(aug, pairs, size, resize)
    missing = set(cache.missing([k for k, _ in items]))
    skipped = extract([(k, r) for k, r in items if k in missing]) if missing else []
    usable = [(k, r) for k, r in items if k in cache]
    x = cache.load([k for k, _ in usable]) if usable else np.zeros((0, cache.dim), np.float32)
    y = np.array([class_index[r.label] for _, r in usable], dtype=int)
    return x, y, len(missing), skipped
