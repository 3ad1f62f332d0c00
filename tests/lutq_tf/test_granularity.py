"""`granularity`: one option for the dictionary layout, its aliases
(`per_channel`, `channel_scales`), and lutq_tf's public training and
inspection interface (`all_layers`, `summary_rows`, the wrapper's and the
model's schedule and figure names)."""

import keras
import numpy as np
import pytest

import lutq_tf

L = keras.layers

ALIASES = {
    "per_tensor": {},
    "per_channel": {"per_channel": True},
    "per_channel_scaled": {"channel_scales": True},
}
MODES = {"per_tensor": "tensor", "per_channel": "channel",
         "per_channel_scaled": "scaled"}


def _model():
    inputs = keras.Input((8,))
    x = L.Dense(16, name="fc")(inputs)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


@pytest.mark.parametrize("granularity", lutq_tf.GRANULARITIES)
def test_granularity_is_its_alias(granularity):
    by_name = lutq_tf.LUTQuantizer(bits=2, granularity=granularity)
    by_alias = lutq_tf.LUTQuantizer(bits=2, **ALIASES[granularity])
    assert by_name == by_alias
    assert by_name.granularity == by_alias.granularity == granularity
    assert by_name.mode == MODES[granularity]
    # Configs keep the aliases: files and older readers see no change.
    config = by_name.get_config()
    assert "granularity" not in config
    assert lutq_tf.LUTQuantizer.from_config(config) == by_name


@pytest.mark.parametrize("kwargs, message", [
    ({"granularity": "per_tensor", "per_channel": True},
     "granularity='per_tensor' and per_channel=True contradict"),
    ({"granularity": "per_channel", "per_channel": False},
     "granularity='per_channel' and per_channel=False contradict"),
    ({"granularity": "per_channel", "channel_scales": True},
     "granularity='per_channel' and channel_scales=True contradict"),
    ({"granularity": "per_channel_scaled", "channel_scales": False},
     "granularity='per_channel_scaled' and channel_scales=False"),
    ({"granularity": "channel"}, r"got 'channel' \(write 'per_channel'\)"),
    ({"per_channel": True, "channel_scales": True},
     "per_channel=True and channel_scales=True exclude each other"),
])
def test_contradictions_are_errors_naming_both(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lutq_tf.LUTQuantizer(bits=2, **kwargs)
    with pytest.raises(ValueError, match=message):
        lutq_tf.quantize_model(_model(), bits=2, **kwargs)


def test_agreeing_aliases_and_bad_types():
    assert lutq_tf.LUTQuantizer(bits=2, granularity="per_channel",
                                per_channel=True,
                                channel_scales=False).per_channel
    with pytest.raises(TypeError, match="granularity must be one of"):
        lutq_tf.LUTQuantizer(bits=2, granularity=1)
    with pytest.raises(TypeError, match="per_channel must be True or False"):
        lutq_tf.LUTQuantizer(bits=2, granularity="per_channel",
                             per_channel="yes")


def test_quantize_model_granularity_and_overrides():
    q = lutq_tf.quantize_model(
        _model(), bits=2, granularity="per_channel_scaled",
        overrides={"head": {"granularity": "per_channel"}})
    quantizers = {layer.name: layer.quantizer
                  for layer in lutq_tf.lutq_layers(q)}
    assert quantizers["fc"].granularity == "per_channel_scaled"
    # A granularity replaces the default's layout ...
    assert quantizers["head"].granularity == "per_channel"
    # ... the aliases (as the flash-budget planner writes them) update it.
    planned = lutq_tf.quantize_model(
        _model(), bits=2, granularity="per_channel", overrides={
            "fc": {"bits": 3, "per_channel": False, "channel_scales": True},
            "head": {"per_channel": False, "channel_scales": False}})
    assert [layer.quantizer.granularity
            for layer in lutq_tf.lutq_layers(planned)] == [
                "per_channel_scaled", "per_tensor"]
    with pytest.raises(ValueError, match=r"overrides\['head'\].*contradict"):
        lutq_tf.quantize_model(_model(), bits=2, overrides={
            "head": {"granularity": "per_tensor", "per_channel": True}})


def test_summary_rows_and_all_layers():
    inner = keras.Sequential([keras.Input((8,)), L.Dense(16, name="fc")],
                             name="inner")
    inputs = keras.Input((8,))
    model = keras.Model(inputs, L.Dense(4, name="head")(inner(inputs)))
    names = [layer.name for layer in lutq_tf.all_layers(model)]
    # Depth first, nested models and their layers included.
    assert [n for n in names if n in ("inner", "fc", "head")] == [
        "inner", "fc", "head"]
    assert "inner" not in [layer.name for layer in lutq_tf.all_layers(
        model, include_models=False)]
    q = lutq_tf.quantize_model(model, bits=2, granularity="per_channel")
    rows = lutq_tf.summary_rows(q)
    assert rows == lutq_tf.summary(q, print_fn=None)
    assert [(r.layer, r.tensor, r.num_values, r.granularity, r.index_bits)
            for r in rows] == [("fc", "kernel", 4, "per_channel", 2),
                               ("head", "kernel", 4, "per_channel", 2)]
    with pytest.raises(TypeError, match="summary_rows takes a Keras model"):
        lutq_tf.summary_rows("model")


def test_public_training_interface():
    q = lutq_tf.quantize_model(_model(), bits=2)
    fc = q.get_layer("fc")
    # A training call inside the (nested) context runs no self-driven step:
    # it does not count itself (`training_calls`, the wrapper's counter).
    calls = next(v for v in fc.weights if v.name == "training_calls")
    x = np.ones((2, 8), "float32")
    with fc.kmeans_driven_by_model():
        with fc.kmeans_driven_by_model():
            fc(x, training=True)
        fc(x, training=True)
        assert int(calls.numpy()) == 0
    fc(x, training=True)
    assert int(calls.numpy()) == 1
    error, changed = fc.last_figures
    assert float(error.numpy()) == float(changed.numpy()) == 0.0
    fc.scheduled_kmeans_step(True, measure=True)
    weights = fc.layer.kernel.numpy()
    np.testing.assert_allclose(
        float(fc.last_figures[0].numpy()),
        np.abs(weights - fc.tensor_states[0].quantized.numpy()).sum(),
        rtol=1e-5)
    assert q.quantization_figures_every == 0
    q.compile("sgd", "mse")
    q.make_train_function()
    q.quantization_figures_every = 3
    assert q.quantization_figures_every == 3 and q.train_function is None
    with pytest.raises(ValueError, match="quantization_figures_every"):
        q.quantization_figures_every = -1
