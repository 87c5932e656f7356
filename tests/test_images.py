"""Decoding: formats by content, EXIF orientation, every mode to RGB, clear errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrainer.errors import ImageError
from retrainer.images import (
    dct_reduction, decode_rgb, load_file, load_pixels, open_image, resize_rgb,
)

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


def photo() -> bytes:
    """A real photo (427x640 JPEG) that scikit-learn ships."""
    from importlib.resources import files

    return (files("sklearn.datasets.images") / "china.jpg").read_bytes()


def test_fast_jpeg_decode_equals_pillows():
    data = photo()
    fast = decode_rgb(data).astype(int)
    assert fast.shape == (427, 640, 3)
    assert np.abs(fast - np.asarray(open_image(data), dtype=int)).max() <= 1


def test_large_jpegs_decode_at_a_reduced_scale_that_still_covers_the_input():
    data = photo()
    pixels = decode_rgb(data, min_size=(150, 100))
    assert 150 <= pixels.shape[0] < 427 and 100 <= pixels.shape[1] < 640
    # an exact 1/2 DCT scale matches Pillow's half-size draft of the same file
    half = decode_rgb(data, min_size=(213, 320))
    assert half.shape == (214, 320, 3)
    reference = Image.open(io.BytesIO(data))
    reference.draft("RGB", (320, 213))
    assert reference.size == (320, 214)
    assert np.abs(half.astype(int) - np.asarray(reference, int)).max() <= 1


def test_jpegs_are_reduced_only_by_powers_of_two():
    data = photo()  # 427x640: 3/4 would cover 300x300, but only 1/2, 1/4, 1/8 run on SIMD code
    assert decode_rgb(data, min_size=(300, 300)).shape == (427, 640, 3)
    assert decode_rgb(data, min_size=(100, 100)).shape == (107, 160, 3)
    assert dct_reduction(427, 640, 54, 80) == 8 and dct_reduction(427, 640, 55, 80) == 4
    assert dct_reduction(427, 640, 0, 0) == 8 and dct_reduction(427, 640, 428, 1) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_does(orientation):
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    fast = decode_rgb(data)
    expected = np.asarray(open_image(data))
    assert fast.shape == expected.shape == ((48, 32, 3) if orientation >= 5 else (32, 48, 3))
    assert np.abs(fast.astype(int) - expected.astype(int)).max() <= 1
    # the reduced scale is chosen for the upright image, whichever way the JPEG is stored
    scaled = decode_rgb(data, min_size=(10, 30))
    assert scaled.shape[0] >= 10 and scaled.shape[1] >= 30


def test_cmyk_and_grayscale_jpegs_keep_their_colours():
    grey = decode_rgb(encode(Image.new("L", (16, 16), 90), "JPEG"))
    assert grey.shape == (16, 16, 3) and np.allclose(grey, 90, atol=1)
    cmyk = decode_rgb(encode(Image.new("RGB", (16, 16), RED).convert("CMYK"), "JPEG"))
    assert np.allclose(cmyk.mean(axis=(0, 1)), RED, atol=6)


def test_shrinking_averages_instead_of_aliasing():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: point sampling would keep only one colour
    out = resize_rgb(stripes, (16, 16))
    assert out.shape == (16, 16, 3) and np.allclose(out, 127.5, atol=1)
    # by a factor that is not a whole number (2.5x): plain interpolation swings 64..191 here
    out = resize_rgb(stripes[:60, :60], (24, 24))
    assert out.shape == (24, 24, 3) and np.abs(out.astype(float) - 127.5).max() <= 32
    # a long strip (4000x8 to 16x16) is averaged directly, never blown up to 4000x4000 first
    strip = np.zeros((8, 4000, 3), np.uint8)
    strip[:, ::2] = 255
    out = resize_rgb(strip, (16, 16))
    assert out.shape == (16, 16, 3) and np.allclose(out, 127.5, atol=1)


def test_bicubic_is_pillows_filter():
    pixels = np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BICUBIC))
    assert np.array_equal(resize_rgb(pixels, (64, 64), "bicubic"), expected)


def test_prepared_photo_is_close_to_an_antialiased_resize():
    data = photo()
    ours = load_pixels(data, (224, 224))
    reference = np.asarray(open_image(data).resize((224, 224), Image.BILINEAR), np.float32)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - reference).mean() < 3


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
