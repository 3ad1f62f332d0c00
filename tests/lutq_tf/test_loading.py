"""Tests of `lutq_tf.load_model` on Keras 3 and tf.keras 2.x model files."""

import hashlib
import json
import os

import h5py
import keras
import numpy as np
import pytest

import lutq_tf

MLPERF_DIR = "/work/shared/models"
# MLPerf Tiny reference models, saved by tf.keras 2.x, and their sizes.
MLPERF_PARAMS = {
    "mlperf_tiny_resnet8.h5": 78_666,
    "mlperf_tiny_kws_ds_cnn.h5": 24_908,
    "mlperf_tiny_vww_96.h5": 221_794,
    "mlperf_tiny_ad01.h5": 269_992,
    "mlperf_tiny_str_ww.h5": 47_707,
}


def small_model():
    """A Functional model with a DepthwiseConv2D named "dw" and its inputs."""
    inp = keras.Input((8, 8, 3))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inp)
    x = keras.layers.Conv2D(4, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(x))
    data = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    return model, data


def set_layer_config_key(path, layer_name, key, value):
    """Sets `key` in a layer's config in an .h5 file, as tf.keras 2.x did."""
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == layer_name:
                layer["config"][key] = value
        f.attrs["model_config"] = json.dumps(config).encode("utf-8")


def save_tf_keras_style_h5(model, path, **extra_keys):
    """Saves `model` as .h5 with `extra_keys` in the "dw" layer's config."""
    model.save(path)
    for key, value in extra_keys.items():
        set_layer_config_key(path, "dw", key, value)
    return path


def assert_weights_match_h5(model, path):
    """Every dataset under model_weights equals the model's weight, bitwise."""
    seen = []
    with h5py.File(path, "r") as f:
        group = f["model_weights"]
        for layer_name in group.attrs["layer_names"]:
            layer_name = _text(layer_name)
            names = [_text(n) for n in group[layer_name].attrs["weight_names"]]
            if not names:
                continue
            values = model.get_layer(layer_name).get_weights()
            assert len(values) == len(names), layer_name
            for name, value in zip(names, values):
                stored = group[layer_name][name][()]
                assert stored.dtype == value.dtype, name
                assert stored.shape == value.shape, name
                assert stored.tobytes() == value.tobytes(), name
                seen.append(group[layer_name][name].name)
        every = []

        def collect(_, obj):
            if isinstance(obj, h5py.Dataset):
                every.append(obj.name)

        group.visititems(collect)
    assert sorted(seen) == sorted(every)


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def legacy_h5(tmp_path_factory):
    """A small model and its .h5 file with tf.keras 2.x's `groups: 1`."""
    model, data = small_model()
    path = tmp_path_factory.mktemp("legacy") / "model.h5"
    save_tf_keras_style_h5(model, path, groups=1)
    return model, data, path


def test_keras_refuses_the_groups_key(legacy_h5):
    _, _, path = legacy_h5
    with pytest.raises((TypeError, ValueError), match="groups"):
        keras.models.load_model(path, compile=False)


def test_groups_key_loads_with_the_files_weights(legacy_h5):
    model, data, path = legacy_h5
    before = _digest(path)
    loaded = lutq_tf.load_model(path)
    assert _digest(path) == before
    assert type(loaded.get_layer("dw")) is keras.layers.DepthwiseConv2D
    assert_weights_match_h5(loaded, path)
    np.testing.assert_array_equal(
        loaded.predict(data, verbose=0), model.predict(data, verbose=0)
    )


def test_loaded_model_is_plain_keras_and_quantizes(legacy_h5):
    _, _, path = legacy_h5
    loaded = lutq_tf.load_model(path)
    quantized = lutq_tf.quantize_model(loaded, bits=2, init_iterations=1)
    assert lutq_tf.is_quantized(quantized)


def test_groups_equal_to_the_channel_count_loads(tmp_path):
    model, _ = small_model()
    path = save_tf_keras_style_h5(model, tmp_path / "model.h5", groups=3)
    assert_weights_match_h5(lutq_tf.load_model(path), path)


