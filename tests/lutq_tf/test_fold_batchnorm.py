"""`lutq_tf.fold_batchnorm`: batch norms folded into the Dense / Conv2D /
DepthwiseConv2D before them, exactly (inference outputs unchanged)."""

import os
import warnings

import keras
import numpy as np
import pytest

import lutq_tf

AD_PATH = "/work/shared/models/mlperf_tiny_ad01.h5"


def randomize_batchnorms(model, seed=0):
    """Gives every batch norm non-trivial statistics, scale and offset."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            weights = layer.get_weights()
            shape = weights[0].shape
            values = {
                "gamma": rng.uniform(0.5, 2.0, shape),
                "beta": rng.normal(size=shape),
                "moving_mean": rng.normal(size=shape),
                "moving_variance": rng.uniform(0.1, 3.0, shape),
            }
            layer.set_weights([values[w.name] for w in layer.weights])


def assert_same_outputs(model, folded, shape, seed=1):
    x = np.random.default_rng(seed).normal(size=(4,) + shape)
    x = x.astype(np.float32)
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(folded(x, training=False)),
                               expected, rtol=1e-5, atol=1e-5)


def batchnorms(model):
    return [layer.name for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def test_fold_sequential_dense_batchnorm_relu():
    # The AD autoencoder's block, Dense -> BN -> ReLU, with and without
    # bias, scale and offset.
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(8, name="d0"),
        keras.layers.BatchNormalization(name="bn0"),
        keras.layers.ReLU(),
        keras.layers.Dense(6, use_bias=False, name="d1"),
        keras.layers.BatchNormalization(center=False, scale=False,
                                        epsilon=0.01, name="bn1"),
        keras.layers.ReLU(),
        keras.layers.Dense(3, name="head"),
    ])
    randomize_batchnorms(model)
    folded_model, folded = lutq_tf.fold_batchnorm(model)
    assert folded == {"d0": "bn0", "d1": "bn1"}
    assert batchnorms(folded_model) == []
    assert isinstance(folded_model, keras.Sequential)
    assert folded_model.get_layer("d1").use_bias
    assert_same_outputs(model, folded_model, (10,))
    # Layers not followed by a batch norm are untouched; the original too.
    head, original = folded_model.get_layer("head"), model.get_layer("head")
    for a, b in zip(head.get_weights(), original.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert batchnorms(model) == ["bn0", "bn1"]


def test_fold_functional_keeps_what_cannot_fold():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn_conv")(x)  # folds
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn_dw")(x)  # folds
    y = keras.layers.Conv2D(8, 1, name="shared_out")(x)
    z = keras.layers.BatchNormalization(name="bn_shared")(y)  # y used twice
    x = keras.layers.Add(name="add")([y, z])
    x = keras.layers.BatchNormalization(name="bn_add")(x)  # after an Add
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5, activation="relu", name="relu_dense")(x)
    x = keras.layers.BatchNormalization(name="bn_relu")(x)  # after a ReLU
    x = keras.layers.Dense(3, name="last")(x)
    outputs = keras.layers.BatchNormalization(name="bn_out")(x)  # folds
    model = keras.Model(inputs, outputs)
    randomize_batchnorms(model)
    with pytest.warns(UserWarning, match="keeps 3 batch norm") as record:
        folded_model, folded = lutq_tf.fold_batchnorm(model)
    message = str(record[0].message)
    assert "'bn_shared' (after 'shared_out', whose output is also used" in (
        message)
    assert "'bn_add' (after 'add' (Add)" in message
    assert "'bn_relu' (after 'relu_dense', whose activation is not linear" in (
        message)
    assert folded == {"conv": "bn_conv", "dw": "bn_dw", "last": "bn_out"}
    assert batchnorms(folded_model) == ["bn_shared", "bn_add", "bn_relu"]
    assert folded_model.output.shape == model.output.shape
    assert_same_outputs(model, folded_model, (8, 8, 3))


def test_fold_without_batchnorms_is_a_plain_copy():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded_model, folded = lutq_tf.fold_batchnorm(model)
    assert folded == {}
    assert folded_model is not model
    assert_same_outputs(model, folded_model, (4,))


def test_fold_sequential_keeps_a_leading_batchnorm():
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.BatchNormalization(name="bn_in"),
        keras.layers.Dense(3, name="d"),
        keras.layers.BatchNormalization(name="bn_d"),
    ])
    randomize_batchnorms(model)
    with pytest.warns(UserWarning, match="'bn_in' \\(the first layer\\)"):
        folded_model, folded = lutq_tf.fold_batchnorm(model)
    assert folded == {"d": "bn_d"}
    assert batchnorms(folded_model) == ["bn_in"]
    assert_same_outputs(model, folded_model, (4,))


def test_fold_refuses_quantised_and_subclassed_models():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])
    quantized = lutq_tf.quantize_model(model, bits=2)
    with pytest.raises(ValueError, match="LUT-Q quantised; fold the float"):
        lutq_tf.fold_batchnorm(quantized)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="neither Sequential nor Functional"):
        lutq_tf.fold_batchnorm(subclassed)
    with pytest.raises(TypeError, match="takes a Keras model"):
        lutq_tf.fold_batchnorm("model.h5")


@pytest.mark.skipif(not os.path.exists(AD_PATH),
                    reason=f"{AD_PATH} (MLPerf Tiny AD) is absent")
def test_fold_mlperf_anomaly_detection_autoencoder():
    model = lutq_tf.load_model(AD_PATH)
    folded_model, folded = lutq_tf.fold_batchnorm(model)
    assert len(folded) == 9 and batchnorms(folded_model) == []
    x = np.random.default_rng(0).normal(size=(8, 640)).astype(np.float32)
    # One forward pass; a list, as the model's config names its input.
    expected = np.asarray(model([x], training=False))
    np.testing.assert_allclose(np.asarray(folded_model([x], training=False)),
                               expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
