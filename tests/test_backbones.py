"""The backbone registry: every spec is consistent data, Keras families build offline with random
weights, preprocessing matches keras.applications, Lite1/Lite2 convert, .keras ids cover config."""
from __future__ import annotations

import dataclasses
import inspect
import os

import numpy as np
import pytest

from retrainer.backbones import get_spec, list_backbones
from retrainer.backbones.registry import PREPROCESS_MODES
from retrainer.errors import UnknownBackbone, WeightsUnavailable

SHIPPED = [n for n in list_backbones()
           if str(get_spec(n).builder).startswith("retrainer.backbones.")]
KERAS = [n for n in SHIPPED if get_spec(n).source.kind == "keras"]
# One of each preprocessing mode and family, cheap to build at 32 px: run everywhere.
BUILT_IN_CI = ["resnet50", "vgg16", "xception", "mobilenet_v3_large", "efficientnetv2_b0",
               "convnext_tiny"]
ALL = os.environ.get("RETRAINER_TEST_ALL_BACKBONES") == "1"


def small(spec, size=32):
    size = max(size, 75) if spec.name in ("xception", "inception_v3") else size
    return dataclasses.replace(spec, input_size=(size, size))


def test_every_spec_is_consistent_data():
    names = SHIPPED
    assert len(names) >= 17 and len(KERAS) >= 14
    for name in names:
        s = get_spec(name)
        assert s.name == name and s.feature_dim > 0 and s.gflops > 0, name
        assert s.input_size[0] >= 32 and s.input_size[1] >= 32, name
        assert s.source.kind in ("pypi", "keras"), name
        assert s.preprocess in PREPROCESS_MODES, name
        mean, std, channels = PREPROCESS_MODES[s.preprocess]
        assert (s.mean, s.std, s.channels) == (mean, std, channels), name
        if s.source.kind == "pypi":
            assert s.source.offline and s.source.requirement.endswith("==0.1.0")
            assert s.source.file.endswith(".pth")
        d = s.to_dict()
        assert d["source"]["file"] == s.source.file and isinstance(d["options"], dict)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownBackbone) as info:
        get_spec("efficientnet_lite_2")
    assert "Did you mean 'efficientnet_lite2'?" in info.value.hint
    with pytest.raises(UnknownBackbone) as info:
        get_spec("resnet_50")
    assert "'resnet50'" in info.value.hint


def test_no_backbone_name_in_generic_code():
    """The factory and registry know no backbone by name: everything is in the specs."""
    import retrainer.backbones.factory as factory
    import retrainer.backbones.registry as registry

    for module in (factory, registry):
        source = inspect.getsource(module)
        for name in SHIPPED:
            assert f'"{name}"' not in source and f"'{name}'" not in source, (module, name)


@pytest.mark.parametrize("name", KERAS)
def test_keras_spec_names_a_real_application(name):
    """Cheap for every Keras backbone: the application and its arguments exist."""
    import keras

    spec = get_spec(name)
    app = getattr(keras.applications, spec.option("app"))
    params = inspect.signature(app).parameters
    for key, _ in spec.option("kwargs", ()):
        assert key in params, (name, key)


@pytest.mark.parametrize("name", [n for n in KERAS if n in BUILT_IN_CI or ALL])
def test_keras_family_builds_offline_with_random_weights(name):
    spec = small(get_spec(name))
    model = spec.build("random")
    assert model.output_shape == (None, spec.feature_dim)
    x = np.random.default_rng(0).uniform(0, 255, (2, *spec.input_size, 3)).astype("float32")
    out = np.asarray(model(x))
    assert out.shape == (2, spec.feature_dim) and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "efficientnetv2_b0"])
def test_offline_download_fails_fast_naming_the_file(name, monkeypatch):
    """No network: Keras's download is refused; the error names the file --weights takes."""
    from keras.src.utils import file_utils

    asked = []

    def offline(fname, *args, **kwargs):
        asked.append(fname)
        raise OSError("network is unreachable")

    monkeypatch.setattr(file_utils, "get_file", offline)
    spec = small(get_spec(name))
    with pytest.raises(WeightsUnavailable) as info:
        spec.build(None)
    assert asked == [spec.source.file]
    assert "offline?" in info.value.message and spec.source.file in info.value.hint


@pytest.mark.parametrize("name, module", [("resnet50", "resnet50"), ("vgg16", "vgg16"),
                                          ("xception", "xception"), ("inception_v3", "inception_v3")])
def test_normalisation_matches_keras_preprocess_input(name, module):
    import keras

    from retrainer.backbones.registry import normalisation_layer

    x = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    ours = np.asarray(normalisation_layer(get_spec(name))(x))
    theirs = getattr(keras.applications, module).preprocess_input(x.copy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_in_model_preprocessing_is_left_to_the_model():
    spec = get_spec("efficientnetv2_b0")
    assert (spec.mean, spec.std, spec.preprocess) == (0.0, 1.0, "in-model")
    assert dict(spec.option("kwargs"))["include_preprocessing"] is True


def test_weights_file_for_a_keras_family(tmp_path):
    """--weights FILE: the builder loads a local file instead of downloading."""
    import keras

    spec = small(get_spec("mobilenet_v3_large"))
    base = keras.applications.MobileNetV3Large(include_top=False, weights=None, pooling="avg",
                                               input_shape=(32, 32, 3), include_preprocessing=True)
    path = tmp_path / "mine.weights.h5"
    base.save_weights(path)
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(spec.build(str(path))(x)), np.asarray(base(x)),
                               atol=1e-5)
    with pytest.raises(WeightsUnavailable) as info:
        spec.build(str(tmp_path / "missing.h5"))
    assert spec.source.file in info.value.hint


