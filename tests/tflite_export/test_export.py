"""Tests of tflite_export: LUT-Q models to LUT-compressed TFLM models.

The models are "stripped" LUT-Q models built by hand: plain Keras layers whose
kernels hold K values per tensor (or per output channel). Every export is
checked on TFLM by the exporter (compressed vs uncompressed twin, bit-exact);
the tests also rerun the written file on TFLM themselves.
"""

import os
import sys
import types

import keras
import numpy as np
import pytest

import lutq_tf
import tflite_export
from tflite_export.pipeline import compress as compress_lib
from tflite_export.pipeline import lut_tensors

# -- Building stripped LUT-Q models -----------------------------------------


def _dictionary(k, rng):
    # Evenly spaced: with k <= 128 the values stay >= 2 int8 steps apart, so
    # quantisation keeps them distinct.
    return (np.linspace(-1.0, 1.0, k) * rng.uniform(0.2, 0.6)).astype(np.float32)


def _assignment(n, k, rng):
    # Every value used at least once when n >= k.
    a = np.concatenate([np.arange(k), rng.integers(0, k, max(0, n - k))])[:n]
    rng.shuffle(a)
    return a


def _tables_view(layer, attribute, w):
    """`w` as [elements, output channels], and the inverse."""
    if attribute == "depthwise_kernel" or isinstance(layer, keras.layers.DepthwiseConv2D):
        return w.reshape(-1, w.shape[-2] * w.shape[-1]), lambda t: t.reshape(w.shape)
    if isinstance(layer, keras.layers.Conv2DTranspose):
        moved = np.moveaxis(w, -2, -1)
        return moved.reshape(-1, moved.shape[-1]), lambda t: np.moveaxis(
            t.reshape(moved.shape), -1, -2
        )
    return w.reshape(-1, w.shape[-1]), lambda t: t.reshape(w.shape)


def set_lut(layer, attribute, k, per_channel, rng):
    """Makes a layer's kernel a LUT: K values per tensor or per channel."""
    variable = getattr(layer, attribute)
    w = np.array(variable.numpy())
    if per_channel:
        tables, back = _tables_view(layer, attribute, w)
        tables = tables.copy()
        for c in range(tables.shape[1]):
            tables[:, c] = _dictionary(k, rng)[_assignment(tables.shape[0], k, rng)]
        w = back(tables)
    else:
        w = _dictionary(k, rng)[_assignment(w.size, k, rng)].reshape(w.shape)
    variable.assign(w)


def _head(x):
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.layers.Dense(10, name="head")(x)


# kind -> (builder, [(layer, attribute, TFLite op)] made LUT)
def _build(kind):
    if kind == "dense":
        inp = keras.Input((96,))
        x = keras.layers.Dense(96, activation="relu", name="fc")(inp)
        luts = [("fc", "kernel", "FULLY_CONNECTED")]
        out = keras.layers.Dense(10, name="head")(x)
    elif kind == "conv2d":
        inp = keras.Input((8, 8, 16))
        x = keras.layers.Conv2D(32, 3, activation="relu", name="conv")(inp)
        luts = [("conv", "kernel", "CONV_2D")]
        out = _head(x)
    elif kind == "depthwise":
        inp = keras.Input((8, 8, 48))
        x = keras.layers.DepthwiseConv2D(7, depth_multiplier=2, name="dw")(inp)
        luts = [("dw", "kernel", "DEPTHWISE_CONV_2D")]
        out = _head(x)
    elif kind == "separable":
        inp = keras.Input((8, 8, 48))
        x = keras.layers.SeparableConv2D(32, 7, depth_multiplier=2, name="sep")(inp)
        luts = [
            ("sep", "depthwise_kernel", "DEPTHWISE_CONV_2D"),
            ("sep", "pointwise_kernel", "CONV_2D"),
        ]
        out = _head(x)
    elif kind == "conv2d_transpose":
        inp = keras.Input((4, 4, 16))
        x = keras.layers.Conv2DTranspose(32, 3, strides=2, name="tconv")(inp)
        luts = [("tconv", "kernel", "TRANSPOSE_CONV")]
        out = _head(x)
    elif kind == "conv_bn":
        inp = keras.Input((8, 8, 16))
        x = keras.layers.Conv2D(32, 3, use_bias=False, name="conv")(inp)
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.ReLU()(x)
        luts = [("conv", "kernel", "CONV_2D")]
        out = _head(x)
    else:
        raise ValueError(kind)
    return keras.Model(inp, out), luts


