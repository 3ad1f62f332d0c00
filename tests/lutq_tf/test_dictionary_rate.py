"""`dictionary_rate`: the k-means step's d <- d + rate * (means - d)."""

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

import lutq_tf
from lutq_tf import LUTQuantizer
from lutq_tf import constraints
from lutq_tf import kmeans

L = keras.layers

# Every k-means step variant: per tensor, per channel, scaled, pruning.
MODES = {
    "tensor": {},
    "channel": {"per_channel": True},
    "scaled": {"channel_scales": True},
    "pruned": {"prune_rate": 0.3},
    "scaled_pruned": {"channel_scales": True, "prune_rate": 0.3},
}
# Whole models train slowly to compile: one of each table kind, pruning too.
MODEL_MODES = ["tensor", "channel", "scaled_pruned"]


def _model():
    inputs = keras.Input((12,))
    x = L.Dense(24, activation="relu", name="a")(inputs)
    return keras.Model(inputs, L.Dense(3, name="b")(x))


def _data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(64, 12)).astype(np.float32),
            rng.integers(0, 3, 64))


def _state(model):
    """`{layer: (d, A)}` of every LUT-Q layer's kernel, as numpy."""
    return {layer.name: layer.quantized_tensors["kernel"][:2]
            for layer in lutq_tf.lutq_layers(model)}


def _fit(model, learning_rate=0.05, steps=6):
    x, y = _data()
    keras.utils.set_random_seed(1)
    model.compile(keras.optimizers.SGD(learning_rate),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=len(x) // steps, epochs=1, shuffle=False,
              verbose=0)


@pytest.mark.parametrize("mode", MODEL_MODES)
def test_rate_one_is_the_default_and_rate_zero_keeps_the_initial_fit(mode):
    """Rate 1 trains bit-identically to the default; rate 0 keeps the
    initial fit (the full k-means fit whatever the rate) while A follows W.
    One test, so that the default model serves both comparisons."""
    float_model = _model()
    default = lutq_tf.quantize_model(float_model, num_values=4,
                                     **MODES[mode])
    explicit = lutq_tf.quantize_model(float_model, num_values=4,
                                      dictionary_rate=1.0, **MODES[mode])
    fixed = lutq_tf.quantize_model(float_model, num_values=4,
                                   dictionary_rate=0.0, **MODES[mode])
    before = _state(default)
    initial = _state(fixed)
    for name, (d, a) in before.items():
        np.testing.assert_array_equal(initial[name][0], d)
        np.testing.assert_array_equal(initial[name][1], a)

    # Rate 1.
    _fit(default)
    _fit(explicit)
    got, want = _state(explicit), _state(default)
    for name in want:
        # The dictionaries moved: the comparison is not of initial fits.
        assert not np.array_equal(want[name][0], before[name][0])
        np.testing.assert_array_equal(got[name][0], want[name][0])
        np.testing.assert_array_equal(got[name][1], want[name][1])
    # Rate 1 compiles one step for the fit and training, as before.
    for layer in lutq_tf.lutq_layers(explicit):
        assert all(s.initial_update is None for s in layer.tensor_states)

    # Rate 0.
    _fit(fixed, learning_rate=0.5)
    after = _state(fixed)
    for name in initial:
        np.testing.assert_array_equal(after[name][0], initial[name][0])
        assert np.any(after[name][1] != initial[name][1]), name
    for layer in lutq_tf.lutq_layers(fixed):
        d, a, q = layer.quantized_tensors["kernel"]
        if "prune_rate" in MODES[mode]:
            assert np.all(d[0] == 0) and np.mean(a == 0) >= 0.29
        if not layer.quantizer.channel_scales:
            # Q is still d[A] over the fixed dictionary (per column).
            columns = d.shape[1]
            matrix = a.reshape(-1, columns)
            np.testing.assert_array_equal(
                q.reshape(-1, columns),
                d[matrix, np.arange(columns)[None, :]])


def test_rate_zero_keeps_pow2_entries_and_the_projection_applies():
    quantizer = LUTQuantizer(num_values=4, constraint="pow2",
                             prune_rate=0.25, dictionary_rate=0.0)
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(200, 1)).astype(np.float32))
    d, _, _ = quantizer.initialize(x)
    moved = x * 3.0 + 0.5
    new_d, a, _, finite = quantizer.step(moved, d)
    assert bool(finite)
    np.testing.assert_array_equal(new_d.numpy(), d.numpy())
    assert new_d.numpy()[0, 0] == 0
    magnitudes = np.abs(new_d.numpy()[1:])
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(magnitudes))),
                                  magnitudes)
    assert int(np.sum(a.numpy() == 0)) == quantizer.num_pruned(200)


