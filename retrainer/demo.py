"""A small offline demo set: crops of the sample photos that scikit-image ships.

Three classes (a cat, a cup of coffee, a rocket), each made of random crops of one photo with
random scale, position and mirroring. Needs ``pip install scikit-image``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: class label -> scikit-image sample photo
SOURCES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def crops(photo: str, n: int, seed: int, size: int = 160) -> list[Image.Image]:
    """``n`` random square crops of one scikit-image sample photo."""
    try:
        import skimage.data
    except ImportError:
        from .errors import RetrainerError

        raise RetrainerError("the demo set needs scikit-image.",
                             "pip install scikit-image") from None
    img = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(min(img.size) * rng.uniform(0.5, 0.95))
        x = int(rng.integers(0, img.width - side + 1))
        y = int(rng.integers(0, img.height - side + 1))
        crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def make_demo_set(root: str | Path, per_class: int = 40, seed: int = 0) -> Path:
    """Write ROOT/<label>/crop_NNN.jpg for every class; returns ROOT."""
    root = Path(root)
    for c, (label, photo) in enumerate(SOURCES.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(crops(photo, per_class, seed=seed + c)):
            crop.save(root / label / f"crop_{i:03d}.jpg", quality=90)
    return root
