"""`per_channel=True` on layers whose output channels hold fewer than K weights.

A 3x3 DepthwiseConv2D has 9 weights per channel, fewer than the 16 entries
of a 4-bit dictionary. `quantize_model` gives such a layer one dictionary per
tensor (whatever the constraint), says so in one warning and in `summary`,
and the result exports bit-exact. The MLPerf Tiny models in `../shared`
(DS-CNN, VWW's MobileNet) are checked when present, skipped otherwise.
"""

import os
import warnings

import keras
import numpy as np
import paths
import pytest

import lutq_tf
import tflite_export

L = keras.layers
SHARED_MODELS = os.path.join(paths.SHARED, "models")
FALLBACK_MARK = "tensor (channels < K)"


def _tiny_model():
    """conv: 36 weights per channel; dw (3x3 depthwise): 9; fc: 64."""
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(64, 3, name="conv")(inputs)
    x = L.DepthwiseConv2D(3, name="dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="fc")(x))


def _quantize(model, **options):
    """`(LUT-Q model, messages of the warnings quantize_model gave)`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = lutq_tf.quantize_model(model, **options)
    return quantized, [str(w.message) for w in caught
                       if issubclass(w.category, UserWarning)]


def _fallback_warnings(messages):
    return [m for m in messages if "fewer weights than" in m]


def _is_power_of_two_or_zero(values):
    nonzero = np.abs(values[values != 0]).astype(np.float64)
    return np.array_equal(np.exp2(np.round(np.log2(nonzero))), nonzero)


@pytest.mark.slow
@pytest.mark.parametrize("constraint", ["none", "pow2"])
def test_depthwise_gets_per_tensor_dictionary_and_exports_bit_exact(
        tmp_path, constraint):
    model = _tiny_model()
    quantized, messages = _quantize(model, bits=4, per_channel=True,
                                    constraint=constraint)
    (message,) = _fallback_warnings(messages)
    assert "'dw' (`kernel`: 9 weights per channel, K=16)" in message
    assert "'conv'" not in message and "'fc'" not in message

    modes = {layer.name: layer.quantizer for layer in
             lutq_tf.lutq_layers(quantized)}
    assert not modes["dw"].per_channel and modes["dw"].per_channel_fallback
    assert modes["conv"].per_channel and modes["fc"].per_channel
    assert not modes["conv"].per_channel_fallback

    printed = []
    rows = {r.layer: r for r in lutq_tf.summary(quantized,
                                                print_fn=printed.append)}
    assert rows["dw"].mode == "tensor" and rows["dw"].per_channel_fallback
    assert rows["conv"].mode == "channel"
    assert not rows["conv"].per_channel_fallback
    lines = {line.split()[0]: line for line in printed[0].splitlines()[2:]}
    assert FALLBACK_MARK in lines["dw"]
    assert FALLBACK_MARK not in lines["conv"]

    # One dictionary for the whole depthwise kernel: at most K values.
    kernel = quantized.get_layer("dw").quantized_tensors["kernel"][2]
    assert len(np.unique(kernel)) <= 16
    if constraint == "pow2":
        assert _is_power_of_two_or_zero(kernel)

    x = np.random.default_rng(0).normal(size=(32, 8, 8, 4)).astype(
        np.float32)
    # Shared tables forced: "auto" drops them when random inputs flip a
    # near tie against Keras. Verification (bit-exact against the
    # uncompressed twin) is the exporter's default either way.
    result = tflite_export.export(
        quantized, str(tmp_path / "tiny.tflite"), representative_data=x,
        shared_tables=True)
    assert result.verification.bit_exact
    dw = {t.layer: t for t in result.tensors}["dw"]
    assert dw.compressed and dw.table_mode.startswith("shared")
    assert dw.tables == 1 and dw.codes <= 16


def test_no_warning_when_every_channel_holds_k_weights():
    # At K=8 the depthwise channels (9 weights) hold a dictionary each.
    quantized, messages = _quantize(_tiny_model(), bits=3, per_channel=True)
    assert _fallback_warnings(messages) == []
    assert quantized.get_layer("dw").quantizer.per_channel
    rows = lutq_tf.summary(quantized, print_fn=None)
    assert not any(r.per_channel_fallback for r in rows)


def test_override_asking_per_channel_falls_back_too():
    # Per tensor by default; the override asks per channel for dw only.
    quantized, messages = _quantize(
        _tiny_model(), bits=4, overrides={"dw": {"per_channel": True}})
    (message,) = _fallback_warnings(messages)
    assert "'dw'" in message
    quantizer = quantized.get_layer("dw").quantizer
    assert not quantizer.per_channel and quantizer.per_channel_fallback
    assert not quantized.get_layer("conv").quantizer.per_channel_fallback


def test_a_tensor_smaller_than_k_is_still_refused_clearly():
    # Depthwise on one input channel: 9 weights in all, so per tensor would
    # not fit either: a refusal, and no warning promising a fallback.
    inputs = keras.Input((6, 6, 1))
    x = L.DepthwiseConv2D(3, name="dw1")(inputs)
    model = keras.Model(inputs, L.Flatten()(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"'dw1'.*K=16.*9 weights"):
            lutq_tf.quantize_model(model, bits=4, per_channel=True)
    assert _fallback_warnings([str(w.message) for w in caught]) == []


def test_fallback_flag_config_round_trip_and_checks():
    quantizer = lutq_tf.LUTQuantizer(bits=4, per_channel_fallback=True)
    config = quantizer.get_config()
    assert config["per_channel_fallback"] is True
    assert lutq_tf.LUTQuantizer.from_config(config) == quantizer
    assert "per_channel_fallback=True" in repr(quantizer)
    del config["per_channel_fallback"]  # saved before the option existed
    assert not lutq_tf.LUTQuantizer.from_config(config).per_channel_fallback
    # A derived quantizer is not a fallback unless asked again.
    assert not quantizer.with_options(bits=2).per_channel_fallback
    for options in ({"per_channel": True}, {"channel_scales": True}):
        with pytest.raises(ValueError, match="per_channel_fallback"):
            lutq_tf.LUTQuantizer(bits=4, per_channel_fallback=True, **options)
    with pytest.raises(TypeError, match="per_channel_fallback"):
        lutq_tf.LUTQuantizer(bits=4, per_channel_fallback="yes")


@pytest.mark.slow
def test_summary_mark_survives_save_and_load(tmp_path):
    quantized, _ = _quantize(_tiny_model(), bits=4, per_channel=True)
    path = str(tmp_path / "tiny.keras")
    quantized.save(path)
    rows = {r.layer: r for r in lutq_tf.summary(lutq_tf.load_model(path),
                                                print_fn=None)}
    assert rows["dw"].per_channel_fallback
    assert not rows["conv"].per_channel_fallback


# -- MLPerf Tiny models (../shared/models; skipped when absent) -------------


def _shared_model(filename):
    path = os.path.join(SHARED_MODELS, filename)
    if not os.path.isfile(path):
        pytest.skip(f"{path} absent")
    return lutq_tf.load_model(path)


def _check_recipe(model, quantized, messages):
    """Exactly the layers with channels smaller than K fell back, once."""
    (message,) = _fallback_warnings(messages)
    fallen = set()
    for layer in lutq_tf.lutq_layers(quantized):
        if layer.quantizer.per_channel_fallback:
            fallen.add(layer.name)
            assert f"'{layer.name}' (" in message
        else:
            assert layer.quantizer.per_channel
    depthwise = {layer.name for layer in model.layers
                 if isinstance(layer, L.DepthwiseConv2D)}
    assert depthwise and depthwise <= fallen
    return fallen


@pytest.mark.slow
def test_ds_cnn_readme_recipe_runs_and_exports(tmp_path):
    model = _shared_model("mlperf_tiny_kws_ds_cnn.h5")
    quantized, messages = _quantize(model, bits=4, per_channel=True)
    fallen = _check_recipe(model, quantized, messages)
    assert len(fallen) == 4  # its four 3x3 depthwise layers
    x = np.random.default_rng(0).normal(
        size=(16, *model.input_shape[1:])).astype(np.float32)
    result = tflite_export.export(quantized, str(tmp_path / "ds_cnn.tflite"),
                                  representative_data=x, shared_tables=True)
    assert result.verification.bit_exact
    assert all(t.compressed for t in result.tensors if t.layer in fallen)


@pytest.mark.extended
def test_ds_cnn_pow2_per_channel_runs():
    """Heavy variant of `test_depthwise_gets_per_tensor_dictionary_and_...`
    (pow2): DS-CNN pow2 per channel."""
    model = _shared_model("mlperf_tiny_kws_ds_cnn.h5")
    quantized, messages = _quantize(model, bits=4, per_channel=True,
                                    constraint="pow2")
    _check_recipe(model, quantized, messages)


@pytest.mark.slow
def test_vww_readme_recipe_runs():
    model = _shared_model("mlperf_tiny_vww_96.h5")
    quantized, messages = _quantize(model, bits=4, per_channel=True)
    _check_recipe(model, quantized, messages)


@pytest.mark.extended
def test_vww_pow2_per_channel_exports(tmp_path):
    """Heavy variant of `test_depthwise_gets_per_tensor_dictionary_and_...`
    (pow2) and `test_vww_readme_recipe_runs`: VWW pow2 per channel, exported."""
    model = _shared_model("mlperf_tiny_vww_96.h5")
    quantized, messages = _quantize(model, bits=4, per_channel=True,
                                    constraint="pow2")
    fallen = _check_recipe(model, quantized, messages)
    x = np.random.default_rng(0).uniform(
        size=(16, *model.input_shape[1:])).astype(np.float32)
    result = tflite_export.export(quantized, str(tmp_path / "vww.tflite"),
                                  representative_data=x, shared_tables=True)
    assert result.verification.bit_exact
    assert any(t.compressed for t in result.tensors if t.layer in fallen)