# ----------------------------------------------------------------------------- Lite1 / Lite2

def test_lite_width_and_depth_rules():
    from retrainer.backbones import efficientnet_lite as el

    assert [el.round_filters(f, 1.1) for f in (16, 24, 40, 80, 112, 192, 320)] == \
        [16, 24, 48, 88, 120, 208, 352]
    lite2 = list(el._blocks(1.1, 1.2))
    # repeats 1,2,2,3,3,4,1: ceil(1.1 x) and ceil(1.2 x) both give 1,3,3,4,4,5,1 (ends fixed)
    assert len(list(el._blocks(1.0, 1.0))) == 16 and len(list(el._blocks(1.0, 1.1))) == 21
    assert len(lite2) == 21 and lite2[0]["filters_in"] == 32 and lite2[-1]["filters_out"] == 352
    # the first and last stages keep their single block (Lite's fixed stem and head)
    assert [b["name"] for b in lite2].count("block1a") == 1 and lite2[-1]["name"] == "block7a"
    assert el.build_lite(1.0, 1.1, include_top=True, input_size=(240, 240)).count_params() == 5_470_344
    assert el.build_lite(1.1, 1.2, include_top=True, input_size=(260, 260)).count_params() == 6_150_168


def test_lite_weights_of_another_size_are_refused():
    from retrainer.backbones import efficientnet_lite as el
    from retrainer.backbones.torch_legacy import load_legacy_state_dict

    lite2 = get_spec("efficientnet_lite2")
    sd = load_legacy_state_dict(el._package_pth(lite2))
    with pytest.raises(WeightsUnavailable, match="efficientnet-lite0"):
        el.convert_state_dict(el.build_lite0(include_top=True), sd)


def _chelsea(size):
    from PIL import Image

    skdata = pytest.importorskip("skimage.data")
    img = skdata.chelsea()
    h, w = img.shape[:2]
    c = int(round(0.875 * min(h, w)))
    top, left = (h - c) // 2, (w - c) // 2
    crop = Image.fromarray(img[top:top + c, left:left + c]).resize((size, size), Image.BICUBIC)
    return np.asarray(crop, dtype=np.float32)[None]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_converted_weights_see_a_cat(name):
    """The converted ImageNet classifier, no torch: chelsea is a cat (reference: Egyptian cat)."""
    from retrainer.backbones import efficientnet_lite as el

    spec = get_spec(name)
    probs = el.build_classifier(spec=spec).predict(_chelsea(spec.input_size[0]), verbose=0)[0]
    assert int(probs.argmax()) == 285 and probs[285] > 0.3  # Egyptian cat (281-285: cats)


# ----------------------------------------------------------------------------- .keras ids

def _save_model(path, activation, kernel):
    import keras

    inputs = keras.Input((8, 8, 3), name="input")
    conv = keras.layers.Conv2D(4, 3, activation=activation, name="conv")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(conv(inputs))
    model = keras.Model(inputs, x, name="mine")  # fixed names: a re-save is byte-for-byte config
    conv.set_weights([kernel, np.zeros(4, "float32")])
    model.save(path)
    return path


def test_keras_file_cache_id_covers_the_config(tmp_path):
    from retrainer.backbones.factory import create_backbone

    kernel = np.random.default_rng(3).normal(size=(3, 3, 3, 4)).astype("float32")
    path = tmp_path / "mine.keras"
    first = create_backbone(str(_save_model(path, "relu", kernel)))
    same = create_backbone(str(_save_model(path, "relu", kernel)))  # re-saved, unchanged
    changed = create_backbone(str(_save_model(path, "tanh", kernel)))  # same weights
    from retrainer.backbones.factory import weights_digest

    assert weights_digest(first.model) == weights_digest(changed.model)
    assert same.cache_id == first.cache_id
    assert changed.cache_id != first.cache_id


def test_a_whole_classifier_file_warns_to_pick_a_feature_layer(tmp_path, caplog):
    """A .keras model ending in a softmax trains on class scores unless --feature-layer says
    otherwise: say so, and name the layer before it; a feature extractor gets no warning."""
    import keras

    from retrainer.backbones.keras_file import spec_for_file

    inputs = keras.Input((8, 8, 3), name="input")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.Conv2D(4, 3)(inputs))
    outputs = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    whole = tmp_path / "whole.keras"
    keras.Model(inputs, outputs).save(whole)
    features = _save_model(tmp_path / "features.keras", "relu",
                           np.zeros((3, 3, 3, 4), "float32"))
    with caplog.at_level("WARNING", logger="retrainer"):
        assert spec_for_file(whole).feature_dim == 5
    assert "ends in a classifier (layer 'predictions', softmax over 5 outputs)" in caplog.text
    assert "--feature-layer NAME (e.g. 'pool')" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrainer"):
        assert spec_for_file(whole, "pool").feature_dim == 4
        assert spec_for_file(features).feature_dim == 4
    assert "classifier" not in caplog.text
