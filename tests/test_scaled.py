"""The scaled-dictionary mode (`channel_scales=True`): one dictionary per
tensor over the weights divided by their output channel's RMS, and
Q[m, c] = s_c * d[A[m, c]]."""

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

import lutq_tf
from lutq_tf import constraints
from lutq_tf import kmeans

L = keras.layers

CONSTRAINTS = {
    "none": constraints.Free(),
    "pow2": constraints.PowerOfTwo(min_exponent=-8, max_exponent=2),
    "uniform": constraints.Uniform(),
}


def _weights(rng, rows=60, channels=5):
    """Columns of very different ranges, and one all-zero column."""
    x = rng.normal(size=(rows, channels)) * np.geomspace(0.01, 10, channels)
    x[:, 2] = 0.0
    return x.astype(np.float32)


def _numpy_scales(matrix):
    rms = np.sqrt(np.mean(np.square(matrix.astype(np.float64)), axis=0))
    # (float32 in the library: relative to each column's largest |x|.)
    return np.where(rms > 0, rms, 1).astype(np.float32)


def _invariants(state, quantizer):
    """Checks the cached Q against d, A and s; returns the `[M, C]` views."""
    w = state.to_matrix(state.variable.value).numpy()
    d = state.dictionary.numpy()
    a = state.to_matrix(state.assignment.value).numpy().astype(np.int64)
    q = state.to_matrix(state.quantized.value).numpy()
    s = state.channel_scales.numpy()
    k = quantizer.num_values
    assert d.shape == (k, 1)
    assert s.shape == (w.shape[1],) == (state.channels,)
    # s is the current W's, so the k-means step ran after the last update.
    # (float32 sums in another order than numpy's: a few ulps.)
    np.testing.assert_allclose(s, _numpy_scales(w), rtol=1e-6)
    # Every channel is s_c * d[A], one float32 product, from one table.
    np.testing.assert_array_equal(q, s[None, :] * d[a, 0])
    assert len(np.unique(d[a, 0])) <= k
    np.testing.assert_allclose(q / s, d[a, 0], rtol=1e-6)
    num_pruned = quantizer.num_pruned(w.size)
    if num_pruned:
        assert np.all(d[0] == 0)
        pruned = a == 0
        assert pruned.sum() == num_pruned
        assert np.all(q[pruned] == 0)
        # The smallest normalised weights of the whole tensor.
        x = np.abs(w / s)
        assert x[pruned].max() <= x[~pruned].min()
    return w, d, a, q, s


# -- the step against the numpy reference -------------------------------------

