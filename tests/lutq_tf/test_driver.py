"""The k-means step never silently stops: LUT-Q layers trained outside a
`LUTQModelMixin` model (plain Sequential, subclassed model, `clone_model`
copy, GradientTape loop) run it themselves and follow `fit`'s trajectory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import lutq_tf

L = keras.layers
STEPS = 6


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int32") + (x[:, 4] > 0)
    return x, y.astype("int32")


def _float_model():
    return keras.Sequential([keras.Input((12,)),
                             L.Dense(16, activation="relu", name="a"),
                             L.Dense(3, name="b")])


def _reference(kmeans_every=1):
    """A `quantize_model` LUT-Q model (the mixin drives the k-means)."""
    keras.utils.set_random_seed(0)
    return lutq_tf.quantize_model(_float_model(), bits=2,
                                  kmeans_every=kmeans_every)


def _compile(model):
    model.compile(optimizer=keras.optimizers.SGD(0.3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))


def _fit(model, x, y):
    _compile(model)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)


def _snapshot(model):
    """Per LUT-Q layer: its layer's weights and each tensor's (d, A, Q)."""
    return [(wrapper.layer.get_weights(),
             [tuple(getattr(s, name).numpy()
                    for name in ("dictionary", "assignment", "quantized"))
              for s in wrapper.tensor_states])
            for wrapper in lutq_tf.lutq_layers(model)]


def _load_snapshot(snapshot, model):
    """`model`'s W, d, A, Q := the snapshot's, layer by layer."""
    wrappers = lutq_tf.lutq_layers(model)
    assert len(wrappers) == len(snapshot)
    for (weights, tensors), wrapper in zip(snapshot, wrappers):
        wrapper.layer.set_weights(weights)
        for values, state in zip(tensors, wrapper.tensor_states):
            for name, value in zip(("dictionary", "assignment", "quantized"),
                                   values):
                getattr(state, name).assign(value)


@pytest.fixture(scope="module")
def references():
    """`references(kmeans_every)`: the reference's state before and after
    `_fit` (snapshots), trained once per module and value: every test
    starts its model from the same state and compares it with the same
    trajectory."""
    done = {}

    def get(kmeans_every=1):
        if kmeans_every not in done:
            x, y = _data()
            model = _reference(kmeans_every)
            before = _snapshot(model)
            _fit(model, x, y)
            done[kmeans_every] = before, _snapshot(model)
        return done[kmeans_every]

    return get


def _assert_same_training(trained, model):
    """`model` trained its own way matches the reference trained by fit
    (`trained`: its snapshot after `_fit`)."""
    initial = [l.quantized_tensors["kernel"][0].copy()
               for l in lutq_tf.lutq_layers(model)]
    # The self-driven step folds the last update in at the next training
    # call; kmeans_step() does it now.
    for layer in lutq_tf.lutq_layers(model):
        layer.kmeans_step()
    for (ref_weights, ref_tensors), got, d0 in zip(
            trained, lutq_tf.lutq_layers(model), initial):
        d_ref, a_ref, _ = ref_tensors[0]  # the kernel, a Dense's only one
        d, a, q = got.quantized_tensors["kernel"]
        assert not np.array_equal(d, d0)  # the k-means step ran
        np.testing.assert_array_equal(q, d.ravel()[a])
        np.testing.assert_allclose(got.layer.kernel.numpy(), ref_weights[0],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
        assert np.mean(a == a_ref) >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("kmeans_every", [1, 2])
def test_wrapper_in_plain_sequential(references, kmeans_every):
    x, y = _data()
    initial, trained = references(kmeans_every)
    model = keras.Sequential(
        [keras.Input((12,))]
        + [lutq_tf.LUTQWrapper(L.Dense(16, activation="relu", name="a"),
                               lutq_tf.LUTQuantizer(
                                   bits=2, kmeans_every=kmeans_every)),
           lutq_tf.LUTQWrapper(L.Dense(3, name="b"), lutq_tf.LUTQuantizer(
               bits=2, kmeans_every=kmeans_every))])
    _load_snapshot(initial, model)
    _fit(model, x, y)
    _assert_same_training(trained, model)


def test_clone_model_of_lutq_sequential(references):
    x, y = _data()
    initial, trained = references()
    clone = keras.models.clone_model(_reference())
    assert not isinstance(clone, lutq_tf.LUTQModelMixin)  # Keras' choice
    _load_snapshot(initial, clone)
    _fit(clone, x, y)
    _assert_same_training(trained, clone)


class SubclassedNet(keras.Model):
    """A subclassed model without LUTQModelMixin."""

    def __init__(self):
        super().__init__()
        self.a = lutq_tf.LUTQWrapper(L.Dense(16, activation="relu", name="a"),
                                     lutq_tf.LUTQuantizer(bits=2))
        self.b = lutq_tf.LUTQWrapper(L.Dense(3, name="b"),
                                     lutq_tf.LUTQuantizer(bits=2))

    def call(self, x):
        return self.b(self.a(x))


def test_subclassed_model_without_mixin(references):
    x, y = _data()
    initial, trained = references()
    model = SubclassedNet()
    model(x[:1])
    _load_snapshot(initial, model)
    _fit(model, x, y)
    _assert_same_training(trained, model)


@pytest.mark.parametrize("graph", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_gradient_tape_loop(references, graph):
    x, y = _data()
    initial, trained = references()
    model = _reference()  # a LUT-Q model, but trained by hand
    _load_snapshot(initial, model)
    optimizer = keras.optimizers.SGD(0.3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    if graph:
        step = tf.function(step)
    for i in range(0, len(x), 16):
        step(x[i:i + 16], y[i:i + 16])
    _assert_same_training(trained, model)


def test_inference_calls_do_not_step():
    x, _ = _data()
    model = keras.Sequential([keras.Input((12,)), lutq_tf.LUTQWrapper(
        L.Dense(3, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    layer = model.layers[0]
    model(x)  # the first use fits d and A to W
    layer.layer.kernel.assign(layer.layer.kernel * 3.0)
    before = layer.quantized_tensors["kernel"][0]
    model.predict(x, verbose=0)
    model(x, training=False)
    model(x)
    np.testing.assert_array_equal(layer.quantized_tensors["kernel"][0],
                                  before)
    model(x, training=True)  # call 0: W as fitted at first use, no refit
    np.testing.assert_array_equal(layer.quantized_tensors["kernel"][0],
                                  before)
    model(x, training=True)  # call 1: refits to the scaled W
    d, a, _ = layer.quantized_tensors["kernel"]
    w = layer.layer.kernel.numpy()
    assert not np.array_equal(d, before)
    for entry in np.unique(a):  # d holds the means of the assigned weights
        np.testing.assert_allclose(d[entry, 0], w[a == entry].mean(),
                                   rtol=1e-5)


def test_self_driven_nan_fails_the_training_call():
    x, _ = _data()
    model = keras.Sequential([keras.Input((12,)), lutq_tf.LUTQWrapper(
        L.Dense(3, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    layer = model.layers[0]
    model(x, training=True)
    kernel = layer.layer.kernel.numpy()
    kernel[0, 0] = np.nan
    layer.layer.kernel.assign(kernel)
    d = layer.quantized_tensors["kernel"][0]
    with pytest.raises(tf.errors.InvalidArgumentError, match="'b'.*NaN"):
        model(x, training=True)
    np.testing.assert_array_equal(layer.quantized_tensors["kernel"][0], d)
    assert bool(layer.nonfinite_flag.numpy())
    assert np.isnan(layer.quantized_tensors["kernel"][2]).all()


def test_self_driven_nan_under_xla_shows_in_the_loss():
    # XLA drops asserts; the NaN forward pass shows in the loss instead.
    x, y = _data(32)
    x[3, 0] = np.nan
    model = keras.Sequential([keras.Input((12,)), lutq_tf.LUTQWrapper(
        L.Dense(3, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    model.compile(optimizer="sgd", jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    d = model.layers[0].quantized_tensors["kernel"][0]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        shuffle=False)
    assert np.isnan(history.history["loss"][-1])
    assert bool(model.layers[0].nonfinite_flag.numpy())
    np.testing.assert_array_equal(model.layers[0].quantized_tensors[
        "kernel"][0], d)


def _training_calls(layer):
    """The wrapper's counter of training calls (a variable, not saved)."""
    return next(v for v in layer.weights if v.name == "training_calls")


def test_training_call_counter_is_not_saved(tmp_path):
    x, y = _data()
    model = _reference()
    _fit(model, x, y)
    for layer in lutq_tf.lutq_layers(model):
        _training_calls(layer).assign(5)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    again = _reference()
    again.load_weights(path)
    for a, b in zip(lutq_tf.lutq_layers(model), lutq_tf.lutq_layers(again)):
        assert int(_training_calls(b).numpy()) == 0
        for va, vb in zip(a.tensor_states[0].__dict__.values(),
                          b.tensor_states[0].__dict__.values()):
            if isinstance(va, keras.Variable):
                np.testing.assert_array_equal(va.numpy(), vb.numpy())
