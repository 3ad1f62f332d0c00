"""Models users bring: subclassed, tf.keras 2.x, Lambda, custom losses,
Keras-quantised; and LUT-Q models saved as .h5 or loaded without lutq_tf."""

import keras
import numpy as np
import pytest

import lutq_tf

L = keras.layers


class Net(lutq_tf.LUTQModelMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = lutq_tf.LUTQWrapper(L.Conv2D(4, 3, name="conv"),
                                        lutq_tf.LUTQuantizer(bits=2))
        self.flatten = L.Flatten()
        self.fc = lutq_tf.LUTQWrapper(L.Dense(3, name="fc"),
                                      lutq_tf.LUTQuantizer(num_values=3))

    def call(self, x):
        return self.fc(keras.ops.relu(self.flatten(self.conv(x))))


def _functional():
    inputs = keras.Input((6,))
    hidden = L.Dense(8, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(3, name="fc")(hidden), name="net")


def _data(shape, n=16):
    return np.random.default_rng(0).normal(size=(n, *shape)).astype("float32")


def test_strip_model_traces_a_subclassed_model():
    net = Net()
    x = _data((6, 6, 1))
    net(x)
    stripped = lutq_tf.strip_model(net)
    assert not lutq_tf.is_quantized(stripped)
    assert isinstance(stripped, keras.Model)
    # The kernels are d[A], so the predictions are the LUT-Q model's.
    for wrapper in (net.conv, net.fc):
        np.testing.assert_array_equal(
            stripped.get_layer(wrapper.name).kernel.numpy(),
            wrapper.quantized_tensors["kernel"][2])
    np.testing.assert_array_equal(stripped(x).numpy(),
                                  net(x).numpy())


def test_strip_model_of_an_untraceable_subclassed_model_says_why():
    net = Net()
    with pytest.raises(ValueError, match="not built"):
        lutq_tf.strip_model(net)
    net(_data((6, 6, 1), n=2))
    net.call = lambda x: np.asarray(x)  # not traceable on Keras tensors
    with pytest.raises(ValueError, match="cannot trace.*keras.ops"):
        lutq_tf.strip_model(net)


def _tf_keras_class(name, module):
    """A stand-in for a tf_keras class (tf_keras is not installed here)."""
    return type(name, (), {"__module__": module, "name": "dense_1",
                           "built": True})


def test_tf_keras_objects_are_refused_with_how_to_convert():
    dense = _tf_keras_class("Dense", "tf_keras.src.layers.core.dense")()
    with pytest.raises(TypeError, match=r"'dense_1' is a tf.keras 2.x Dense"
                                        r".*\.h5.*lutq_tf.load_model"):
        lutq_tf.LUTQWrapper(dense)
    model = _tf_keras_class("Functional",
                            "tf_keras.src.engine.functional")()
    for function in (lutq_tf.quantize_model, lutq_tf.strip_model):
        with pytest.raises(TypeError,
                           match="tf.keras 2.x.*lutq_tf.load_model"):
            function(model)
    # Other objects are not Keras models at all.
    with pytest.raises(TypeError, match="takes a Keras model.*NoneType"):
        lutq_tf.quantize_model(None)


def test_lambda_layers_are_cloned_without_deserialisation():
    scale = 3.0  # a closure: lost by a config round trip
    inputs = keras.Input((6,))
    x = L.Dense(8, name="hidden")(inputs)
    x = L.Lambda(lambda t: t * scale, name="scale")(x)
    model = keras.Model(inputs, L.Dense(3, name="fc")(x))
    quantized = lutq_tf.quantize_model(model, bits=2)
    assert quantized.get_layer("scale").function is (
        model.get_layer("scale").function)
    stripped = lutq_tf.strip_model(quantized)
    x = _data((6,))
    got = quantized(x).numpy()
    np.testing.assert_array_equal(stripped(x).numpy(), got)
    # The float model with the d[A] kernels: the same function.
    model.set_weights(stripped.get_weights())
    np.testing.assert_allclose(model(x).numpy(), got, rtol=1e-6)


def test_local_custom_loss_gives_an_uncompiled_model_and_a_warning():
    def my_loss(y, p):
        return keras.ops.mean(keras.ops.square(y - p))

    model = _functional()
    model.compile("adam", my_loss)
    with pytest.warns(UserWarning, match="uncompiled.*'net'.*my_loss"):
        quantized = lutq_tf.quantize_model(model, bits=2)
    assert not quantized.compiled
    assert len(lutq_tf.lutq_layers(quantized)) == 2
    assert model.compiled  # the user's model is left as it was


def test_keras_int8_quantised_kernel_is_refused():
    model = _functional()
    model.get_layer("fc").quantize("int8")
    with pytest.raises(ValueError, match="'fc'.*quantised by Keras.*float "
                                         "model"):
        lutq_tf.quantize_model(model, bits=2)
    with pytest.raises(ValueError, match="'fc'.*quantised by Keras"):
        lutq_tf.LUTQWrapper(model.get_layer("fc"))


@pytest.mark.parametrize("sequential", [False, True])
def test_h5_round_trip(tmp_path, sequential):
    model = _functional()
    if sequential:
        model = keras.Sequential([keras.Input((6,)), L.Dense(8, name="a"),
                                  L.Dense(3, name="b")])
    quantized = lutq_tf.quantize_model(model, bits=2)
    path = str(tmp_path / "m.h5")
    quantized.save(path)
    x = _data((6,))
    for loaded in (keras.models.load_model(path, compile=False),
                   lutq_tf.load_model(path)):
        assert type(loaded) is type(quantized)
        np.testing.assert_array_equal(loaded(x).numpy(),
                                      quantized(x).numpy())
        for a, b in zip(lutq_tf.lutq_layers(loaded),
                        lutq_tf.lutq_layers(quantized)):
            assert a.quantizer == b.quantizer
            for u, v in zip(a.quantized_tensors["kernel"],
                            b.quantized_tensors["kernel"]):
                np.testing.assert_array_equal(u, v)


def test_keras_file_loaded_without_lutq_tf_names_the_package(tmp_path,
                                                              monkeypatch):
    path = str(tmp_path / "m.keras")
    lutq_tf.quantize_model(_functional(), bits=2).save(path)
    # As in a process that never imported lutq_tf: nothing registered.
    registry = keras.saving.get_custom_objects()
    for name in [n for n in registry if n.startswith("lutq_tf>")]:
        monkeypatch.delitem(registry, name)
    with pytest.raises(TypeError, match="LUTQModel.*'lutq_tf>LUTQModel'"):
        keras.models.load_model(path)
