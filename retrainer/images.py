"""Decoding images into model-ready pixels.

Images are recognised by their content, not their file name: JPEG, PNG, GIF (first frame), BMP,
WebP and TIFF. EXIF orientation is applied, and every mode (grayscale, palette, CMYK, alpha,
16-bit) becomes 8-bit RGB. The same function prepares pixels for training, labelling and
serving, so a model always sees images the way it was trained on them.

Pillow reads every header and decodes every format. RGB and grayscale JPEGs, nearly all
photos, are decoded by libjpeg-turbo through simplejpeg instead, halved by the DCT (1/2, 1/4,
1/8) as long as the result still covers the model's input, and resized by OpenCV: together
about half the CPU time of Pillow's decode and antialiased resize, which matters when the
backbone itself needs only a few milliseconds per image.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG covers MPO
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
#: Decompression-bomb guard: images above this many pixels are refused.
MAX_PIXELS = 100_000_000
#: Changes whenever decoding or resizing changes the pixels a backbone sees (part of cache ids).
PIXELS_VERSION = 4

#: Pillow's EXIF orientation transforms (as in ``ImageOps.exif_transpose``).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow warns between its limit and twice it; every decode here checks the pixel count
# itself (check_pixels), so the warning says nothing new. One process-wide filter, set once:
# swapping filters per decode (catch_warnings) is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
Image.init()  # register every decoder plugin (MPO, WebP, TIFF) before ``formats=`` filters them


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Turn whatever a decoder raises into an :class:`ImageError` that says why."""
    try:
        yield
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, f"too many pixels (over {MAX_PIXELS:,})") from None
    except MemoryError:
        raise ImageError(name, "too large to decode in the memory available") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(name, f"cannot decode ({exc})") from None


