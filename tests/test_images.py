"""Decoding: formats by content, EXIF orientation, every mode to RGB, clear errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrainer.errors import ImageError
from retrainer.images import load_file, load_pixels, open_image

RED = (200, 20, 20)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_every_format_decodes_to_rgb(fmt):
    data = encode(Image.new("RGB", (40, 30), RED), fmt)
    pixels = load_pixels(data, (16, 16))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
    assert np.allclose(pixels.mean(axis=(0, 1)), RED, atol=12)


def test_format_is_recognised_by_content_not_extension(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    assert np.allclose(load_file(path, (8, 8))[0, 0], RED)


def test_gif_uses_the_first_frame():
    frames = [Image.new("P", (10, 10), i) for i in (1, 2)]
    for frame, colour in zip(frames, (RED, (0, 0, 255))):
        frame.putpalette(list(colour) * 256)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.allclose(load_pixels(data, (10, 10))[0, 0], RED)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert open_image(data).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (12, 12), (128, 128, 128)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = open_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (12, 12)


def test_sixteen_bit_values_are_scaled_not_clipped():
    img = Image.new("I;16", (4, 4), 65535 // 2)
    pixel = np.asarray(open_image(encode(img, "PNG")))[0, 0]
    assert 120 <= pixel[0] <= 135


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert tuple(np.asarray(open_image(encode(img, "PNG")))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image at all", "not an image"),
])
def test_bad_bytes_raise_image_error_with_a_reason(data, reason):
    with pytest.raises(ImageError) as info:
        load_pixels(data, (8, 8), name="x.jpg")
    assert reason in info.value.reason and info.value.name == "x.jpg"


def test_truncated_jpeg_is_an_image_error():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="cannot decode"):
        load_pixels(data[: len(data) // 2], (8, 8))


def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="too many pixels"):
        load_pixels(encode(Image.new("RGB", (64, 64)), "PNG"), (8, 8))


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_file(tmp_path / "nope.png", (8, 8))
