"""LUT-Q under Keras' training machinery: jit, optimizers, callbacks,
mixed precision, save / load / resume."""

import keras
import numpy as np
import pytest

import lutq_tf

L = keras.layers


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32") + (
        x[:, 0, 0, 0] > 0).astype("int32")
    return x, y


def _model():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Flatten()(x)
    x = L.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def _compile(model, optimizer="adam", **kwargs):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], **kwargs)


def _assert_lutq_state(model, k):
    """Q = d[A] with <= K values, and the k-means step ran last."""
    for layer in lutq_tf.lutq_layers(model):
        d, a, q = layer.quantized_tensors["kernel"]
        assert len(np.unique(q)) <= k
        np.testing.assert_array_equal(q, d.ravel()[a])
        w = layer.layer.kernel.numpy()
        constraint = layer.quantizer.constraint
        for entry in np.unique(a):
            mean = w[a == entry].astype(np.float64).mean()
            if isinstance(constraint, lutq_tf.constraints.Free):
                # d holds the means of the weights assigned to it.
                np.testing.assert_allclose(d.ravel()[entry], mean,
                                           rtol=1e-4, atol=1e-6)
            else:
                assert np.frexp(abs(d.ravel()[entry]))[0] in (0.0, 0.5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_and_without_xla(jit_compile):
    x, y = _data()
    model = lutq_tf.quantize_model(_model(), bits=2)
    _compile(model, jit_compile=jit_compile)
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    # The non-finite check rides in the step's logs; users never see it.
    assert sorted(history.history) == ["accuracy", "loss"]
    _assert_lutq_state(model, 4)
    stripped = lutq_tf.strip_model(model)
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               stripped.predict(x, verbose=0), atol=1e-5)
    _compile(stripped)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0),
                               stripped.evaluate(x, y, verbose=0),
                               rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw", "lion",
                                       "adagrad"])
def test_any_optimizer(optimizer):
    x, y = _data()
    model = lutq_tf.quantize_model(_model(), bits=3, constraint="pow2")
    _compile(model, optimizer=optimizer)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    _assert_lutq_state(model, 8)


def test_kmeans_every():
    x, y = _data(32)
    model = lutq_tf.quantize_model(_model(), bits=2, kmeans_every=3)
    before = {l.name: l.quantized_tensors["kernel"][2]
              for l in lutq_tf.lutq_layers(model)}
    _compile(model, optimizer=keras.optimizers.SGD(0.5))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # 2 steps
    for layer in lutq_tf.lutq_layers(model):
        np.testing.assert_array_equal(
            before[layer.name], layer.quantized_tensors["kernel"][2])
    model.fit(x[:16], y[:16], epochs=1, batch_size=16, verbose=0)  # step 3
    _assert_lutq_state(model, 4)
    assert any(not np.array_equal(before[l.name],
                                  l.quantized_tensors["kernel"][2])
               for l in lutq_tf.lutq_layers(model))


def test_callbacks_checkpoint_and_early_stopping(tmp_path):
    x, y = _data()
    model = lutq_tf.quantize_model(_model(), bits=2)
    _compile(model)
    path = str(tmp_path / "best.keras")
    history = model.fit(
        x, y, validation_data=(x, y), epochs=30, batch_size=16, verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(path),
            keras.callbacks.EarlyStopping(monitor="loss", patience=0,
                                          min_delta=10.0),
        ])
    assert len(history.history["loss"]) == 2  # stopped early
    restored = keras.saving.load_model(path)
    assert isinstance(restored, lutq_tf.LUTQModel)
    np.testing.assert_array_equal(restored.predict(x, verbose=0),
                                  model.predict(x, verbose=0))


def test_save_load_and_resume_as_if_uninterrupted(tmp_path):
    x, y = _data()
    model = lutq_tf.quantize_model(
        _model(), bits=2, overrides={"fc": {"prune_rate": 0.5,
                                            "per_channel": True}})
    _compile(model)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    assert isinstance(loaded, lutq_tf.LUTQModel)
    assert loaded.get_layer("fc").quantizer == model.get_layer("fc").quantizer
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    for m in (model, loaded):
        m.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_sequential_save_load(tmp_path):
    model = keras.Sequential([keras.Input((5,)), L.Dense(8, name="a"),
                              L.Dense(2, name="b")])
    quantized = lutq_tf.quantize_model(model, num_values=3,
                                       constraint="uniform")
    path = str(tmp_path / "s.keras")
    quantized.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, lutq_tf.LUTQSequential)
    x = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  quantized.predict(x, verbose=0))


def test_mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data()
    model = lutq_tf.quantize_model(_model(), bits=2)
    _compile(model)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for layer in lutq_tf.lutq_layers(model):
        state = layer.tensor_states[0]
        assert state.dictionary.dtype == "float32"
        assert state.quantized.dtype == "float32"
        assert state.variable.dtype == "float32"
    assert model.predict(x, verbose=0).dtype == np.float16
    _assert_lutq_state(model, 4)
    stripped = lutq_tf.strip_model(model)
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  stripped.predict(x, verbose=0))


def test_nan_with_kmeans_every_is_caught_when_fit_ends():
    # The per-step check rides on the k-means step; with kmeans_every > 1
    # fit still ends with an error, not a model whose W is NaN.
    x, y = _data(32)
    model = lutq_tf.quantize_model(_model(), bits=2, kmeans_every=100)
    _compile(model)
    kernel = model.get_layer("fc").layer.kernel
    kernel.assign(np.where(np.arange(kernel.shape[1]) == 0, np.nan,
                           kernel.numpy()).astype("float32"))
    with pytest.raises(lutq_tf.NonFiniteWeightsError, match="'fc'.*NaN"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)


def test_huge_kernel_is_a_clear_error():
    # |W| ~ 1e37: each weight is finite, their cluster sums overflow.
    model = keras.Sequential([keras.Input((64,)), L.Dense(64, name="big")])
    kernel = model.layers[0].kernel
    kernel.assign(np.sign(kernel.numpy()) * 1e37)
    with pytest.raises(ValueError, match="'big'.*overflow float32"):
        lutq_tf.quantize_model(model, bits=2)


def test_overflow_during_training_is_named_as_such():
    x, y = _data(32)
    model = lutq_tf.quantize_model(_model(), bits=2)
    _compile(model)
    kernel = model.get_layer("fc").layer.kernel
    kernel.assign(np.full(kernel.shape, 3e36, "float32"))
    with pytest.raises(lutq_tf.NonFiniteWeightsError,
                       match="'fc'.*overflow float32"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