def make_model(kind, k, per_channel, seed=0):
    rng = np.random.default_rng(seed)
    model, luts = _build(kind)
    for name, attribute, _ in luts:
        set_lut(model.get_layer(name), attribute, k, per_channel, rng)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Non-trivial statistics, so folding really rescales channels.
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 2.0, gamma.shape).astype(np.float32),
                rng.normal(0, 0.1, beta.shape).astype(np.float32),
                rng.normal(0, 0.1, mean.shape).astype(np.float32),
                rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
            ])
    data = rng.normal(size=(32,) + tuple(model.inputs[0].shape[1:])).astype(np.float32)
    return model, luts, data


# -- Running the written file on TFLM, independently of the exporter --------


def tflm_outputs(path, inputs):
    from tflite_micro import runtime

    with open(path, "rb") as f:
        model_bytes = f.read()
    interpreter = runtime.Interpreter.from_bytes(model_bytes, arena_size=512 * 1024)
    in_details = interpreter.get_input_details(0)
    out_details = interpreter.get_output_details(0)
    outputs = []
    for x in inputs:
        x = x[None]
        if in_details["dtype"] == np.int8:
            q = in_details["quantization_parameters"]
            x = np.clip(np.round(x / q["scales"][0]) + q["zero_points"][0], -128, 127)
        interpreter.set_input(x.astype(in_details["dtype"]), 0)
        interpreter.invoke()
        y = interpreter.get_output(0).astype(np.float64)
        if out_details["dtype"] == np.int8:
            q = out_details["quantization_parameters"]
            y = (y - q["zero_points"][0]) * q["scales"][0]
        outputs.append(y[0])
    return np.stack(outputs)


def decode_op_count(path):
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    decode = [
        i for i, c in enumerate(model.operatorCodes)
        if c.customCode in (b"TFLM_DECODE", "TFLM_DECODE")
    ]
    return sum(op.opcodeIndex in decode for op in model.subgraphs[0].operators)


def _bits(n):
    return max(1, (n - 1).bit_length())


def check_written(result, model, data, min_top1):
    """Checks the written file against the report and against Keras."""
    assert os.path.getsize(result.path) == result.size_bytes
    assert result.anatomy.total == result.size_bytes
    assert result.verification.bit_exact
    assert result.arena_bytes > 0 and result.arena_bytes % 16 == 0
    compressed = result.compressed_tensors
    assert decode_op_count(result.path) >= len(compressed) > 0
    assert result.size_bytes < result.slim_baseline_bytes <= result.baseline_bytes
    got = tflm_outputs(result.path, data)
    expected = model.predict(data, verbose=0)
    top1 = np.mean(got.argmax(-1) == expected.argmax(-1))
    assert top1 >= min_top1
    assert result.verification.top1_agreement == pytest.approx(top1)
    assert result.verification.max_abs_diff == pytest.approx(
        np.abs(got - expected).max(), rel=1e-5, abs=1e-6
    )


# -- Layer types x quantisation x dictionary kind ---------------------------

