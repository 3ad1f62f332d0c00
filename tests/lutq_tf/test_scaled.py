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
    # (float32 in the library: relative to each column's largest |x|.)
    # An all-zero column's RMS is 0.
    return np.sqrt(np.mean(np.square(matrix.astype(np.float64)), axis=0)
                   ).astype(np.float32)


def _normalised(w, s):
    """w / s, 0 in all-zero columns (s = 0)."""
    return w / np.where(s == 0, 1, s)


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
    live = s != 0
    np.testing.assert_allclose(q[:, live] / s[live], d[a[:, live], 0],
                               rtol=1e-6)
    # An all-zero channel stays exactly (+)0.
    assert np.all(w[:, ~live] == 0)
    assert not np.any(np.signbit(q[:, ~live]) | (q[:, ~live] != 0))
    num_pruned = quantizer.num_pruned(w.size)
    if num_pruned:
        assert np.all(d[0] == 0)
        pruned = a == 0
        assert pruned.sum() == num_pruned
        assert np.all(q[pruned] == 0)
        # The smallest normalised weights of the whole tensor.
        x = np.abs(_normalised(w, s))
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
    assert s[2] == 0  # the all-zero column
    # The reference never sees the zero column: it must add nothing to the
    # seeds or the cluster means. Pruning takes its weights first (|0| is
    # the smallest), so the rest of the table prunes that many fewer.
    live = np.arange(w.shape[1]) != 2
    x = (w[:, live] / s[live]).reshape(-1, 1)  # one table, row-major
    num_pruned = quantizer.num_pruned(w.size)
    live_pruned = num_pruned - w.shape[0] if num_pruned else 0
    assert live_pruned >= 0
    d = quantizer.seed(tf.constant(w)).numpy()
    np.testing.assert_array_equal(
        d, kmeans.seed_dictionary(tf.constant(x), k, quantizer.constraint,
                                  num_pruned).numpy())
    want_d, live_a = reference.step(x, d, quantizer.constraint, live_pruned)
    want_a = np.zeros(w.shape, np.int64)
    want_a[:, live] = live_a.reshape(w.shape[0], -1)
    if not num_pruned:
        # Assigned like any weight 0: to the entry nearest 0.
        want_a[:, 2] = reference.assign(np.zeros((1, 1)), d, 0)[0, 0]
    step = tf.function(quantizer.step, jit_compile=True)  # as the wrapper
    for got in (quantizer.step(tf.constant(w), tf.constant(d)),
                step(tf.constant(w), tf.constant(d))):
        got_d, got_a, got_q, finite = (t.numpy() for t in got)
        assert finite
        np.testing.assert_array_equal(got_a, want_a)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-7)
        # XLA may round the RMS differently from eager TF by an ulp.
        np.testing.assert_allclose(got_q, s[None, :] * got_d[got_a, 0], rtol=1e-6)
        np.testing.assert_array_equal(got_q[:, 2], 0)
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
    assert np.any(s == 0) and len(np.unique(s)) == state.channels
    # Columns of to_matrix are the output channels: the zeroed one's scale
    # is 0 and its quantised weights are 0.
    zero = np.flatnonzero(np.all(w == 0, axis=0))
    assert zero.size == 1 and s[zero[0]] == 0
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
    np.testing.assert_allclose(s, [np.sqrt(12.5e60), 1.0, 0.0], rtol=1e-6)
    assert np.all(np.isfinite(s))


# -- an all-zero channel (issue 24) --------------------------------------------

def _issue_model(activation=None, outputs=10):
    """Conv2D -> Flatten -> fc1 Dense(32) -> fc2, fc1's channel 5 all zero.

    `outputs=None` ends the model at fc1, so its channel 5 is an output.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = L.Dense(32, activation=activation, name="fc1")(L.Flatten()(x))
    if outputs:
        x = L.Dense(outputs, name="fc2")(x)
    model = keras.Model(inputs, x)
    layer = model.get_layer("fc1")
    kernel, bias = layer.get_weights()
    kernel[:, 5] = 0
    bias[5] = 0
    layer.set_weights([kernel, bias])
    return model


# Only fc1 is quantised: each LUT-Q layer costs an XLA compile.
_ONLY_FC1 = ["conv", "fc2"]


def _zero_channel_state(model):
    """fc1's `[M, C]` W, Q and s; checks the scaled invariants."""
    layer = model.get_layer("fc1")
    state = layer.tensor_states[0]
    w, _, _, q, s = _invariants(state, layer.quantizer)
    return w, q, s


