"""Decoding images into model-ready pixels, with Pillow.

Images are recognised by their content, not their file name: JPEG, PNG, GIF (first frame), BMP,
WebP and TIFF. EXIF orientation is applied, and every mode (grayscale, palette, CMYK, alpha,
16-bit) becomes 8-bit RGB. The same function prepares pixels for training, labelling and
serving, so a model always sees images the way it was trained on them.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG covers MPO
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
#: Decompression-bomb guard: images above this many pixels are refused.
MAX_PIXELS = 100_000_000

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
Image.init()  # register every decoder plugin (MPO, WebP, TIFF) before ``formats=`` filters them


def open_image(
    data: bytes, name: str = "<bytes>", draft: tuple[int, int] | None = None
) -> Image.Image:
    """Decode encoded bytes into an upright RGB Pillow image, or raise :class:`ImageError`.

    With ``draft`` (width, height), a JPEG much larger than that is decoded at a reduced scale
    (Pillow's ``draft``), several times faster and still at least ``draft`` on both sides.
    """
    if not data:
        raise ImageError(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            if draft is not None and img.format in ("JPEG", "MPO"):
                side = max(draft)  # square, so EXIF rotation cannot make a side too small
                img.draft("RGB", (side, side))
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, f"too many pixels (over {MAX_PIXELS:,})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(name, f"cannot decode ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent areas are composited on white."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_pixels(
    data: bytes, size: tuple[int, int], resize: str = "bilinear", name: str = "<bytes>"
) -> np.ndarray:
    """Encoded bytes -> float32 array (height, width, 3) of RGB values in 0..255."""
    height, width = size
    img = open_image(data, name, draft=(width, height))
    try:
        if img.size != (width, height):
            img = img.resize((width, height), RESAMPLE[resize])
        return np.asarray(img, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ImageError(name, f"cannot decode ({exc})") from None


def load_file(path: str | Path, size: tuple[int, int], resize: str = "bilinear") -> np.ndarray:
    """Read and prepare one image file (see :func:`load_pixels`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(str(path), f"cannot read ({exc.strerror or exc})") from None
    return load_pixels(data, size, resize, name=str(path))