@pytest.mark.parametrize("channels", [1, 4])
def test_half_rate_step_matches_numpy(channels):
    rng = np.random.default_rng(channels)
    x = rng.normal(size=(300, channels)).astype(np.float32)
    # Sorted; the top entry is far above every weight: an empty cluster.
    d = np.sort(rng.normal(size=(5, channels)), axis=0).astype(np.float32)
    d[-1] = 50.0
    quantizer = LUTQuantizer(num_values=5, per_channel=channels > 1,
                             dictionary_rate=0.5)
    got_d, got_a, got_q, finite = quantizer.step(tf.constant(x),
                                                 tf.constant(d))
    assert bool(finite)
    want_a = reference.assign(x, d, 0)
    means, counts = reference.means(x, want_a, d)
    assert np.all(counts[-1] == 0) and np.all(counts[:-1] > 0)
    want_d = d + 0.5 * (means - d)
    np.testing.assert_array_equal(got_a.numpy(), want_a)
    np.testing.assert_allclose(got_d.numpy(), want_d, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got_d.numpy()[-1], d[-1])
    # Half way, not at the means (nor at d).
    assert np.all(np.abs(got_d.numpy()[:-1] - means[:-1]) > 1e-6)
    np.testing.assert_array_equal(
        got_q.numpy(), got_d.numpy()[got_a.numpy(),
                                     np.arange(channels)[None, :]])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_step_variant_blends_its_new_dictionary(mode):
    """With free entries the projection is the identity, so the rate-r step
    gives d + r (full - d), full being the rate-1 step's dictionary."""
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(120, 6)).astype(np.float32)
                    * np.linspace(0.5, 2.0, 6, dtype=np.float32))
    full_quantizer = LUTQuantizer(num_values=4, **MODES[mode])
    d = full_quantizer.seed(x * 1.3)
    full_d, full_a, _, _ = full_quantizer.step(x, d)
    for rate in (0.0, 0.25):
        step = LUTQuantizer(num_values=4, dictionary_rate=rate,
                            **MODES[mode]).step
        got_d, got_a, _, _ = tf.function(step, jit_compile=True)(x, d)
        np.testing.assert_array_equal(got_a.numpy(), full_a.numpy())
        np.testing.assert_allclose(got_d.numpy(),
                                   d + rate * (full_d - d),
                                   rtol=1e-6, atol=1e-7)
    assert not np.allclose(full_d.numpy(), d.numpy())


def test_kmeans_step_rate_argument():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(100, 2)).astype(np.float32))
    d = tf.constant(np.array([[-1, -1], [0, 0], [1, 1]], np.float32))
    free = constraints.Free()
    full, _, _, _ = kmeans.kmeans_step(x, d, free, 0)
    same, _, _, _ = kmeans.kmeans_step(x, d, free, 0, dictionary_rate=1.0)
    kept, _, _, _ = kmeans.kmeans_step(x, d, free, 0, dictionary_rate=0.0)
    np.testing.assert_array_equal(same.numpy(), full.numpy())
    np.testing.assert_array_equal(kept.numpy(), d.numpy())


@pytest.mark.parametrize("value, error", [
    (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
    ("0.5", TypeError), (True, TypeError), (None, TypeError),
])
def test_bad_rates_are_refused_by_name(value, error):
    with pytest.raises(error, match=r"dictionary_rate must be a float in "
                                    r"\[0, 1\]"):
        LUTQuantizer(bits=2, dictionary_rate=value)
    with pytest.raises(error, match="dictionary_rate"):
        lutq_tf.quantize_model(_model(), bits=2, dictionary_rate=value)
    with pytest.raises(ValueError, match=r"overrides\['b'\]: dictionary_rate"):
        lutq_tf.quantize_model(_model(), bits=2,
                               overrides={"b": {"dictionary_rate": value}})


@pytest.mark.parametrize("value", [0, 1, 0.5, np.float32(0.25)])
def test_good_rates_are_python_floats(value):
    rate = LUTQuantizer(bits=2, dictionary_rate=value).dictionary_rate
    assert type(rate) is float and rate == float(value)


def test_config_round_trip_and_old_configs_load_with_rate_one():
    quantizer = LUTQuantizer(bits=3, dictionary_rate=0.25)
    config = quantizer.get_config()
    assert config["dictionary_rate"] == 0.25
    assert LUTQuantizer.from_config(config) == quantizer
    old = dict(config)
    del old["dictionary_rate"]
    assert LUTQuantizer.from_config(old).dictionary_rate == 1.0
    assert quantizer.with_options(bits=2).dictionary_rate == 0.25


def test_keras_file_keeps_the_rate(tmp_path):
    model = lutq_tf.quantize_model(_model(), num_values=4,
                                   dictionary_rate=0.0,
                                   overrides={"b": {"dictionary_rate": 0.25}})
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = lutq_tf.load_model(path)
    rates = {layer.name: layer.quantizer.dictionary_rate
             for layer in lutq_tf.lutq_layers(loaded)}
    assert rates == {"a": 0.0, "b": 0.25}
    # The loaded model trains with it: layer a's dictionary stays put.
    before = _state(loaded)
    _fit(loaded, learning_rate=0.5)
    after = _state(loaded)
    np.testing.assert_array_equal(after["a"][0], before["a"][0])
    assert not np.array_equal(after["b"][0], before["b"][0])


def test_quantize_model_passes_the_rate_to_every_wrapper():
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, name="c1")(inputs)
    x = L.DepthwiseConv2D(3, name="dw")(x)
    x = L.Flatten()(x)
    x = L.Dense(6, name="d1")(x)
    model = keras.Model(inputs, L.Dense(2, name="d2")(x))
    quantized = lutq_tf.quantize_model(
        model, bits=2, dictionary_rate=0.0,
        overrides={"d2": {"bits": 3}, "dw": {"dictionary_rate": 0.5}})
    rates = {layer.name: layer.quantizer.dictionary_rate
             for layer in lutq_tf.lutq_layers(quantized)}
    assert rates == {"c1": 0.0, "dw": 0.5, "d1": 0.0, "d2": 0.0}