@pytest.mark.parametrize("constraint", ["none", "pow2"])
def test_zero_channel_stays_zero_at_quantize_time(constraint):
    # Was: Q[:, 5] a constant -0.308 (free) or -0.25 (pow2), 4.5x the
    # layer's mean |W|, from s_5 = 1.
    model = lutq_tf.quantize_model(_issue_model(), bits=2,
                                   channel_scales=True, constraint=constraint,
                                   skip=_ONLY_FC1)
    w, q, s = _zero_channel_state(model)
    assert s[5] == 0 and np.all(s[np.arange(32) != 5] > 0)
    np.testing.assert_array_equal(q[:, 5], 0)
    # The zero channel adds nothing to the dictionary: the same fit as
    # without it (up to the order of the float32 cluster sums).
    quantizer = model.get_layer("fc1").quantizer
    want_d, _, want_q = quantizer.initialize(
        tf.constant(np.delete(w, 5, axis=1)))
    d = model.get_layer("fc1").tensor_states[0].dictionary.numpy()
    np.testing.assert_allclose(d, want_d.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.delete(q, 5, axis=1), want_q.numpy(),
                               rtol=1e-5)


def test_zero_channel_stays_zero_after_fit():
    # A dead ReLU unit (zero weights and bias): its gradient is 0, so W's
    # column stays 0 and so must Q's. Was: W's column 0 after fit, Q's a
    # non-zero constant (s_5 = 1).
    x, y = _data()
    model = lutq_tf.quantize_model(_issue_model("relu"), bits=2,
                                   channel_scales=True, skip=_ONLY_FC1)
    _compile(model)
    before = model.get_layer("fc1").layer.kernel.numpy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    w, q, s = _zero_channel_state(model)
    assert np.any(w != before)  # trained
    np.testing.assert_array_equal(w[:, 5], 0)
    np.testing.assert_array_equal(q[:, 5], 0)
    assert s[5] == 0


def _fully_connected_weight_scales(path):
    """The quantisation scales of the weight input of each FULLY_CONNECTED
    op of a .tflite file (after DECODE insertion: the decoded tensor's)."""
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    subgraph = model.subgraphs[0]
    scales = []
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == (
                schema.BuiltinOperator.FULLY_CONNECTED):
            quantization = subgraph.tensors[op.inputs[1]].quantization
            scales.append(np.asarray(quantization.scale))
    return scales


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "float32"])
def test_zero_channel_exports_as_zero(tmp_path, quantize):
    # fc1 is the output, so its channel 5 (zero weights and bias) must come
    # out exactly 0 on TFLM for every input. Was: the file held s_5 * d[A].
    from test_export import tflm_outputs

    import tflite_export

    model = lutq_tf.quantize_model(_issue_model(outputs=None), bits=2,
                                   channel_scales=True, skip=["conv"])
    data = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(
        np.float32)
    result = tflite_export.export(model, tmp_path / "m.tflite",
                                  representative_data=data, quantize=quantize)
    assert result.verification.bit_exact
    (fc1,) = [t for t in result.tensors if t.layer == "fc1"]
    assert fc1.compressed, fc1.note
    got = tflm_outputs(result.path, data)
    np.testing.assert_array_equal(got[:, 5], 0)
    assert np.all(np.any(got != 0, axis=0)[np.arange(32) != 5])
    np.testing.assert_array_equal(model.predict(data, verbose=0)[:, 5], 0)
    if quantize == "int8":
        # Code 0 with a positive scale; the zero channel costs no index bit
        # (per-channel tables beat a shared table of K + 1 codes).
        (scales,) = _fully_connected_weight_scales(result.path)
        assert scales.shape == (32,) and np.all(scales > 0)
        assert fc1.index_bits == 2
