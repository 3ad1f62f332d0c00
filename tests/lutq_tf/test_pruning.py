"""`erk_prune_overrides`: a model-wide prune rate spread over the layers."""

import keras
import numpy as np
import pytest

import lutq_tf


def test_erk_allocation_prunes_large_layers_more_and_keeps_the_overall_rate():
    # Densities are proportional to sum(shape) / prod(shape): the stem's
    # (1x1x3x2) exceeds 1, so it stays unpruned and the others share 50 %.
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1, name="stem"),
                              keras.layers.Conv2D(64, 3, name="big"),
                              keras.layers.Flatten(), keras.layers.Dense(10, name="fc")])
    rates = {name: o["prune_rate"] for name, o in
             lutq_tf.erk_prune_overrides(model, 0.5).items()}
    sizes = {"stem": 3 * 2, "big": 3 * 3 * 2 * 64, "fc": 6 * 6 * 64 * 10}
    assert set(rates) == set(sizes)
    assert sum(rates[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.5)
    assert rates["stem"] == 0.0
    big, fc = (1 - rates[n] for n in ("big", "fc"))
    assert big / fc == pytest.approx((3 + 3 + 2 + 64) / 1152 / ((2304 + 10) / 23040))



def test_erk_overrides_prune_each_layer_at_its_rate_in_quantize_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="small"),
                              keras.layers.Dense(400, name="wide"),
                              keras.layers.Dense(3, name="head")])
    overrides = lutq_tf.erk_prune_overrides(model, 0.5)
    q = lutq_tf.quantize_model(model, bits=2, overrides=overrides)
    zeros = {layer.name: np.mean(layer.quantized_tensors["kernel"][2] == 0)
             for layer in lutq_tf.lutq_layers(q)}
    # Each table prunes a whole number of weights ("small" holds 18).
    assert zeros == pytest.approx({n: o["prune_rate"] for n, o in overrides.items()}, abs=1 / 18)
    assert zeros["wide"] == pytest.approx(overrides["wide"]["prune_rate"], abs=1e-3)
    assert zeros["small"] < zeros["wide"]


@pytest.mark.parametrize("rate", [-0.1, 1.0, float("nan")])
def test_erk_rejects_a_rate_outside_0_1(rate):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"prune_rate must be a fraction in \[0, 1\)"):
        lutq_tf.erk_prune_overrides(model, rate)


@pytest.mark.parametrize("rate", ["0.5", None, True])
def test_erk_rejects_a_rate_that_is_not_a_number(rate):
    # "0.5" used to fail inside the comparison ("'<=' not supported ...").
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"erk_prune_overrides: prune_rate must be a fraction "
                                        r"in \[0, 1\), got .*\(" + type(rate).__name__):
        lutq_tf.erk_prune_overrides(model, rate)


def test_erk_rejects_what_is_not_a_built_keras_model():
    with pytest.raises(TypeError, match="erk_prune_overrides: `model` must be a Keras model.*str"):
        lutq_tf.erk_prune_overrides("model.keras", 0.5)
    unbuilt = keras.Sequential([keras.layers.Dense(2)], name="net")
    with pytest.raises(ValueError, match="model 'net' is not built.*keras.Input"):
        lutq_tf.erk_prune_overrides(unbuilt, 0.5)


def test_erk_without_quantisable_layers_says_which_are_supported():
    model = keras.Sequential([keras.Input((4,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="no layer LUT-Q quantises .*Dense"):
        lutq_tf.erk_prune_overrides(model, 0.5)


def test_erk_at_rate_0_prunes_nothing():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    assert lutq_tf.erk_prune_overrides(model, 0.0) == {"d": {"prune_rate": 0.0}}