@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
@pytest.mark.parametrize("prune_rate", [0.0, 0.3])
@pytest.mark.parametrize("k", [4, 40])
def test_step_matches_numpy_reference(name, prune_rate, k):
    rng = np.random.default_rng(k + int(10 * prune_rate))
    w = _weights(rng)
    quantizer = lutq_tf.LUTQuantizer(
        num_values=k, constraint=CONSTRAINTS[name], prune_rate=prune_rate,
        channel_scales=True)
    s = quantizer.scales(tf.constant(w)).numpy()
    np.testing.assert_allclose(s, _numpy_scales(w), rtol=1e-6)
    x = (w / s).reshape(-1, 1)  # normalised, one table, row-major
    num_pruned = quantizer.num_pruned(w.size)
    d = quantizer.seed(tf.constant(w)).numpy()
    np.testing.assert_array_equal(
        d, kmeans.seed_dictionary(tf.constant(x), k, quantizer.constraint,
                                  num_pruned).numpy())
    want_d, want_a = reference.step(x, d, quantizer.constraint, num_pruned)
    want_a = want_a.reshape(w.shape)
    step = tf.function(quantizer.step, jit_compile=True)  # as the wrapper
    for got in (quantizer.step(tf.constant(w), tf.constant(d)),
                step(tf.constant(w), tf.constant(d))):
        got_d, got_a, got_q, finite = (t.numpy() for t in got)
        assert finite
        np.testing.assert_array_equal(got_a, want_a)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-7)
        # XLA may round the RMS differently from eager TF by an ulp.
        np.testing.assert_allclose(got_q, s[None, :] * got_d[got_a, 0], rtol=1e-6)
        if num_pruned:
            assert np.sum(got_q == 0) >= num_pruned
            assert np.all(got_q[got_a == 0] == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_step_reports_non_finite_weights(bad):
    quantizer = lutq_tf.LUTQuantizer(bits=2, channel_scales=True,
                                     prune_rate=0.5)
    w = _weights(np.random.default_rng(0))
    d = quantizer.seed(tf.constant(w))
    step = tf.function(quantizer.step, jit_compile=True)
    assert bool(step(tf.constant(w), d)[3])
    w[7, 1] = bad
    assert not bool(step(tf.constant(w), d)[3])


# -- the wrapper on layers with different channel axes ------------------------

LAYERS = {
    "dense": ((6,), lambda: L.Dense(5, name="q")),
    "conv2d": ((6, 6, 3), lambda: L.Conv2D(4, 3, name="q")),
    "depthwise2d": ((6, 6, 3),
                    lambda: L.DepthwiseConv2D(3, depth_multiplier=2,
                                              name="q")),
    "conv2d_transpose": ((4, 4, 3),
                         lambda: L.Conv2DTranspose(4, 3, strides=2,
                                                   name="q")),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_invariants_on_every_channel_layout(case):
    input_shape, make_layer = LAYERS[case]
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, L.Flatten()(make_layer()(inputs)))
    layer = model.get_layer("q")
    # Channels of very different ranges, one of them all zero.
    state_spec = lutq_tf.registry.quantizable_tensors(layer)[0]
    kernel = layer.kernel.numpy()
    axes = [kernel.ndim + a for a in state_spec.channel_axes]
    shape = [kernel.shape[i] if i in axes else 1 for i in range(kernel.ndim)]
    factors = np.geomspace(0.01, 10, int(np.prod(shape))).reshape(shape)
    factors.flat[1] = 0
    layer.kernel.assign(kernel * factors)
    quantized = lutq_tf.quantize_model(model, bits=2, prune_rate=0.25,
                                       channel_scales=True)
    wrapper = quantized.get_layer("q")
    state = wrapper.tensor_states[0]
    assert state.channel_scales.path.endswith("kernel_channel_scales")
    w, _, _, _, s = _invariants(state, wrapper.quantizer)
    assert np.any(s == 1) and len(np.unique(s)) == state.channels
    # Columns of to_matrix are the output channels: the zeroed one's scale
    # is 1 and its quantised weights are 0.
    zero = np.flatnonzero(np.all(w == 0, axis=0))
    assert zero.size == 1 and s[zero[0]] == 1
    d, a, q = wrapper.quantized_tensors["kernel"]
    assert q.shape == a.shape == kernel.shape and d.shape == (4, 1)
    np.testing.assert_array_equal(state.to_matrix(q).numpy()[:, zero[0]], 0)


# -- training, save / load, strip, summary ------------------------------------

def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32") + (
        x[:, 0, 0, 0] > 0).astype("int32")
    return x, y


def _model():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = L.Flatten()(x)
    x = L.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def _quantized():
    return lutq_tf.quantize_model(
        _model(), bits=2, channel_scales=True,
        overrides={"fc": {"bits": 3, "prune_rate": 0.5, "constraint": "pow2"},
                   "logits": {"channel_scales": False}})


def _compile(model, **kwargs):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), **kwargs)


@pytest.mark.parametrize("jit_compile", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_trains_and_invariants_hold_after_fit(jit_compile):
    x, y = _data()
    inputs = keras.Input((8, 8, 1))
    hidden = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    outputs = L.Dense(3, name="fc")(L.Flatten()(hidden))
    model = lutq_tf.quantize_model(
        keras.Model(inputs, outputs), bits=2, channel_scales=True,
        overrides={"fc": {"bits": 3, "prune_rate": 0.5,
                          "constraint": "pow2"}})
    _compile(model, jit_compile=jit_compile)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for name in ("conv", "fc"):
        layer = model.get_layer(name)
        w, d, a, _, s = _invariants(layer.tensor_states[0], layer.quantizer)
        if name == "conv":
            # Free entries are the means of the normalised weights.
            for entry in np.unique(a):
                np.testing.assert_allclose(
                    d[entry, 0], (w / s)[a == entry].astype(np.float64).mean(),
                    rtol=1e-4, atol=1e-6)
        else:
            nonzero = d[d != 0]
            assert np.all(np.frexp(np.abs(nonzero))[0] == 0.5)


def test_save_and_load(tmp_path):
    x, _ = _data(4)
    model = _quantized()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name in ("conv", "fc"):
        assert loaded.get_layer(name).quantizer == model.get_layer(
            name).quantizer
        assert loaded.get_layer(name).quantizer.channel_scales
    for a, b in zip(model.weights, loaded.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))


