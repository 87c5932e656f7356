"""Cached augmentation: deterministic variants, keys that follow the settings, reuse across runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import make_colour_tree
from PIL import Image

from retrainer.augment import distort, variant_key
from retrainer.bottlenecks import BottleneckCache
from retrainer.config import AugmentConfig
from retrainer.training import train


def gradient_image(w: int = 80, h: int = 60) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :, None].repeat(h, 0).repeat(3, 2)
    return Image.fromarray(x.astype(np.uint8), "RGB")


def test_keys_cover_settings_and_variant_index():
    a = AugmentConfig(flip_left_right=True, random_crop=10)
    key = "ab" * 32
    assert variant_key(a, key, 0, (32, 32), "bilinear") == \
        variant_key(a, key, 0, (32, 32), "bilinear")
    others = {variant_key(a, key, 1, (32, 32), "bilinear"),
              variant_key(AugmentConfig(flip_left_right=True, random_crop=20), key, 0, (32, 32),
                          "bilinear"),
              variant_key(a, key, 0, (64, 64), "bilinear"),
              variant_key(a, "cd" * 32, 0, (32, 32), "bilinear")}
    assert variant_key(a, key, 0, (32, 32), "bilinear") not in others and len(others) == 4
    # the number of variants does not change what variant 0 is
    assert variant_key(AugmentConfig(True, 10, variants=8), key, 0, (32, 32), "bilinear") == \
        variant_key(a, key, 0, (32, 32), "bilinear")
    assert not AugmentConfig().enabled and not AugmentConfig(True, variants=0).enabled


def test_distortions_do_what_their_names_say():
    img = gradient_image()
    flip = AugmentConfig(flip_left_right=True)
    seen = set()
    for seed in range(12):
        out = np.asarray(distort(flip, img, (60, 80), "bilinear", np.random.default_rng(seed)))
        assert out.shape == (60, 80, 3)
        seen.add("mirrored" if out[0, 0, 0] > out[0, -1, 0] else "same")
    assert seen == {"mirrored", "same"}

    bright = AugmentConfig(random_brightness=20)
    base = np.asarray(img, np.float32)[:, 10:70]
    for seed in range(8):
        out = np.asarray(distort(bright, img, (60, 80), "bilinear", np.random.default_rng(seed)),
                         np.float32)[:, 10:70]
        ratio = out.mean() / base.mean()
        assert 0.79 <= ratio <= 1.21

    crop = AugmentConfig(random_crop=50)  # keeps 2/3 of each side, at a random place
    firsts = {int(np.asarray(distort(crop, img, (30, 40), "bilinear",
                                     np.random.default_rng(seed)))[0, 0, 0]) for seed in range(10)}
    assert len(firsts) > 3 and max(firsts) <= 255 // 3 + 10
    same_seed = [np.asarray(distort(crop, img, (30, 40), "bilinear", np.random.default_rng(7)))
                 for _ in range(2)]
    assert np.array_equal(*same_seed)


def test_train_caches_variants_once_and_recomputes_when_settings_change(tmp_path: Path,
                                                                        fast_config,
                                                                        monkeypatch):
    import retrainer.bottlenecks as bottlenecks
    import retrainer.bottlenecks.extractor as extractor

    built = []
    real_engine, real_forward = bottlenecks.get_engine, extractor.make_forward

    def get_engine(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        built.append("engine")
        return real_engine(*args, **kw)

    def make_forward(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        if not kw.get("runtime"):  # with one: measuring which runtime is fastest here
            built.append("runner")
        return real_forward(*args, **kw)

    monkeypatch.setattr(bottlenecks, "get_engine", get_engine)
    monkeypatch.setattr(extractor, "make_forward", make_forward)
    root = make_colour_tree(tmp_path / "img", per_class=8)
    config = fast_config(root, augment=AugmentConfig(True, random_brightness=10, variants=2),
                         source=dict(validation_percentage=0, testing_percentage=0),
                         summaries_dir=str(tmp_path / "tb"))
    first = train(config)
    assert built == ["engine", "runner"]  # one of each for the images and their variants
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    cache_dir = Path(first.cache_dir)

    def entries() -> int:
        return len(BottleneckCache(cache_dir.parent, cache_dir.name, 3))

    assert entries() == 24 + 2 * 24
    assert first.timings["augmentation"] > 0
    again = train(config)
    assert entries() == 72 and again.bottlenecks_computed == 0
    changed = fast_config(root, augment=AugmentConfig(True, random_brightness=20, variants=3),
                          source=dict(validation_percentage=0, testing_percentage=0))
    train(changed)
    assert entries() == 72 + 3 * 24


def test_a_variant_of_an_image_changed_after_hashing_is_never_made(tmp_path):
    """The variant's key comes from the original bytes: new bytes must not be cached under it."""
    import pytest

    from retrainer.augment import variant_records
    from retrainer.bottlenecks import content_key
    from retrainer.errors import ImageError
    from retrainer.sources.base import ImageRecord

    from conftest import make_image

    path = make_image(tmp_path / "a.png", (200, 20, 20), seed=1)
    rec = ImageRecord(key="a.png", label="red", read=path.read_bytes, path=str(path))
    aug = AugmentConfig(flip_left_right=True, variants=1)
    [(_, variant)] = variant_records(aug, [(content_key(path.read_bytes()), rec)], (32, 32),
                                     "bilinear")
    assert variant.read()[:2] == b"BM"
    make_image(path, (20, 20, 200), seed=2)  # replaced after hashing
    with pytest.raises(ImageError, match="changed while this run was reading it"):
        variant.read()