def check_pixels(img: Image.Image, name: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an opened (header-only) image whose width x height is over ``max_pixels``.

    Checked explicitly from the header before anything is decoded: Pillow's own guard is a
    warning below twice its limit, and ``warnings.catch_warnings`` is not thread-safe.
    """
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(name, f"too many pixels ({width}x{height}, over {max_pixels:,})")


def _open(data: bytes, name: str) -> Image.Image:
    """Pillow's lazy open: the header only, so format, size and mode are known (and checked)."""
    if not data:
        raise ImageError(name, "empty file")
    img = Image.open(io.BytesIO(data), formats=FORMATS)
    check_pixels(img, name)
    return img


def open_image(
    data: bytes, name: str = "<bytes>", draft: tuple[int, int] | None = None
) -> Image.Image:
    """Decode encoded bytes into an upright RGB Pillow image, or raise :class:`ImageError`.

    With ``draft`` (width, height), a JPEG much larger than that is decoded at a reduced scale
    (Pillow's ``draft``), several times faster and still at least ``draft`` on both sides.
    """
    with _decoding(name):
        return _upright_rgb(_open(data, name), draft)


def _upright_rgb(img: Image.Image, draft: tuple[int, int] | None) -> Image.Image:
    if draft is not None and img.format in ("JPEG", "MPO"):
        side = max(draft)  # square, so EXIF rotation cannot make a side too small
        img.draft("RGB", (side, side))
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


def decode_rgb(data: bytes, name: str = "<bytes>",
               min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded bytes -> upright (height, width, 3) uint8 RGB array, or :class:`ImageError`.

    With ``min_size`` (height, width), a large JPEG is decoded at a reduced DCT scale that is
    still at least that big.
    """
    draft = (min_size[1], min_size[0]) if min_size else None
    with _decoding(name):
        img = _open(data, name)
        if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            pixels = _decode_jpeg(data, img.size, min_size, orientation)
            if pixels is not None:
                return pixels
        return np.asarray(_upright_rgb(img, draft))


def _decode_jpeg(data: bytes, stored: tuple[int, int], min_size: tuple[int, int] | None,
                 orientation: int) -> np.ndarray | None:
    """libjpeg-turbo's decode, upright; None when it refuses (Pillow then decodes, or says why).

    ``stored`` is the (width, height) in the file, as Pillow's header read gives it.
    """
    import simplejpeg

    width, height = stored
    k = 1
    if min_size:
        min_height, min_width = min_size
        if orientation in (5, 6, 7, 8):  # stored on its side: the minimum applies turned too
            min_height, min_width = min_width, min_height
        k = dct_reduction(height, width, min_height, min_width)
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // k),
                                        min_width=-(-width // k))
    except ValueError:
        return None
    method = _TRANSPOSE.get(orientation)
    return pixels if method is None else np.asarray(Image.fromarray(pixels).transpose(method))


def dct_reduction(height: int, width: int, min_height: int, min_width: int) -> int:
    """The largest of 1, 2, 4, 8 that a JPEG's sides can be divided by and still cover the minimum.

    libjpeg-turbo can scale by any n/8 while decoding, but only these reductions run on its SIMD
    code: the scales between are plain C and cost more than a full decode (500 photos of about
    500x375, CPU-ms per image: 0.55 at 1/2, 0.74 in full, 0.81 at 5/8, 0.95 at 3/4, 1.13 at 7/8).
    """
    k = 1
    while k < 8 and -(-height // (2 * k)) >= min_height and -(-width // (2 * k)) >= min_width:
        k *= 2
    return k


def resize_rgb(pixels: np.ndarray, size: tuple[int, int], resize: str = "bilinear") -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8.

    ``bilinear`` runs on OpenCV: it interpolates (half-pixel centres, as ``tf.image.resize``).
    Shrinking by a factor ``s`` of 2 or more would skip pixels (aliasing), so the image is first
    interpolated to ``floor(s)`` times the output, then averaged down by that whole number:
    as close to a Lanczos resize as OpenCV's area averaging, at under half its cost (area
    averaging by a factor that is not a whole number is OpenCV's slow path).
    The arithmetic is float32, rounded once at the end: TensorFlow's ops give the same pixels
    (:mod:`retrainer.preprocess`, which exported graphs run), where OpenCV's 8-bit fixed-point
    interpolation was a grey level off on one value in seven.
    ``bicubic`` keeps Pillow's antialiased filter (OpenCV's cubic kernel is a sharper one).
    """
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    if resize != "bilinear":
        return np.asarray(Image.fromarray(pixels).resize((width, height), RESAMPLE[resize]))
    return resize_float(pixels, size).astype(np.uint8)


def resize_float(pixels: np.ndarray, size: tuple[int, int], resize: str = "bilinear") -> np.ndarray:
    """:func:`resize_rgb`'s pixels as float32 (whole grey levels), without a uint8 round trip."""
    height, width = size
    if pixels.shape[:2] == (height, width) or resize != "bilinear":
        return resize_rgb(pixels, size, resize).astype(np.float32)
    rows, cols = pixels.shape[:2]
    k = int(max(rows / height, cols / width))
    if rows * cols <= PER_CHANNEL_PIXELS:
        out = _resize_channel(pixels, height, width, k)
    else:  # the same arithmetic, one channel at a time: a third of the float32 memory
        out = np.stack([_resize_channel(pixels[:, :, c], height, width, k)
                        for c in range(pixels.shape[2])], axis=2)
    np.rint(out, out=out)
    return np.clip(out, 0, 255, out=out)


#: Images larger than this are resized one channel at a time: a 10 MP PNG's float32 copies
#: then take 40 MB, not 120, while many decode at once (a server's uploads). Smaller ones go in
#: one call, which is faster.
PER_CHANNEL_PIXELS = 1 << 22


def _resize_channel(channel: np.ndarray, height: int, width: int, k: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 to (height, width[, C]) float32, as :func:`resize_rgb` says."""
    import cv2

    rows, cols = channel.shape[:2]
    out = channel.astype(np.float32)
    if k < 2:
        return cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
    if k * k * height * width > 2 * rows * cols:
        # A long strip: the intermediate would outgrow the image. Average the sides that shrink
        # (OpenCV's area averaging is only right when no side grows), then stretch the other.
        out = cv2.resize(out, (min(cols, width), min(rows, height)), interpolation=cv2.INTER_AREA)
        return cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
    out = cv2.resize(out, (k * width, k * height), interpolation=cv2.INTER_LINEAR)
    # k x k means; at k = 2 interpolating half-way between pixel pairs is the same mean, at a
    # sixth of the area averaging's cost
    return cv2.resize(out, (width, height),
                      interpolation=cv2.INTER_LINEAR if k == 2 else cv2.INTER_AREA)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent areas are composited on white."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_wide_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _wide_to_uint8(arr: np.ndarray, rows: int = 256) -> np.ndarray:
    """16-bit, 32-bit or float gray levels -> uint8, scaled by 255/65535 when over 255.

    Converted ``rows`` at a time, so the float64 temporaries are a few rows, not three copies
    of the whole image (a 10-megapixel 16-bit PNG of a few KB cost ~270 MB that way).
    """
    hi = 65535.0 if arr.max() > 255 else 255.0
    out = np.empty(arr.shape, np.uint8)
    for top in range(0, arr.shape[0], rows):
        block = arr[top:top + rows].astype(np.float64)
        block *= 255.0 / hi
        np.clip(block, 0, 255, out=block)
        out[top:top + rows] = block  # truncates, as astype(np.uint8) does
    return out


def load_pixels(
    data: bytes, size: tuple[int, int], resize: str = "bilinear", name: str = "<bytes>"
) -> np.ndarray:
    """Encoded bytes -> float32 array (height, width, 3) of RGB values in 0..255."""
    return resize_float(decode_rgb(data, name, min_size=size), size, resize)


def load_file(path: str | Path, size: tuple[int, int], resize: str = "bilinear") -> np.ndarray:
    """Read and prepare one image file (see :func:`load_pixels`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(str(path), f"cannot read ({exc.strerror or exc})") from None
    return load_pixels(data, size, resize, name=str(path))