LAYER_CASES = [
    # kind, quantize, per-channel dictionary, K
    ("dense", "int8", True, 16),
    ("dense", "float32", False, 8),
    ("conv2d", "int8", False, 4),
    ("conv2d", "float32", False, 16),
    ("depthwise", "int8", True, 8),
    ("depthwise", "float32", False, 4),
    ("separable", "int8", True, 4),
    ("separable", "float32", False, 8),
    ("conv2d_transpose", "int8", False, 16),
    # Float tables are per tensor: 32 channels x K=4 = 128 values, the most.
    ("conv2d_transpose", "float32", True, 4),
    ("conv_bn", "int8", True, 8),
    ("conv_bn", "int8", False, 8),
    ("dense", "int8", False, 4),
    ("conv_bn", "float32", False, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,quantize,per_channel,k", LAYER_CASES)
def test_layer_exports_bit_exact_and_agrees_with_keras(
    tmp_path, kind, quantize, per_channel, k
):
    model, luts, data = make_model(kind, k, per_channel)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, quantize=quantize
    )
    # Exactly the LUT kernels are found, each on the right op.
    reported = {(t.layer, t.tensor): t for t in result.tensors}
    assert set(reported) == {(name, attr) for name, attr, _ in luts}
    folded = kind == "conv_bn"
    for name, attribute, op in luts:
        t = reported[(name, attribute)]
        assert t.op == op
        assert t.num_values == k
        assert t.compressed, t.note
        assert t.bytes_after < t.bytes_before
        if quantize == "int8":
            # Weights are per-channel int8 here (the head is not LUT-Q), so
            # tables follow: axis 3 for depthwise, 0 otherwise; one table
            # shared by all channels when they draw on one dictionary.
            axis = 3 if op == "DEPTHWISE_CONV_2D" else 0
            mode = "per-channel" if per_channel else "shared"
            assert t.table_mode == f"{mode}(axis={axis})"
            assert t.codes <= k
        else:
            # TFLM decodes float tensors with one table only.
            assert t.table_mode == "per-tensor"
            if folded or per_channel:
                # K values per channel, all in one table.
                assert k < t.codes <= 128
                assert ("batch norm folded" in t.note) == folded
            else:
                assert t.codes == k
        assert t.index_bits == _bits(t.codes)
    check_written(result, model, data, min_top1=0.8 if quantize == "int8" else 1.0)
    if quantize == "float32":
        assert result.verification.max_abs_diff < 1e-4


# -- Index widths 1 to 7 ----------------------------------------------------

BITS_TO_K = {1: 2, 2: 3, 3: 5, 4: 16, 5: 17, 6: 64, 7: 128}


@pytest.mark.slow
@pytest.mark.parametrize("bits", sorted(BITS_TO_K))
def test_index_bits_1_to_7(tmp_path, bits):
    k = BITS_TO_K[bits]
    rng = np.random.default_rng(bits)
    inp = keras.Input((96,))
    x = keras.layers.Dense(96, activation="relu", name="fc")(inp)
    out = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inp, out)
    for layer in model.layers[1:]:
        set_lut(layer, "kernel", k, False, rng)
    data = rng.normal(size=(32, 96)).astype(np.float32)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    # Every weight layer holds a per-tensor dictionary: per-tensor int8
    # weights, one table, K codes, ceil(log2 K) bits.
    assert result.weight_quantization == "per_tensor"
    fc = {t.layer: t for t in result.tensors}["fc"]
    assert (fc.codes, fc.index_bits, fc.table_mode, fc.tables) == (
        k, bits, "per-tensor", 1
    )
    assert fc.compressed
    expected_after = -(-96 * 96 * bits // 8) + 16 + k
    assert fc.bytes_after == expected_after
    check_written(result, model, data, min_top1=0.8)


# -- Weight quantisation choice ----------------------------------------------


def _two_dense(k, per_channel, seed=0):
    rng = np.random.default_rng(seed)
    inp = keras.Input((64,))
    x = keras.layers.Dense(64, activation="relu", name="fc")(inp)
    out = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inp, out)
    set_lut(model.get_layer("fc"), "kernel", k, per_channel, rng)
    set_lut(model.get_layer("head"), "kernel", k, per_channel, rng)
    return model, rng.normal(size=(32, 64)).astype(np.float32)


@pytest.mark.slow
def test_per_channel_dictionaries_get_per_channel_tables(tmp_path):
    model, data = _two_dense(4, per_channel=True)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    assert result.weight_quantization == "per_channel"
    fc = {t.layer: t for t in result.tensors}["fc"]
    assert fc.table_mode == "per-channel(axis=0)" and fc.tables == 64
    assert fc.codes == 4 and fc.index_bits == 2
    assert fc.compressed
    check_written(result, model, data, min_top1=0.8)


