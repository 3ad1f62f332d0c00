"""Bad input gets a clear error naming the layer or argument."""

import keras
import numpy as np
import pytest

import lutq_tf

L = keras.layers


def _model():
    inputs = keras.Input((6, 6, 1))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(3, name="fc")(x))


def test_unsupported_layer_named_explicitly():
    with pytest.raises(ValueError, match="'flatten'.*Flatten.*cannot"):
        lutq_tf.quantize_model(_model(), layer_names=["flatten"])
    with pytest.raises(ValueError, match="layer_types.*BatchNormalization"):
        lutq_tf.quantize_model(_model(), layer_types=L.BatchNormalization)
    with pytest.raises(ValueError, match="Flatten"):
        lutq_tf.LUTQWrapper(L.Flatten())


@pytest.mark.parametrize("options, message", [
    ({"bits": 0}, "bits must be an integer >= 1"),
    ({"bits": 2.5}, "bits must be an integer"),
    ({"num_values": 1}, r"num_values \(K\) must be an integer >= 2"),
    ({"bits": 2, "num_values": 3}, "disagree"),
    ({"prune_rate": 1.0}, r"prune_rate must be a fraction in \[0, 1\)"),
    ({"prune_rate": -0.1}, "prune_rate"),
    ({"constraint": "log"}, "Unknown constraint 'log'"),
    ({"kmeans_every": 0}, "kmeans_every"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        lutq_tf.quantize_model(_model(), **options)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("options, error, message", [
    ({"bits": NAN}, ValueError, "bits must be an integer >= 1, got nan"),
    ({"bits": INF}, ValueError, "bits must be an integer >= 1, got inf"),
    ({"bits": "4"}, TypeError, r"bits must be an integer >= 1, got '4' \(str"),
    ({"num_values": 2.5}, ValueError, r"num_values \(K\) must be an integer"),
    ({"kmeans_every": None}, TypeError,
     "kmeans_every must be an integer >= 1, got None"),
    ({"kmeans_every": NAN}, ValueError,
     "kmeans_every must be an integer >= 1, got nan"),
    ({"init_iterations": True}, TypeError, "init_iterations must be an int"),
    ({"per_channel": "no"}, TypeError,
     "per_channel must be True or False, got 'no'"),
    ({"channel_scales": 1}, TypeError, "channel_scales must be True or False"),
    ({"prune_rate": "0.5"}, TypeError,
     r"prune_rate must be a fraction in \[0, 1\), got '0.5'"),
    ({"prune_rate": NAN}, ValueError, r"prune_rate must be a fraction"),
    ({"skip": "fc"}, TypeError,
     r"`skip` takes a list of layer names.*\['fc'\]"),
    ({"layer_names": ["fc", 3]}, TypeError, r"`layer_names`.*\[3\]"),
    ({"layer_types": "Dense"}, TypeError,
     r"`layer_types` takes Keras layer classes.*'Dense'"),
    ({"layer_types": (L.Dense, "Conv2D")}, TypeError, "`layer_types`"),
    ({"min_weights": "10"}, TypeError,
     "min_weights must be an integer >= 0, got '10'"),
    ({"min_weights": -1}, ValueError, "min_weights must be an integer >= 0"),
    ({"overrides": ["fc"]}, TypeError,
     r"`overrides` takes a dict \{layer_name: options\}, got \['fc'\]"),
    ({"overrides": {"fc": {"per_channel": "yes"}}}, ValueError,
     r"overrides\['fc'\]: per_channel must be True or False"),
])
def test_option_types_and_values(options, error, message):
    with pytest.raises(error, match=message):
        lutq_tf.quantize_model(_model(), **options)


def test_numpy_scalars_and_none_are_taken():
    quantized = lutq_tf.quantize_model(
        _model(), bits=np.int64(2), prune_rate=np.float32(0.5),
        per_channel=np.bool_(False), kmeans_every=np.int32(2),
        init_iterations=np.float64(3), min_weights=np.int64(0), skip=None,
        layer_types=[L.Dense])
    (fc,) = lutq_tf.lutq_layers(quantized)
    assert fc.quantizer == lutq_tf.LUTQuantizer(
        bits=2, prune_rate=0.5, kmeans_every=2, init_iterations=3)
    assert type(fc.quantizer.prune_rate) is float
    assert type(fc.quantizer.per_channel) is bool


def test_summary_of_something_else():
    with pytest.raises(TypeError, match="summary takes a Keras model.*"
                                        "NoneType"):
        lutq_tf.summary(None)


def test_k_larger_than_the_tensor_names_the_layer():
    # conv has 36 weights, 9 per channel.
    with pytest.raises(ValueError, match="'conv'.*K=64.*36 weights"):
        lutq_tf.quantize_model(_model(), bits=6)
    # Per channel too when the tensor is smaller than K (with a smaller K,
    # per_channel falls back to per tensor: tests/lutq_tf/test_small_channels.py).
    with pytest.raises(ValueError, match="'conv'.*K=64.*9 weights.*channel"):
        lutq_tf.quantize_model(_model(), bits=6, per_channel=True)
    # The hint works: skipping the layer fixes it.
    quantized = lutq_tf.quantize_model(_model(), bits=6, skip=["conv"])
    assert [l.name for l in lutq_tf.lutq_layers(quantized)] == ["fc"]


def test_non_finite_weights_at_initialisation():
    model = _model()
    kernel = model.get_layer("fc").kernel
    kernel.assign(np.where(np.arange(kernel.shape[0])[:, None] == 3, np.nan,
                           kernel.numpy()))
    with pytest.raises(ValueError, match="'fc'.*NaN or Inf"):
        lutq_tf.quantize_model(model, bits=2)


@pytest.mark.parametrize("steps_per_execution", [1, 3])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_non_finite_weights_in_training_stop_fit_and_keep_dictionary(
        steps_per_execution, jit_compile):
    quantized = lutq_tf.quantize_model(_model(), bits=2)
    quantized.compile("sgd", "mse", steps_per_execution=steps_per_execution,
                      jit_compile=jit_compile)
    before = quantized.get_layer("fc").quantized_tensors["kernel"][0]
    x = np.ones((8, 6, 6, 1), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(lutq_tf.NonFiniteWeightsError, match="'conv'"):
        quantized.fit(x, np.zeros((8, 3)), epochs=1, batch_size=8,
                      verbose=0)
    after = quantized.get_layer("fc").quantized_tensors["kernel"][0]
    np.testing.assert_array_equal(before, after)
    assert np.all(np.isfinite(after))
    # The flags were cleared: training on clean data goes on.
    quantized.set_weights([np.nan_to_num(w) for w in quantized.get_weights()])
    x[0, 0, 0, 0] = 0.0
    quantized.fit(x, np.zeros((8, 3)), epochs=1, batch_size=8, verbose=0)


def test_override_naming_a_missing_layer():
    with pytest.raises(ValueError, match=r"overrides.*\['dense_9'\]"):
        lutq_tf.quantize_model(_model(), overrides={"dense_9": {"bits": 2}})
    with pytest.raises(ValueError, match=r"skip.*\['nope'\]"):
        lutq_tf.quantize_model(_model(), skip=["nope"])
    with pytest.raises(ValueError, match=r"overrides\['fc'\].*bits"):
        lutq_tf.quantize_model(_model(), overrides={"fc": {"bits": -1}})


def test_subclassed_model_points_to_wrapper_and_mixin():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(3)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 4)))
    with pytest.raises(TypeError, match="subclassed.*LUTQWrapper.*"
                                        "LUTQModelMixin"):
        lutq_tf.quantize_model(net)


def test_already_quantised_model():
    quantized = lutq_tf.quantize_model(_model(), bits=2)
    with pytest.raises(ValueError, match="already LUT-Q quantised"):
        lutq_tf.quantize_model(quantized)
