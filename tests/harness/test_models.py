"""Tests of experiments/models.py: shapes, parameter counts, ResNet-8 weights."""

import os

import keras
import numpy as np
import paths
import pytest

from experiments import models

RESNET8_H5 = os.path.join(paths.SHARED, "models",
    "mlperf_tiny_resnet8.h5",
)
needs_h5 = pytest.mark.skipif(
    not os.path.isfile(RESNET8_H5),
    reason="../shared/models/mlperf_tiny_resnet8.h5 is not available",
)

# Layer types the TFLite int8 converter maps to TFLM builtins.
ALLOWED_LAYERS = {
    "InputLayer",
    "Conv2D",
    "DepthwiseConv2D",
    "Dense",
    "BatchNormalization",
    "ReLU",
    "Activation",
    "Add",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "Flatten",
    "Softmax",
}


@pytest.mark.parametrize(
    "builder, kwargs, in_shape, params",
    [
        (models.digits_cnn, {}, (8, 8, 1), 23_946),
        (models.lenet, {}, (28, 28, 1), 431_080),
        (models.mlp, {}, (784,), 669_706),
        (models.mlp, {"input_dim": (28, 28, 1)}, (28, 28, 1), 669_706),
        (models.mlp, {"input_dim": 64, "hidden": (32,)}, (64,), 2410),
        (models.resnet8, {}, (32, 32, 3), 78_666),
    ],
)
def test_shapes_and_params(builder, kwargs, in_shape, params):
    model = builder(**kwargs)
    assert isinstance(model, keras.Model)
    assert tuple(model.input_shape[1:]) == in_shape
    assert tuple(model.output_shape) == (None, 10)
    assert model.count_params() == params
    assert {type(l).__name__ for l in model.layers} <= ALLOWED_LAYERS
    x = np.random.default_rng(0).random((2,) + in_shape, dtype=np.float32)
    y = np.asarray(model(x))
    assert y.shape == (2, 10)
    # Default classifier is a softmax: rows are probability vectors.
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)


def test_num_classes_and_logits():
    model = models.digits_cnn(num_classes=3, classifier_activation=None)
    assert model.output_shape == (None, 3)
    y = np.asarray(model(np.ones((4, 8, 8, 1), np.float32)))
    assert not np.allclose(y.sum(axis=1), 1.0)
    assert models.lenet(num_classes=5).output_shape == (None, 5)


def test_resnet8_structure():
    model = models.resnet8()
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 78_186  # plus 480 BN moving statistics
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 9  # stem + 3 x 2 + two 1x1 shortcuts
    assert sorted(c.kernel_size for c in convs).count((1, 1)) == 2
    assert all(c.kernel_regularizer is not None for c in convs)
    assert len([l for l in model.layers if isinstance(l, keras.layers.Add)]) == 3
    # L2 on the 9 conv kernels only.
    assert len(model.losses) == 9


def test_transfer_weights_rejects_other_architecture():
    with pytest.raises(ValueError, match="layers with weights"):
        models.transfer_weights(models.resnet8(), models.digits_cnn())
    target = models.digits_cnn()
    before = [w.copy() for w in target.get_weights()]
    # Same number of layers with weights, different shapes: nothing copied.
    with pytest.raises(ValueError, match="Layer mismatch"):
        models.transfer_weights(models.lenet(), target)
    for w0, w1 in zip(before, target.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_transfer_weights_copies():
    keras.utils.set_random_seed(1)
    a = models.digits_cnn()
    keras.utils.set_random_seed(2)
    b = models.digits_cnn()
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    assert not np.allclose(a(x), b(x))
    models.transfer_weights(a, b)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_load_pretrained_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        models.load_pretrained_resnet8(tmp_path / "nope.h5")


@needs_h5
def test_pretrained_resnet8_matches_h5():
    reference = keras.models.load_model(RESNET8_H5, compile=False)
    assert reference.count_params() == 78_666
    rng = np.random.default_rng(0)
    x01 = rng.random((8, 32, 32, 3), dtype=np.float32)
    # The reference was trained on [0, 255] pixels.
    expected = reference.predict(255.0 * x01, verbose=0)
    assert expected.std(axis=0).max() > 1e-2  # not a constant output

    # Same layers, weights copied verbatim: identical on identical inputs
    # (BN moving statistics included, since predict runs in inference mode).
    raw = models.load_pretrained_resnet8(RESNET8_H5, rescale_inputs=False)
    assert raw.name == "resnet8"
    assert raw.count_params() == reference.count_params()
    np.testing.assert_array_equal(raw.predict(255.0 * x01, verbose=0), expected)

    # Default: x255 folded into the stem kernel, takes [0, 1] images.
    ours = models.load_pretrained_resnet8(RESNET8_H5)
    np.testing.assert_allclose(
        ours.predict(x01, verbose=0), expected, rtol=1e-4, atol=1e-5
    )
    # ... with the same L2 penalty as the reference.
    np.testing.assert_allclose(
        float(sum(ours.losses)), float(sum(reference.losses)), rtol=1e-5
    )

    as_loaded = models.load_pretrained_resnet8(RESNET8_H5, rebuild=False)
    assert [l.name for l in as_loaded.layers] == [l.name for l in reference.layers]


@pytest.mark.parametrize(
    "builder", [models.digits_cnn, models.lenet, models.mlp, models.resnet8]
)
def test_fixed_batch_twin_shares_weights(builder):
    # batch_size=1 builds the static-shape twin used for TFLite export.
    trained = builder()
    static = builder(batch_size=1)
    assert static.input_shape[0] == 1 and trained.input_shape[0] is None
    models.transfer_weights(trained, static)
    shape = (1,) + tuple(trained.input_shape[1:])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(static(x)), np.asarray(trained(x)), rtol=1e-6
    )