@pytest.mark.slow
def test_per_tensor_dictionary_tables_smaller_than_forced_per_channel(tmp_path):
    model, data = _two_dense(4, per_channel=False)
    auto = tflite_export.export(model, tmp_path / "a.tflite", representative_data=data)
    forced = tflite_export.export(
        model, tmp_path / "b.tflite", representative_data=data,
        weight_quantization="per_channel", shared_tables=False,
    )
    shared = tflite_export.export(
        model, tmp_path / "c.tflite", representative_data=data,
        weight_quantization="per_channel",
    )
    a = {t.layer: t for t in auto.tensors}["fc"]
    b = {t.layer: t for t in forced.tensors}["fc"]
    c = {t.layer: t for t in shared.tensors}["fc"]
    assert (a.table_mode, a.tables) == ("per-tensor", 1)
    assert (b.table_mode, b.tables) == ("per-channel(axis=0)", 64)
    assert (c.table_mode, c.tables, c.codes) == ("shared(axis=0)", 1, 4)
    # Same indices, but 64 tables of 4 instead of one.
    assert b.bytes_after - a.bytes_after == 63 * 4
    assert c.bytes_after == a.bytes_after
    assert auto.size_bytes < forced.size_bytes
    assert shared.size_bytes < forced.size_bytes
    for result in (auto, forced, shared):
        assert result.verification.bit_exact


@pytest.mark.slow
def test_folded_batch_norm_gets_one_shared_table(tmp_path):
    # Every weight layer LUT-Q per tensor: per-tensor weights are tried first,
    # but the folded batch norm spreads K values over 32 channels; per-channel
    # weights with rewritten scales give every channel the same codes.
    model, _, data = make_model("conv_bn", 4, per_channel=False)
    set_lut(model.get_layer("head"), "kernel", 4, False, np.random.default_rng(1))
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    assert result.weight_quantization in ("dense_per_tensor", "per_channel")
    conv = {t.layer: t for t in result.tensors}["conv"]
    assert (conv.table_mode, conv.tables) == ("shared(axis=0)", 1)
    assert conv.codes <= 4 and conv.index_bits == 2
    unshared = tflite_export.export(
        model, tmp_path / "u.tflite", representative_data=data, shared_tables=False
    )
    conv = {t.layer: t for t in unshared.tensors}["conv"]
    assert (conv.table_mode, conv.tables) == ("per-channel(axis=0)", 32)
    assert result.size_bytes < unshared.size_bytes
    with pytest.raises(tflite_export.ExportError, match="per_channel"):
        tflite_export.export(
            model, tmp_path / "n.tflite", representative_data=data,
            weight_quantization="per_tensor",
        )
    assert not os.path.exists(tmp_path / "n.tflite")


@pytest.mark.slow
@pytest.mark.parametrize("kind,per_channel", [("conv_bn", False), ("dense", True)])
def test_float32_table_over_128_values_is_an_error(tmp_path, kind, per_channel):
    # conv_bn: a folded batch norm, 8 values x 32 channels; dense: per-channel
    # dictionaries, 8 values x 96 channels. Float tensors get one table.
    model, _, _ = make_model(kind, 8, per_channel=per_channel)
    with pytest.raises(tflite_export.ExportError, match="quantize='int8'"):
        tflite_export.export(model, tmp_path / "m.tflite", quantize="float32")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_layers_of_equal_shape_map_to_their_own_tensors(tmp_path):
    # Same shapes, different K, misleading names: values decide the mapping.
    rng = np.random.default_rng(3)
    inp = keras.Input((64,))
    x = keras.layers.Dense(64, activation="relu", name="second")(inp)
    x = keras.layers.Dense(64, activation="relu", name="first")(x)
    out = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inp, out)
    set_lut(model.get_layer("second"), "kernel", 4, False, rng)
    set_lut(model.get_layer("first"), "kernel", 32, False, rng)
    data = rng.normal(size=(16, 64)).astype(np.float32)
    result = tflite_export.export(model, tmp_path / "m.tflite", quantize="float32")
    by_layer = {t.layer: t for t in result.tensors}
    assert set(by_layer) == {"first", "second"}
    assert (by_layer["second"].codes, by_layer["second"].index_bits) == (4, 2)
    assert (by_layer["first"].codes, by_layer["first"].index_bits) == (32, 5)
    assert by_layer["second"].tflite_name != by_layer["first"].tflite_name
    check_written(result, model, data, min_top1=1.0)


