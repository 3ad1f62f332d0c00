"""`lutq_tf.reestimate_batchnorm`: BN statistics for the quantised weights."""

import keras
import numpy as np
import pytest

import lutq_tf


def _model():
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, name="fc")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.ReLU()(h))
    return keras.Model(inp, out)


def test_moving_statistics_become_the_average_batch_statistics_of_the_lutq_model():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(96, 8)).astype(np.float32)
    q = lutq_tf.quantize_model(_model(), bits=2)
    bn = q.get_layer("bn")
    momentum = bn.momentum
    assert lutq_tf.reestimate_batchnorm(q, x, batch_size=32) == ["bn"]
    # BN's input: the LUT-Q layer's output, which computes with d[A].
    fc = lutq_tf.strip_model(q).get_layer("fc")
    batches = [np.asarray(fc(x[i:i + 32])) for i in range(0, 96, 32)]
    np.testing.assert_allclose(bn.moving_mean.numpy(),
                               np.mean([b.mean(0) for b in batches], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.mean([b.var(0) for b in batches], 0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == momentum
    # Only the statistics moved: d[A] and the predictions' inputs are as before.
    np.testing.assert_array_equal(np.asarray(fc(x[:32])), batches[0])


def test_too_little_data_is_named():
    with pytest.raises(ValueError, match="4 samples.*batch_size=64"):
        lutq_tf.reestimate_batchnorm(_model(), np.zeros((4, 8), np.float32))
