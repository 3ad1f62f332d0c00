"""quantize_model / strip_model / summary on every supported layer type."""

import keras
import numpy as np
import pytest

import lutq_tf

L = keras.layers

LAYER_CASES = {
    "dense": ((6,), lambda: L.Dense(5, name="q")),
    "conv1d": ((8, 3), lambda: L.Conv1D(4, 3, name="q")),
    "conv2d": ((6, 6, 3), lambda: L.Conv2D(4, 3, name="q")),
    "conv3d": ((4, 4, 4, 2), lambda: L.Conv3D(3, 2, name="q")),
    "depthwise2d": ((6, 6, 3),
                    lambda: L.DepthwiseConv2D(3, depth_multiplier=2,
                                              name="q")),
    "depthwise1d": ((8, 3), lambda: L.DepthwiseConv1D(3, name="q")),
    "separable2d": ((6, 6, 3), lambda: L.SeparableConv2D(4, 3, name="q")),
    "separable1d": ((8, 3), lambda: L.SeparableConv1D(4, 3, name="q")),
    "conv1d_transpose": ((5, 3), lambda: L.Conv1DTranspose(4, 3, name="q")),
    "conv2d_transpose": ((4, 4, 3),
                         lambda: L.Conv2DTranspose(4, 3, strides=2,
                                                   name="q")),
}


def _model(input_shape, make_layer):
    inputs = keras.Input(input_shape)
    x = make_layer()(inputs)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def _values_per_table(kernel, channel_axes, per_channel):
    if not per_channel:
        return [len(np.unique(kernel))]
    rank = kernel.ndim
    axes = [rank + a for a in channel_axes]
    others = [a for a in range(rank) if a not in axes]
    matrix = np.transpose(kernel, others + axes).reshape(
        -1, int(np.prod([kernel.shape[a] for a in axes])))
    return [len(np.unique(matrix[:, c])) for c in range(matrix.shape[1])]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_every_layer_type_trains_with_at_most_k_values(case, per_channel):
    input_shape, make_layer = LAYER_CASES[case]
    model = _model(input_shape, make_layer)
    x = np.random.default_rng(0).normal(size=(16, *input_shape))
    y = np.random.default_rng(1).integers(0, 3, 16)
    quantized = lutq_tf.quantize_model(model, num_values=3,
                                       per_channel=per_channel,
                                       layer_names=["q"])
    wrapper = quantized.get_layer("q")
    assert isinstance(wrapper, lutq_tf.LUTQWrapper)
    assert not isinstance(quantized.get_layer("head"), lutq_tf.LUTQWrapper)
    weights_before = [w.numpy().copy() for w in wrapper.layer.weights]
    quantized.compile("sgd", "sparse_categorical_crossentropy")
    quantized.fit(x, y, epochs=2, batch_size=8, verbose=0)
    # W are the trainable variables and receive the gradient.
    assert any(not np.array_equal(a, w.numpy())
               for a, w in zip(weights_before, wrapper.layer.weights))
    stripped = lutq_tf.strip_model(quantized)
    assert not lutq_tf.is_quantized(stripped)
    inner = stripped.get_layer("q")
    for spec in lutq_tf.registry.quantizable_tensors(inner):
        kernel = getattr(inner, spec.attribute).numpy()
        counts = _values_per_table(kernel, spec.channel_axes, per_channel)
        assert max(counts) <= 3
        np.testing.assert_array_equal(
            kernel, wrapper.quantized_tensors[spec.attribute][2])
    np.testing.assert_array_equal(quantized.predict(x, verbose=0),
                                  stripped.predict(x, verbose=0))


def test_embedding_is_quantised():
    inputs = keras.Input((5,), dtype="int32")
    x = L.Embedding(50, 8, name="emb")(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    quantized = lutq_tf.quantize_model(model, bits=2, layer_names=["emb"])
    stripped = lutq_tf.strip_model(quantized)
    assert len(np.unique(stripped.get_layer("emb").embeddings.numpy())) <= 4
    tokens = np.random.default_rng(0).integers(0, 50, (4, 5))
    np.testing.assert_array_equal(quantized.predict(tokens, verbose=0),
                                  stripped.predict(tokens, verbose=0))


def test_keeps_names_inputs_outputs_and_pretrained_function():
    inputs = keras.Input((10,), name="features")
    hidden = L.Dense(64, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, L.Dense(4, name="out")(hidden), name="net")
    quantized = lutq_tf.quantize_model(model, bits=6)
    assert quantized.name == "net"
    assert [l.name for l in quantized.layers] == [
        l.name for l in model.layers]
    assert quantized.input_shape == model.input_shape
    assert quantized.output_shape == model.output_shape
    x = np.random.default_rng(0).normal(size=(32, 10))
    # 64 values per tensor approximate the pretrained function closely.
    want, got = model.predict(x, verbose=0), quantized.predict(x, verbose=0)
    assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
    # The float model is untouched.
    assert not lutq_tf.is_quantized(model)


def test_sequential_and_nested_models():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(8, name="inner_a"),
                              L.Dense(8, name="inner_b")], name="block")
    inputs = keras.Input((6,))
    outputs = L.Dense(2, name="top")(inner(inputs))
    model = keras.Model(inputs, outputs)
    quantized = lutq_tf.quantize_model(model, bits=2, skip=["inner_b"])
    names = [l.name for l in lutq_tf.lutq_layers(quantized)]
    assert names == ["inner_a", "top"]
    seq = keras.Sequential([keras.Input((6,)), L.Dense(8, name="a"),
                            L.Dense(2, name="b")])
    qseq = lutq_tf.quantize_model(seq, bits=1)
    assert isinstance(qseq, lutq_tf.LUTQSequential)
    assert isinstance(lutq_tf.strip_model(qseq), keras.Sequential)
    x = np.random.default_rng(0).normal(size=(4, 6))
    np.testing.assert_array_equal(
        quantized.predict(x, verbose=0),
        lutq_tf.strip_model(quantized).predict(x, verbose=0))