# -- Report, arena, models without LUTs --------------------------------------


@pytest.mark.slow
def test_report_table_and_arena(tmp_path):
    model, _, data = make_model("conv2d", 4, per_channel=False)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    text = str(result)
    assert text == result.table()
    # The head gives logits, not probabilities: judged as a regression.
    for needle in ("conv", "CONV_2D", "shared(axis=0)", "bit-exact",
                   str(result.size_bytes), str(result.baseline_bytes),
                   str(result.slim_baseline_bytes), str(result.arena_bytes),
                   "information limit", "packed indices", "SNR"):
        assert needle in text
    # The arena is the smallest that runs: 16 bytes less fails.
    from tflite_micro import runtime

    with open(result.path, "rb") as f:
        model_bytes = f.read()
    details_shape = (1, 8, 8, 16)
    interpreter = runtime.Interpreter.from_bytes(model_bytes, arena_size=result.arena_bytes)
    interpreter.set_input(np.zeros(details_shape, np.int8), 0)
    interpreter.invoke()
    with pytest.raises(RuntimeError):
        runtime.Interpreter.from_bytes(model_bytes, arena_size=result.arena_bytes - 16)
    # Decoded weights live in the arena...
    assert result.arena_bytes > result.baseline_arena_bytes
    # ...unless TFLM decodes into an alternate region: the main arena then
    # shrinks, and that region with 16 B less does not run the model.
    main, region = result.alt_decompression_arena()
    assert region >= result.decode_buffer_bytes > 0
    assert main < result.arena_bytes
    runs = runtime.Interpreter.from_bytes(model_bytes, arena_size=main,
                                          alt_decompression_memory_size=region)
    runs.set_input(np.zeros(details_shape, np.int8), 0)
    runs.invoke()
    with pytest.raises(RuntimeError):
        small = runtime.Interpreter.from_bytes(model_bytes, arena_size=main + 4096,
                                               alt_decompression_memory_size=region - 16)
        small.set_input(np.zeros(details_shape, np.int8), 0)
        small.invoke()


@pytest.mark.slow
def test_model_without_lut_layers_exports_uncompressed(tmp_path):
    inp = keras.Input((16,))
    out = keras.layers.Dense(10)(keras.layers.Dense(32, activation="relu")(inp))
    model = keras.Model(inp, out)
    data = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    assert result.tensors == [] and result.compressed_tensors == []
    assert result.size_bytes == result.slim_baseline_bytes < result.baseline_bytes
    assert decode_op_count(result.path) == 0
    assert "Nothing was compressed" in result.table()
    assert any("No LUT-Q layers" in n for n in result.notes)
    assert result.verification.bit_exact


@pytest.mark.slow
def test_small_tensor_stays_uncompressed_and_report_says_so(tmp_path):
    rng = np.random.default_rng(0)
    inp = keras.Input((4,))
    x = keras.layers.Dense(4, name="tiny")(inp)
    out = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inp, out)
    set_lut(model.get_layer("tiny"), "kernel", 2, False, rng)
    result = tflite_export.export(model, tmp_path / "m.tflite", quantize="float32")
    (tiny,) = result.tensors
    assert not tiny.compressed and tiny.bytes_after == tiny.bytes_before
    assert "kept uncompressed" in tiny.note
    assert result.size_bytes == result.slim_baseline_bytes
    assert result.verification.inputs == "random"