@pytest.mark.slow
def test_resume_from_save_as_if_uninterrupted(tmp_path):
    x, y = _data()
    model = _quantized()
    _compile(model)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    for m in (model, loaded):
        m.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_strip_and_summary():
    x, _ = _data(4)
    model = _quantized()
    stripped = lutq_tf.strip_model(model)
    assert not lutq_tf.is_quantized(stripped)
    for name in ("conv", "fc"):
        np.testing.assert_array_equal(
            stripped.get_layer(name).kernel.numpy(),
            model.get_layer(name).quantized_tensors["kernel"][2])
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  stripped.predict(x, verbose=0))

    printed = []
    rows = lutq_tf.summary(model, print_fn=printed.append)
    assert [(r.layer, r.mode) for r in rows] == [
        ("conv", "scaled"), ("fc", "scaled"), ("logits", "tensor")]
    table = printed[0].splitlines()
    assert "scaled" in table[2] and "scaled" in table[3]
    assert "tensor" in table[4]
    conv, fc, logits = rows
    assert not conv.per_channel and logits.channel_scales is None
    np.testing.assert_array_equal(
        conv.channel_scales,
        model.get_layer("conv").tensor_states[0].channel_scales.numpy())
    assert fc.channel_scales.shape == (16,)
    assert fc.prune_rate == pytest.approx(0.5)
    assert 2 <= conv.in_use <= 4


def test_config_round_trip_and_old_configs():
    quantizer = lutq_tf.LUTQuantizer(bits=3, channel_scales=True)
    config = quantizer.get_config()
    assert config["channel_scales"] is True
    assert lutq_tf.LUTQuantizer.from_config(config) == quantizer
    assert "channel_scales=True" in repr(quantizer)
    del config["channel_scales"]  # saved before the option existed
    old = lutq_tf.LUTQuantizer.from_config(config)
    assert not old.channel_scales and old.mode == "tensor"
    # A row made without a mode takes it from per_channel.
    row = lutq_tf.TensorSummary("a", "kernel", 4, True, 4, 0.0, 2, 10, "x")
    assert row.mode == "channel" and row.channel_scales is None


def test_per_channel_with_channel_scales_is_an_error():
    message = "per_channel=True and channel_scales=True"
    with pytest.raises(ValueError, match=message):
        lutq_tf.LUTQuantizer(bits=2, per_channel=True, channel_scales=True)
    with pytest.raises(ValueError, match=message):
        lutq_tf.quantize_model(_model(), bits=2, per_channel=True,
                               channel_scales=True)
    with pytest.raises(ValueError, match=r"overrides\['fc'\].*" + message):
        lutq_tf.quantize_model(_model(), bits=2, per_channel=True,
                               overrides={"fc": {"channel_scales": True}})
    # One table over the whole tensor: K is checked against all its weights.
    inputs = keras.Input((2,))
    tiny = keras.Model(inputs, L.Dense(3, name="fc")(inputs))  # 6 weights
    with pytest.raises(ValueError, match="'fc'.*K=8.*6 weights.*tensor"):
        lutq_tf.quantize_model(tiny, bits=3, channel_scales=True)
    lutq_tf.quantize_model(tiny, bits=2, channel_scales=True)


def test_channel_scales_are_the_rms_without_overflow():
    x = np.array([[3e30, 1.0, 0.0], [-4e30, -1.0, 0.0]], np.float32)
    s = kmeans.channel_scales(tf.constant(x)).numpy()
    np.testing.assert_allclose(s, [np.sqrt(12.5e60), 1.0, 1.0], rtol=1e-6)
    assert np.all(np.isfinite(s))
