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
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .files import read_regular_file

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
    return _decode_rgb(data, name, min_size, scratch=False)


def _decode_rgb(data: bytes, name: str, min_size: tuple[int, int] | None,
                scratch: bool) -> np.ndarray:
    """:func:`decode_rgb`; with ``scratch``, a JPEG may be decoded into this thread's scratch
    buffer (the result is then only valid until this thread's next decode)."""
    draft = (min_size[1], min_size[0]) if min_size else None
    with _decoding(name):
        img = _open(data, name)
        if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            pixels = _decode_jpeg(data, img.size, min_size, orientation, scratch)
            if pixels is not None:
                return pixels
        return np.asarray(_upright_rgb(img, draft))


def _decode_jpeg(data: bytes, stored: tuple[int, int], min_size: tuple[int, int] | None,
                 orientation: int, scratch: bool = False) -> np.ndarray | None:
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
    rows, cols = -(-height // k), -(-width // k)
    # libjpeg-turbo scales to exactly ceil(side / k); one spare row and column all the same
    buffer = _scratch("decoded", ((rows + 1) * (cols + 1) * 3,), np.uint8) if scratch else None
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=rows, min_width=cols,
                                        buffer=buffer)
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


def resize_float(pixels: np.ndarray, size: tuple[int, int], resize: str = "bilinear",
                 out: np.ndarray | None = None) -> np.ndarray:
    """:func:`resize_rgb`'s pixels as float32 (whole grey levels), without a uint8 round trip.

    ``out``: a C-contiguous float32 (height, width, 3) array to write them into (a row of a
    batch), returned; else a new array.
    """
    height, width = size
    if pixels.shape[:2] == (height, width) or resize != "bilinear":
        resized = resize_rgb(pixels, size, resize)
        if out is None:
            return resized.astype(np.float32)
        np.copyto(out, resized)
        return out
    rows, cols = pixels.shape[:2]
    k = int(max(rows / height, cols / width))
    if rows * cols <= PER_CHANNEL_PIXELS:
        if out is None:
            out = np.empty((height, width, pixels.shape[2]), np.float32)
        _resize_channel(pixels, height, width, k, out)
    else:  # the same arithmetic, one channel at a time: a third of the float32 memory
        planes = np.stack([_resize_channel(pixels[:, :, c], height, width, k)
                           for c in range(pixels.shape[2])], axis=2)
        if out is None:
            out = planes
        else:
            np.copyto(out, planes)
    np.rint(out, out=out)
    return np.clip(out, 0, 255, out=out)


#: Images larger than this are resized one channel at a time: a 10 MP PNG's float32 copies
#: then take 40 MB, not 120, while many decode at once (a server's uploads). Smaller ones go in
#: one call, which is faster.
PER_CHANNEL_PIXELS = 1 << 22


def _resize_channel(channel: np.ndarray, height: int, width: int, k: int,
                    dst: np.ndarray | None = None) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 to (height, width[, C]) float32, as :func:`resize_rgb` says.

    The float32 copy of the image and the intermediate go to this thread's scratch buffers
    (fresh arrays of that size cost as much in page faults as the resize itself); the result
    into ``dst`` when given.
    """
    cv2 = _cv2()
    rows, cols = channel.shape[:2]
    more = channel.shape[2:]
    image = _scratch("float", channel.shape, np.float32)
    np.copyto(image, channel)

    def resize(src: np.ndarray, w: int, h: int, how: int, last: bool = False) -> np.ndarray:
        target = dst if last else _scratch("between", (h, w, *more), np.float32)
        if target is None:
            return cv2.resize(src, (w, h), interpolation=how)
        result = cv2.resize(src, (w, h), dst=target, interpolation=how)
        if result is not target:  # OpenCV gave a new array after all
            np.copyto(target, result)
        return target

    if k < 2:
        return resize(image, width, height, cv2.INTER_LINEAR, last=True)
    if k * k * height * width > 2 * rows * cols:
        # A long strip: the intermediate would outgrow the image. Average the sides that shrink
        # (OpenCV's area averaging is only right when no side grows), then stretch the other.
        between = resize(image, min(cols, width), min(rows, height), cv2.INTER_AREA)
        return resize(between, width, height, cv2.INTER_LINEAR, last=True)
    between = resize(image, k * width, k * height, cv2.INTER_LINEAR)
    # k x k means; at k = 2 interpolating half-way between pixel pairs is the same mean, at a
    # sixth of the area averaging's cost
    return resize(between, width, height,
                  cv2.INTER_LINEAR if k == 2 else cv2.INTER_AREA, last=True)


#: A thread keeps a scratch buffer of up to this many bytes for each step of a decode and
#: resize (three steps: at most 3 x 6 MB per decoding thread); larger images get fresh arrays.
SCRATCH_BYTES = 6 << 20
_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` in this thread's buffer ``slot``: valid
    until this thread asks for ``slot`` again. Reusing the memory saves the page faults of a
    fresh large array (0.2 of the 1.2 CPU-ms per photo that decoding and resizing took)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes > SCRATCH_BYTES:
        return np.empty(shape, dtype)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[slot] = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


_CV2: list = []


def _cv2():
    """OpenCV, set to resize on the calling thread only.

    Images are resized on decoding threads that already keep the cores busy; OpenCV's own
    thread pool on top of them spent 55 % more CPU on the same resize (0.25 against 0.16
    CPU-ms per photo) and took cores from the backbone. Same pixels either way (its threads
    split the rows). This sets OpenCV's process-wide thread count, once, when retrainer first
    resizes.
    """
    if not _CV2:
        import cv2

        cv2.setNumThreads(1)
        _CV2.append(cv2)
    return _CV2[0]


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
    data: bytes, size: tuple[int, int], resize: str = "bilinear", name: str = "<bytes>",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encoded bytes -> float32 array (height, width, 3) of RGB values in 0..255.

    ``out``: a C-contiguous float32 array of that shape to write them into (a row of a batch).
    """
    return resize_float(_decode_rgb(data, name, size, scratch=True), size, resize, out)


def load_file(path: str | Path, size: tuple[int, int], resize: str = "bilinear") -> np.ndarray:
    """Read and prepare one image file (see :func:`load_pixels`)."""
    path = Path(path)
    try:
        data = read_regular_file(path)
    except OSError as exc:
        raise ImageError(str(path), f"cannot read ({exc.strerror or exc})") from None
    return load_pixels(data, size, resize, name=str(path))