def test_selection_and_overrides():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, name="small")(inputs)  # 36 weights
    x = L.Conv2D(8, 3, name="conv")(x)
    x = L.Flatten()(x)
    x = L.Dense(16, name="fc")(x)
    model = keras.Model(inputs, L.Dense(3, name="logits")(x))
    quantized = lutq_tf.quantize_model(
        model, bits=3, min_weights=100, layer_types=(L.Conv2D, L.Dense),
        overrides={"fc": {"bits": 2, "constraint": "pow2"},
                   "logits": None})
    by_name = {l.name: l.quantizer for l in lutq_tf.lutq_layers(quantized)}
    assert sorted(by_name) == ["conv", "fc"]
    assert by_name["conv"].num_values == 8
    assert by_name["fc"].num_values == 4
    assert isinstance(by_name["fc"].constraint, lutq_tf.constraints.PowerOfTwo)
    only_dense = lutq_tf.quantize_model(model, bits=2, layer_types=L.Dense)
    assert [l.name for l in lutq_tf.lutq_layers(only_dense)] == [
        "fc", "logits"]


def test_summary_reports_each_tensor():
    inputs = keras.Input((8, 8, 3))
    x = L.SeparableConv2D(8, 3, name="sep")(inputs)
    x = L.Flatten()(x)
    model = keras.Model(inputs, L.Dense(4, name="fc")(x))
    quantized = lutq_tf.quantize_model(
        model, bits=3, overrides={"fc": {"prune_rate": 0.5}})
    printed = []
    rows = lutq_tf.summary(quantized, print_fn=printed.append)
    assert [(r.layer, r.tensor) for r in rows] == [
        ("sep", "depthwise_kernel"), ("sep", "pointwise_kernel"),
        ("fc", "kernel")]
    fc = rows[2]
    assert fc.num_values == 8 and fc.index_bits == 3
    assert fc.weight_count == 6 * 6 * 8 * 4
    assert fc.prune_rate == pytest.approx(0.5)
    assert fc.zeros >= fc.prune_rate
    assert rows[0].prune_rate == 0  # no pruning configured
    assert 2 <= fc.in_use <= 8
    assert "sep" in printed[0] and "pointwise_kernel" in printed[0]


def test_mixin_and_wrapper_on_a_subclassed_model():
    class Net(lutq_tf.LUTQModelMixin, keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = lutq_tf.LUTQWrapper(
                L.Dense(16, activation="relu"),
                lutq_tf.LUTQuantizer(bits=2))
            self.out = L.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    net = Net()
    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 32)
    net.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    net.fit(x, y, epochs=3, batch_size=8, verbose=0)
    d, a, q = net.hidden.quantized_tensors["kernel"]
    w = net.hidden.layer.kernel.numpy()
    # The k-means step ran after the last optimizer step: d holds the means
    # of the weights assigned to each entry.
    np.testing.assert_array_equal(q, d.ravel()[a])
    for entry in np.unique(a):
        np.testing.assert_allclose(d.ravel()[entry], w[a == entry].mean(),
                                   rtol=1e-4, atol=1e-6)
    assert len(np.unique(q)) <= 4


@pytest.mark.parametrize("k, expected", [(2, 2), (3, 3)])
def test_binary_and_ternary_networks(k, expected):
    model = keras.Sequential([keras.Input((20,)), L.Dense(16, name="a"),
                              L.Dense(4, name="b")])
    quantized = lutq_tf.quantize_model(model, num_values=k,
                                       constraint="uniform")
    x = np.random.default_rng(0).normal(size=(32, 20))
    y = np.random.default_rng(1).normal(size=(32, 4))
    quantized.compile("adam", "mse")
    quantized.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for layer in lutq_tf.lutq_layers(quantized):
        values = np.unique(layer.quantized_tensors["kernel"][2])
        assert len(values) == expected
        # Symmetric about 0: +-a (binary) or {-a, 0, a} (ternary).
        np.testing.assert_array_equal(values, -values[::-1])
        if k == 3:
            assert values[1] == 0
    # Ternary zeros are values, not pruning: the summary tells them apart.
    for row in lutq_tf.summary(quantized, print_fn=None):
        assert row.prune_rate == 0
        assert (row.zeros > 0) == (k == 3)


def test_channel_matrix_puts_the_output_channel_last():
    from lutq_tf import registry

    array = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    depthwise = registry.channel_matrix(array, (-2, -1))  # [.., in, multiplier]
    assert depthwise.shape == (6, 20)
    np.testing.assert_array_equal(depthwise[:, 1 * 5 + 2], array[:, :, 1, 2].ravel())
    transposed = registry.channel_matrix(array, (-2,))  # [.., filters, in]
    assert transposed.shape == (30, 4)
    np.testing.assert_array_equal(transposed[:, 3], array[:, :, 3, :].ravel())
    layer = keras.layers.Conv2DTranspose(4, 3)
    assert registry.channel_axes(layer, "kernel") == (-2,)
    assert registry.channel_axes(keras.layers.Layer(), "kernel") == (-1,)