# -- LUT-Q models (through lutq_tf's interface) -----------------------------


class _Row(types.SimpleNamespace):
    pass


def _fake_lutq(monkeypatch, plain, rows):
    monkeypatch.setattr(lut_tensors.lutq_tf, "is_quantized", lambda model: True)
    monkeypatch.setattr(lut_tensors.lutq_tf, "summary_rows", lambda model: rows)
    monkeypatch.setattr(lut_tensors.lutq_tf, "strip_model", lambda model: plain)


def _row(layer, k, tensor="kernel", per_channel=False):
    return _Row(layer=layer, tensor=tensor, num_values=k, per_channel=per_channel,
                in_use=k, prune_rate=0.0, index_bits=_bits(k), weight_count=0)


@pytest.mark.slow
def test_lutq_summary_decides_which_layers_and_k(tmp_path, monkeypatch):
    model, data = _two_dense(4, per_channel=False)
    # LUT-Q says only `fc` is quantised, with K=8 (4 entries in use).
    _fake_lutq(monkeypatch, model, [_row("fc", 8)])
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    (fc,) = result.tensors
    assert (fc.layer, fc.num_values, fc.codes) == ("fc", 8, 4)
    assert fc.compressed and fc.index_bits == 2


def test_lutq_k_over_128_is_an_error_saying_what_to_do(tmp_path, monkeypatch):
    model, data = _two_dense(4, per_channel=False)
    _fake_lutq(monkeypatch, model, [_row("fc", 256)])
    with pytest.raises(ValueError, match=r"'fc'.*K=256.*num_values <= 128"):
        tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)


@pytest.mark.slow
def test_real_lutq_model(tmp_path):
    rng = np.random.default_rng(0)
    inp = keras.Input((64,))
    x = keras.layers.Dense(64, activation="relu", name="fc")(inp)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(x))
    qmodel = lutq_tf.quantize_model(model, bits=3)
    data = rng.normal(size=(32, 64)).astype(np.float32)
    result = tflite_export.export(qmodel, tmp_path / "m.tflite", representative_data=data)
    rows = {r.layer: r for r in lutq_tf.summary(qmodel, print_fn=None)}
    reported = {t.layer: t for t in result.tensors}
    assert set(reported) == set(rows)
    for name, t in reported.items():
        assert t.num_values == rows[name].num_values
        assert t.codes <= rows[name].num_values
    assert reported["fc"].compressed and reported["fc"].index_bits <= 3
    check_written(result, lutq_tf.strip_model(qmodel), data, min_top1=0.8)


# -- Detection of LUT kernels in plain models (fast) -------------------------


def test_detects_per_tensor_and_per_channel_luts_and_skips_float_kernels():
    model, _ = _two_dense(8, per_channel=True)
    rng = np.random.default_rng(0)
    set_lut(model.get_layer("head"), "kernel", 5, False, rng)
    inp = keras.Input((64,))
    extra = keras.layers.Dense(3, name="float")(inp)  # glorot: all distinct
    whole = keras.Model(inp, [model(inp), extra])
    _, kernels, _ = lut_tensors.find_lut_kernels(whole)
    found = {(k.layer, k.num_values, k.per_channel) for k in kernels}
    assert found == {("fc", 8, True), ("head", 5, False)}


# -- Bad input ----------------------------------------------------------------


def _tiny(seed=0):
    return _two_dense(4, per_channel=False, seed=seed)


