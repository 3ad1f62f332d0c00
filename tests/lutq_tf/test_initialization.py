"""One initialisation path: building fits nothing, `quantize_model` fits
once, loading restores the saved state exactly, and a hand-built wrapper
fits at its first use."""

import keras
import numpy as np
import pytest

import lutq_tf

L = keras.layers


def _float_model():
    return keras.Sequential([keras.Input((6,)), L.Dense(8, name="a"),
                             L.Dense(3, name="b")])


def _variable(layer, name):
    """The wrapper's variable `name` (read without a use: no fit)."""
    return next(v for v in layer.weights if v.name == name)


def _x():
    return np.random.default_rng(0).normal(size=(4, 6)).astype("float32")


@pytest.fixture
def fits(monkeypatch):
    """The names of the layers `initialize` ran for, in order."""
    calls = []
    original = lutq_tf.LUTQWrapper.initialize

    def counted(self):
        calls.append(self.name)
        return original(self)

    monkeypatch.setattr(lutq_tf.LUTQWrapper, "initialize", counted)
    return calls


def test_quantize_model_fits_each_layer_once(fits):
    model = _float_model()
    quantized = lutq_tf.quantize_model(model, bits=2)
    assert fits == ["a", "b"]
    quantized(_x())
    assert fits == ["a", "b"]  # no refit at first use
    # Fitted to the copied float weights, not the clone's random ones.
    for layer in lutq_tf.lutq_layers(quantized):
        d, a, _ = layer.quantized_tensors["kernel"]
        w = model.get_layer(layer.name).kernel.numpy()
        for entry in np.unique(a):
            np.testing.assert_allclose(d[entry, 0], w[a == entry].mean(),
                                       rtol=1e-5)


def test_building_a_wrapper_fits_nothing(fits):
    wrapper = lutq_tf.LUTQWrapper(L.Dense(3), lutq_tf.LUTQuantizer(bits=2))
    wrapper.build((None, 6))
    assert fits == []
    # The variable, not `tensor_states`: reading those is a use, which fits.
    assert not np.any(_variable(wrapper, "kernel_dictionary").numpy())
    assert np.any(wrapper.tensor_states[0].dictionary.numpy())
    assert fits == [wrapper.name]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_loading_restores_the_state_without_kmeans(tmp_path, fits, suffix):
    quantized = lutq_tf.quantize_model(_float_model(), bits=2)
    # W moved since the last k-means step (as with kmeans_every > 1 or
    # frozen dictionaries): a refit would change d and A.
    for layer in lutq_tf.lutq_layers(quantized):
        kernel = layer.layer.kernel
        kernel.assign(kernel * 1.7 + 0.05)
    saved = {layer.name: layer.quantized_tensors["kernel"]
             for layer in lutq_tf.lutq_layers(quantized)}
    path = str(tmp_path / f"m{suffix}")
    quantized.save(path)
    del fits[:]
    for loaded in (lutq_tf.load_model(path),
                   keras.models.load_model(path, compile=False)):
        np.testing.assert_array_equal(loaded(_x()).numpy(),
                                      quantized(_x()).numpy())
        for layer in lutq_tf.lutq_layers(loaded):
            for got, want in zip(layer.quantized_tensors["kernel"],
                                 saved[layer.name]):
                np.testing.assert_array_equal(got, want)
    assert fits == []


def test_hand_built_wrapper_fits_at_first_use(fits):
    model = keras.Sequential([keras.Input((6,)), lutq_tf.LUTQWrapper(
        L.Dense(3, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    layer = model.layers[0]
    assert fits == []  # built by Sequential: nothing fitted yet
    layer.layer.kernel.assign(layer.layer.kernel * 3.0)
    model(_x())
    assert fits == ["b"]
    d, a, q = layer.quantized_tensors["kernel"]
    w = layer.layer.kernel.numpy()  # the scaled W, as of the first use
    np.testing.assert_array_equal(q, d.ravel()[a])
    for entry in np.unique(a):
        np.testing.assert_allclose(d[entry, 0], w[a == entry].mean(),
                                   rtol=1e-5)
    model(_x())
    assert fits == ["b"]


def test_state_set_before_first_use_is_kept(fits):
    model = keras.Sequential([keras.Input((6,)), lutq_tf.LUTQWrapper(
        L.Dense(3, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    layer = model.layers[0]
    # The variables, not `tensor_states`: reading those would fit.
    dictionary = np.array([[-1.0], [-0.5], [0.5], [1.0]], "float32")
    assignment = np.zeros(_variable(layer, "kernel_assignment").shape, "uint8")
    assignment[0] = 3
    _variable(layer, "kernel_dictionary").assign(dictionary)
    _variable(layer, "kernel_assignment").assign(assignment)
    _variable(layer, "kernel_quantized").assign(dictionary.ravel()[assignment])
    model(_x())
    assert fits == []
    d, a, _ = layer.quantized_tensors["kernel"]
    np.testing.assert_array_equal(d, dictionary)
    np.testing.assert_array_equal(a, assignment)