def test_other_groups_value_names_the_layer(tmp_path):
    model, _ = small_model()
    path = save_tf_keras_style_h5(model, tmp_path / "model.h5", groups=2)
    expected = r"layer 'dw' \(DepthwiseConv2D\): config key 'groups' = 2 "
    with pytest.raises(ValueError, match=expected):
        lutq_tf.load_model(path)


def test_unknown_key_names_the_layer_and_key(tmp_path):
    model, _ = small_model()
    path = save_tf_keras_style_h5(model, tmp_path / "model.h5", groups=1, foo=3)
    before = _digest(path)
    with pytest.raises(ValueError) as info:
        lutq_tf.load_model(path)
    message = str(info.value)
    assert (
        "layer 'dw' (DepthwiseConv2D): config key 'foo' is not known to Keras 3"
        in message
    )
    assert str(path) in message and "load_weights" in message
    assert "'groups'" not in message  # the known key is not blamed
    assert _digest(path) == before


def test_keras_file_loads_as_keras_does(tmp_path):
    model, data = small_model()
    model.save(tmp_path / "model.keras")
    loaded = lutq_tf.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(
        loaded.predict(data, verbose=0), model.predict(data, verbose=0)
    )


def test_keras_3_h5_loads(tmp_path):
    model, _ = small_model()
    path = tmp_path / "model.h5"
    model.save(path)
    assert_weights_match_h5(lutq_tf.load_model(path), path)


@pytest.mark.parametrize("name", ["model.h5", "model.keras", "model.bin"])
def test_not_a_model_file_names_the_path(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match="not a Keras model file") as info:
        lutq_tf.load_model(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.h5"
    with pytest.raises(FileNotFoundError, match=f"no such model file: {path}"):
        lutq_tf.load_model(path)


def test_weights_only_h5_says_so(tmp_path):
    model, _ = small_model()
    model.save_weights(tmp_path / "model.weights.h5")
    with pytest.raises(ValueError, match="holds no model config.*load_weights"):
        lutq_tf.load_model(tmp_path / "model.weights.h5")


def test_fix_legacy_config_drops_only_no_op_keys():
    policy = {"class_name": "Policy", "config": {"name": "mixed_float16"}}
    bn = {"name": "bn", "fused": True, "dtype": policy}
    rnn = {"name": "rnn", "time_major": False}
    config = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "BatchNormalization", "name": "bn", "config": bn},
        {"class_name": "LSTM", "name": "rnn", "config": rnn},
    ]}}
    dropped = lutq_tf.loading.fix_legacy_config(config)
    assert dropped == [
        ("bn", "BatchNormalization", "fused", True),
        ("rnn", "LSTM", "time_major", False),
    ]
    assert bn == {"name": "bn", "dtype": "mixed_float16"}
    assert rnn == {"name": "rnn"}
    rnn["time_major"] = True
    expected = r"layer 'rnn' \(LSTM\): config key 'time_major' = True "
    with pytest.raises(ValueError, match=expected):
        lutq_tf.loading.fix_legacy_config(config)


@pytest.mark.skipif(
    not os.path.isdir(MLPERF_DIR),
    reason=f"needs the MLPerf Tiny models in {MLPERF_DIR}",
)
@pytest.mark.parametrize("name", sorted(MLPERF_PARAMS))
def test_mlperf_tiny_h5_loads_with_the_files_weights(name):
    path = os.path.join(MLPERF_DIR, name)
    before = _digest(path)
    model = lutq_tf.load_model(path)
    assert model.count_params() == MLPERF_PARAMS[name]
    # Standard Keras 3 layers only, so quantize_model and export take it.
    assert all(type(x).__module__.startswith("keras.") for x in model.layers)
    assert_weights_match_h5(model, path)
    assert _digest(path) == before


def test_a_zip_that_is_not_a_keras_file_names_the_path(tmp_path):
    import zipfile

    path = tmp_path / "broken.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(ValueError, match="not a Keras model file"):
        lutq_tf.load_model(str(path))