def test_int8_without_representative_data(tmp_path):
    model, _ = _tiny()
    with pytest.raises(ValueError, match=r"needs representative_data.*\(N, 64\)"):
        tflite_export.export(model, tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []


def test_representative_data_of_wrong_shape(tmp_path):
    model, data = _tiny()
    with pytest.raises(ValueError, match=r"representative_data has shape \(32, 63\)"):
        tflite_export.export(model, tmp_path / "m.tflite", representative_data=data[:, :63])
    with pytest.raises(ValueError, match="representative_data has shape"):
        tflite_export.export(model, tmp_path / "m.tflite", representative_data=data[0])


def test_representative_data_of_wrong_dtype(tmp_path):
    model, data = _tiny()
    with pytest.raises(ValueError, match="representative_data must be floating point.*uint8"):
        tflite_export.export(
            model, tmp_path / "m.tflite", representative_data=(data * 10).astype(np.uint8)
        )


def test_bad_arguments_name_the_argument(tmp_path):
    model, data = _tiny()
    with pytest.raises(ValueError, match="quantize must be one of"):
        tflite_export.export(model, tmp_path / "m.tflite", data, quantize="int4")
    with pytest.raises(ValueError, match="io_dtype"):
        tflite_export.export(model, tmp_path / "m.tflite", quantize="float32", io_dtype="int8")
    with pytest.raises(ValueError, match="weight_quantization"):
        tflite_export.export(model, tmp_path / "m.tflite", data, weight_quantization="x")
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        tflite_export.export("model.keras", tmp_path / "m.tflite", data)
    with pytest.raises(ValueError, match="min_agreement"):
        tflite_export.export(model, tmp_path / "m.tflite", data, min_agreement=90)
    assert os.listdir(tmp_path) == []


def test_output_path_that_cannot_be_written(tmp_path):
    model, data = _tiny()
    with pytest.raises(ValueError, match=r"path=.*does not exist"):
        tflite_export.export(model, tmp_path / "no" / "m.tflite", data)
    with pytest.raises(ValueError, match=r"path=.*is a directory"):
        tflite_export.export(model, tmp_path, data)
    with pytest.raises(ValueError, match=r"c_array=.*does not exist"):
        tflite_export.export(model, tmp_path / "m.tflite", data, c_array=tmp_path / "no" / "m.cc")


def test_tflite_micro_missing(tmp_path, monkeypatch):
    model, data = _tiny()
    for name in list(sys.modules):
        if name == "tflite_micro" or name.startswith("tflite_micro."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tflite_micro", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install lutq-tf\[export\]"):
        tflite_export.export(model, tmp_path / "m.tflite", data)
    assert os.listdir(tmp_path) == []


class _Cumprod(keras.layers.Layer):
    def call(self, x):
        import tensorflow as tf

        return tf.math.cumprod(x, axis=-1)


class _TopK(keras.layers.Layer):
    def call(self, x):
        return keras.ops.top_k(x, 3)[0]


@pytest.mark.slow
def test_layer_the_converter_cannot_take(tmp_path):
    inp = keras.Input((8,))
    model = keras.Model(inp, _Cumprod()(keras.layers.Dense(8)(inp)))
    with pytest.raises(tflite_export.ExportError, match="Cumprod"):
        tflite_export.export(model, tmp_path / "m.tflite", quantize="float32")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_layer_tflm_cannot_run(tmp_path):
    inp = keras.Input((8,))
    model = keras.Model(inp, _TopK()(keras.layers.Dense(8)(inp)))
    with pytest.raises(tflite_export.ExportError, match="TFLM has no kernel.*TOPK_V2"):
        tflite_export.export(model, tmp_path / "m.tflite", quantize="float32")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_failed_verification_raises_and_writes_nothing(tmp_path, monkeypatch):
    # Per-tensor tables on per-channel int8 weights decode to wrong values:
    # force that, and verification must catch it.
    model, _, data = make_model("conv2d", 4, per_channel=False)
    original = compress_lib.compress_model

    def wrong_mode(model_bytes, plans):
        for plan in plans:
            codes = len(np.unique(plan.match.weight.array))
            plan.mode, plan.axis, plan.shared = "per-tensor", None, None
            plan.codes, plan.index_bits = codes, _bits(codes)
        return original(model_bytes, plans)

    monkeypatch.setattr(compress_lib, "compress_model", wrong_mode)
    with pytest.raises(tflite_export.VerificationError, match="differ"):
        tflite_export.export(
            model, tmp_path / "m.tflite", representative_data=data,
            c_array=tmp_path / "m.cc",
        )
    assert os.listdir(tmp_path) == []
