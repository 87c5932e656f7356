"""retrainer's image preprocessing in TensorFlow ops alone: encoded bytes -> model-ready pixels.

The twin of :mod:`retrainer.images` (what ``label``, ``serve`` and training use) for places
where retrainer is not installed: the SavedModel's ``classify_images`` signature runs it, and
plain TensorFlow users call :func:`decode_and_resize`. This module imports nothing but
TensorFlow, so it can also be copied on its own into another project.

The recipe (``resize="bilinear"``, every registered backbone's):

1. JPEG: decoded by libjpeg-turbo with the accurate integer IDCT, reduced by the DCT by the
   largest of 1, 2, 4, 8 that still leaves both sides at least the model's input (the input's
   sides swapped when EXIF says the photo is stored on its side); then the EXIF orientation is
   applied. PNG, GIF (first frame) and BMP: decoded in full; transparent pixels are composited
   on white. WebP and TIFF: TensorFlow has no decoder; the error says so.
2. Resize to the model's input, in float32, with ``s = floor(max(rows / height, cols / width))``:
   ``s < 2``: bilinear interpolation (half-pixel centres, no antialiasing); otherwise bilinear
   to ``s`` times the input, then the mean of each ``s x s`` block (a "long strip", where that
   intermediate would hold over twice the pixels of the image: area-average the shrinking
   sides first, then bilinear for the growing side). Round to whole grey levels once, at the
   end.
3. float32 RGB 0..255, shape (height, width, 3): the graph normalises by itself.

The pixels equal ``retrainer.images.load_pixels`` (libjpeg-turbo + OpenCV, in float32): the
decode is bit-exact, and the resize differs only where float rounding order tips a value
sitting on a half grey level. ``resize="bicubic"`` uses TensorFlow's antialiased bicubic,
close to (not equal to) Pillow's.
"""
from __future__ import annotations

from typing import Any

import tensorflow as tf

#: Bytes searched for the EXIF block (it sits in the first APP segments of a JPEG).
EXIF_WINDOW = 1 << 18
UNSUPPORTED = ("this image format has no TensorFlow decoder (WebP and TIFF are read by "
               "retrainer label/serve, not in the graph); convert it to JPEG or PNG")


@tf.autograph.experimental.do_not_convert
def decode_and_resize(image_bytes: Any, size: tuple[int, int], resize: str = "bilinear") -> Any:
    """Encoded image bytes (a scalar string) -> float32 (height, width, 3) RGB 0..255.

    ``size`` is the model's input (height, width), as in the export's ``metadata.json``
    (``input.shape[1:3]``); ``resize`` is its ``backbone.resize``. Written in graph ops
    throughout (``tf.cond``, ``tf.while_loop``), so ``tf.map_fn`` / ``tf.data`` need not
    AutoGraph-convert it: converting it took ~2 s of every export.
    """
    height, width = int(size[0]), int(size[1])
    data = tf.convert_to_tensor(image_bytes, tf.string)
    magic = tf.strings.substr(data, 0, 4)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    readable = tf.reduce_any(tf.stack([is_jpeg, tf.equal(magic, b"\x89PNG"), tf.equal(magic, b"GIF8"),
                                       tf.equal(tf.strings.substr(data, 0, 2), b"BM")]))
    check = tf.debugging.Assert(readable, [tf.constant(UNSUPPORTED)])
    with tf.control_dependencies([check]):
        data = tf.identity(data)
    pixels = tf.cond(is_jpeg, lambda: _jpeg(data, height, width), lambda: _other(data))
    return _resize(pixels, height, width, resize)


def _jpeg(data: Any, height: int, width: int) -> Any:
    """Upright RGB (whole grey levels, float32), reduced by the DCT as ``images.dct_reduction`` says."""
    orientation = exif_orientation(data)
    shape = tf.image.extract_jpeg_shape(data)
    rows, cols = shape[0], shape[1]
    turned = (orientation >= 5) & (orientation <= 8)
    min_rows = tf.where(turned, width, height)
    min_cols = tf.where(turned, height, width)
    k = tf.constant(1)
    for cand in (2, 4, 8):
        fits = (-(-rows // cand) >= min_rows) & (-(-cols // cand) >= min_cols) & tf.equal(k, cand // 2)
        k = tf.where(fits, cand, k)

    def decode(ratio: int) -> Any:
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio,
                                         dct_method="INTEGER_ACCURATE")

    branch = tf.cast(tf.math.log(tf.cast(k, tf.float32)) / tf.math.log(2.0) + 0.5, tf.int32)
    pixels = tf.switch_case(branch, [decode(1), decode(2), decode(4), decode(8)])
    return tf.cast(orient(pixels, orientation), tf.float32)


def _other(data: Any) -> Any:
    """PNG, GIF (first frame) or BMP -> RGB (float32), transparency composited on white."""
    def png() -> Any:
        rgba = tf.cast(tf.io.decode_png(data, channels=4), tf.float32)
        alpha = rgba[..., 3:] / 255.0
        return _to_uint8(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha))

    def gif() -> Any:
        return tf.cast(tf.io.decode_gif(data)[0], tf.float32)

    def bmp() -> Any:
        return tf.cast(tf.io.decode_bmp(data, channels=3), tf.float32)

    return tf.cond(tf.equal(tf.strings.substr(data, 0, 4), b"\x89PNG"), png,
                   lambda: tf.cond(tf.equal(tf.strings.substr(data, 0, 3), b"GIF"), gif, bmp))


def orient(pixels: Any, orientation: Any) -> Any:
    """Apply an EXIF orientation (1..8; anything else: as stored) as Pillow's exif_transpose."""
    def t(img: Any) -> Any:
        return tf.transpose(img, [1, 0, 2])

    branches = [lambda: pixels,                                   # 1
                lambda: tf.reverse(pixels, [1]),                  # 2 mirrored
                lambda: tf.reverse(pixels, [0, 1]),               # 3 upside down
                lambda: tf.reverse(pixels, [0]),                  # 4 flipped
                lambda: t(pixels),                                # 5 transposed
                lambda: tf.reverse(t(pixels), [1]),               # 6 turned right
                lambda: tf.reverse(t(pixels), [0, 1]),            # 7 transverse
                lambda: tf.reverse(t(pixels), [0])]               # 8 turned left
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation - 1, 0)
    return tf.switch_case(index, branches)


def exif_orientation(data: Any) -> Any:
    """The EXIF orientation tag (0x0112) of a JPEG's first EXIF block, or 1 (int32 scalar)."""
    raw = tf.io.decode_raw(tf.strings.substr(data, 0, EXIF_WINDOW), tf.uint8)
    head = tf.pad(tf.cast(raw, tf.int32), [[0, EXIF_WINDOW + 16 - tf.shape(raw)[0]]])
    n = tf.shape(raw)[0]

    def byte(i: Any) -> Any:
        return tf.gather(head, tf.clip_by_value(i, 0, EXIF_WINDOW + 15))

    # Walk the segments: FF xx LENGTH ... until APP1 "Exif\0\0", the image data or the end.
    def seg_cond(pos: Any, found: Any, steps: Any) -> Any:
        return (found < 0) & (pos + 4 <= n) & (steps < 256)

    def seg_body(pos: Any, found: Any, steps: Any) -> tuple[Any, Any, Any]:
        marker, kind = byte(pos), byte(pos + 1)
        length = byte(pos + 2) * 256 + byte(pos + 3)
        exif = tf.reduce_all(tf.equal(tf.stack([byte(pos + 4 + j) for j in range(6)]),
                                      [0x45, 0x78, 0x69, 0x66, 0, 0]))
        stop = tf.not_equal(marker, 0xFF) | tf.equal(kind, 0xDA) | tf.equal(kind, 0xD9)
        found = tf.where(tf.equal(kind, 0xE1) & exif & ~stop, pos + 10, found)
        pos = tf.where(stop, n, pos + 2 + length)
        return pos, found, steps + 1

    _, tiff, _ = tf.while_loop(seg_cond, seg_body, [tf.constant(2), tf.constant(-1),
                                                   tf.constant(0)])
    little = tf.equal(byte(tiff), 0x49) & tf.equal(byte(tiff + 1), 0x49)

    def u16(i: Any) -> Any:
        return tf.where(little, byte(i) + 256 * byte(i + 1), 256 * byte(i) + byte(i + 1))

    def u32(i: Any) -> Any:
        lo, hi = u16(i), u16(i + 2)
        return tf.where(little, lo + 65536 * hi, 65536 * lo + hi)

    ifd = tiff + u32(tiff + 4)
    sane = (tiff >= 0) & (ifd > tiff) & (ifd + 2 <= n)  # no EXIF, or an offset past the end
    count = tf.where(sane, tf.minimum(u16(ifd), 512), 0)

    def tag_cond(i: Any, value: Any) -> Any:
        return (i < count) & (value < 0) & (ifd + 14 + 12 * i <= n)

    def tag_body(i: Any, value: Any) -> tuple[Any, Any]:
        entry = ifd + 2 + 12 * i
        return i + 1, tf.where(tf.equal(u16(entry), 0x0112), u16(entry + 8), value)

    _, value = tf.while_loop(tag_cond, tag_body, [tf.constant(0), tf.constant(-1)])
    return tf.where((tiff >= 0) & (value >= 0), value, 1)


def _to_uint8(pixels: Any) -> Any:
    """Round to whole grey levels (kept as float32), as ``images.resize_rgb``'s result is."""
    return tf.clip_by_value(tf.round(pixels), 0.0, 255.0)


def _resize(pixels: Any, height: int, width: int, resize: str) -> Any:
    """Whole grey levels (rows, cols, 3) -> float32 (height, width, 3), as
    ``images.resize_rgb``: float32 arithmetic, rounded once at the end."""
    if resize != "bilinear":
        out = tf.image.resize(pixels, (height, width), method=resize, antialias=True)
        return tf.ensure_shape(_to_uint8(out), (height, width, 3))
    rows, cols = tf.shape(pixels)[0], tf.shape(pixels)[1]
    scale = tf.maximum(tf.cast(rows, tf.float64) / height, tf.cast(cols, tf.float64) / width)
    k = tf.cast(tf.floor(scale), tf.int32)
    strip = tf.cast(k * k, tf.int64) * (height * width) > 2 * tf.cast(rows * cols, tf.int64)

    def bilinear(img: Any, size: Any) -> Any:
        return tf.image.resize(img, size, method="bilinear", antialias=False)

    def same() -> Any:
        return pixels

    def interpolate() -> Any:
        return bilinear(pixels, (height, width))

    def long_strip() -> Any:
        shrunk = tf.image.resize(pixels, (tf.minimum(rows, height), tf.minimum(cols, width)),
                                 method="area")
        return bilinear(shrunk, (height, width))

    def block_mean() -> Any:
        big = bilinear(pixels, (k * height, k * width))
        return tf.reduce_mean(tf.reshape(big, (height, k, width, k, 3)), axis=[1, 3])

    index = tf.where(tf.equal(rows, height) & tf.equal(cols, width), 0,
                     tf.where(k < 2, 1, tf.where(strip, 2, 3)))
    out = tf.switch_case(index, [same, interpolate, long_strip, block_mean])
    return tf.ensure_shape(_to_uint8(out), (height, width, 3))


__all__ = ["decode_and_resize", "exif_orientation", "orient"]
