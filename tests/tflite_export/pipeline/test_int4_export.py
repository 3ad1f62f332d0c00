"""Native int4 weights (`export(..., int4=...)`), run on TFLM.

Kernels are set to s*k (integer k in [-8, 7]) per output channel or per
tensor. The exporter verifies the int4 file bit-exact against its int8 twin
holding the same codes; the tests also rebuild that twin from the written
file themselves (INT4 unpacked to INT8, nothing else changed) and rerun both.
"""

import keras
import numpy as np
import pytest
from tensorflow.lite.python import schema_py_generated as schema
from test_export import tflm_outputs

import tflite_export
from tflite_export import exporter
from tflite_export.errors import ExportError
from tflite_export.pipeline import int4 as int4_lib

# -- Packing and fitting (no TFLM) -------------------------------------------


def test_pack_puts_element_2i_in_the_low_nibble_and_pads_odd_counts():
    assert int4_lib.pack(np.array([1, -2, 7], np.int8)) == bytes([0xE1, 0x07])
    assert int4_lib.pack(np.array([-8, 0], np.int8)) == bytes([0x08])
    codes = np.random.default_rng(0).integers(-8, 8, 101).astype(np.int8)
    packed = int4_lib.pack(codes)
    assert len(packed) == 51
    np.testing.assert_array_equal(int4_lib.unpack(packed, 101), codes)
    with pytest.raises(ValueError):
        int4_lib.pack(np.array([8], np.int8))


def test_fit_step_takes_float_noise_and_refuses_off_grid_values():
    k = np.array([-8, -3, 0, 5, 7])
    values = (0.0123 * k).astype(np.float32)
    s, codes = int4_lib.fit_step(values)
    np.testing.assert_array_equal(codes, k)
    assert s == pytest.approx(0.0123, rel=1e-6)
    # Coarsest step: {-2, 0, 4} * 0.1 is {-1, 0, 2} * 0.2.
    s, codes = int4_lib.fit_step(np.array([-0.2, 0.0, 0.4]))
    np.testing.assert_array_equal(codes, [-1, 0, 2])
    assert int4_lib.fit_step(np.array([-1.0, 0.3, 1.0])) is None
    assert int4_lib.fit_step(0.1 * np.array([-9.0, 1.0])) is None
    assert int4_lib.fit_step(0.1 * np.array([8.0, 1.0])) is None  # k = 8 > 7
    assert int4_lib.fit_step(0.1 * np.array([-8.0, 1.0])) is not None


def test_int4_is_refused_where_it_would_not_apply():
    with pytest.raises(ValueError, match="quantize='float32'"):
        exporter.check_combinations(quantize="float32", int4="auto")
    with pytest.raises(ValueError, match="ram_bytes"):
        exporter.check_combinations(int4="always", ram_bytes=100_000)
    exporter.check_combinations(int4="never", ram_bytes=100_000)
    exporter.check_combinations(int4="auto", target="cortex-m4-ref")


# -- Models -------------------------------------------------------------------


def _grid_kernel(shape, out_axis, rng, per_channel):
    """s*k values, s per output channel (or one), k in [-8, 7] (both ends used)."""
    k = rng.integers(-8, 8, shape)
    moved = np.moveaxis(k, out_axis, 0)
    moved[:, 0], moved[:, 1] = -8, 7
    channels = shape[out_axis]
    s = rng.uniform(0.005, 0.05, channels) if per_channel else np.full(channels, 0.02)
    view = [1] * len(shape)
    view[out_axis] = -1
    return (k * s.reshape(view)).astype(np.float32), k, s


def _model(kind, rng, grid=True):
    if kind == "conv2d":
        inp = keras.Input((6, 6, 4))
        layer = keras.layers.Conv2D(8, 3, activation="relu", name="conv")
        x = layer(inp)
        out_axis, per_channel = 3, True
    elif kind == "depthwise":
        inp = keras.Input((6, 6, 4))
        layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")
        x = layer(inp)
        out_axis, per_channel = None, True
    else:
        inp = keras.Input((24,))
        layer = keras.layers.Dense(32, activation="relu", name="fc")
        x = layer(inp)
        out_axis, per_channel = 1, False
    if kind != "dense":
        x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inp, out)
    shape = tuple(layer.kernel.shape)
    if out_axis is None:  # depthwise [kh, kw, in, mult]: channel = in * mult + m
        flat = shape[:2] + (shape[2] * shape[3],)
        w, k, s = _grid_kernel(flat, 2, rng, per_channel)
        w, k = w.reshape(shape), k.reshape(shape)
    else:
        w, k, s = _grid_kernel(shape, out_axis, rng, per_channel)
    if not grid:  # 16 values per channel, not on one grid
        w = np.sign(w) * np.abs(w) ** 0.5 * 0.1
    layer.kernel.assign(w)
    layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
    data = rng.normal(size=(16,) + tuple(inp.shape[1:])).astype(np.float32)
    return model, k, s, data


def _int4_tensors(path):
    """`[(tensor index, shape, codes, scales)]` of the file's INT4 tensors."""
    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    found = []
    for i, t in enumerate(model.subgraphs[0].tensors):
        if t.type == schema.TensorType.INT4:
            data = bytes(model.buffers[t.buffer].data)
            count = int(np.prod(t.shape))
            assert len(data) == -(-count // 2)
            codes = int4_lib.unpack(data, count).reshape(t.shape)
            found.append((i, tuple(t.shape), codes, np.asarray(t.quantization.scale)))
    return found


def _int8_twin(path, out):
    """The written file with every INT4 tensor unpacked to INT8 (same codes)."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    from tflite_export.pipeline import tflm

    with open(path, "rb") as f:
        model = model_editor.read(f.read())
    for tensor in model.subgraphs[0].tensors:
        if tensor.dtype == schema_py_generated.TensorType.INT4:
            count = int(np.prod(tensor.shape))
            codes = int4_lib.unpack(tensor.buffer.data, count)
            tensor.dtype = schema_py_generated.TensorType.INT8
            tensor.buffer = model_editor.Buffer(data=codes.tobytes())
    model_editor.prune_buffers(model)
    with open(out, "wb") as f:
        f.write(tflm.align(model.build()))
    return out


# kind -> (TFLite op, TFLite layout of the Keras kernel, quantised axis)
_LAYOUT = {
    "conv2d": ("CONV_2D", lambda k: np.transpose(k, (3, 0, 1, 2)), 0),
    "depthwise": (
        "DEPTHWISE_CONV_2D",
        lambda k: k.reshape(1, k.shape[0], k.shape[1], -1),
        3,
    ),
    "dense": ("FULLY_CONNECTED", lambda k: k.T, None),
}


@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "dense"])
def test_int4_file_is_bit_exact_with_its_int8_twin_and_holds_the_codes(tmp_path, kind):
    model, k, steps, data = _model(kind, np.random.default_rng(1))
    op, layout, axis = _LAYOUT[kind]
    extra = {"weight_quantization": "dense_per_tensor"} if kind == "dense" else {}
    path = str(tmp_path / "int4.tflite")
    result = tflite_export.export(model, path, data, int4="always", **extra)
    (report,) = [t for t in result.tensors if t.table_mode.startswith("int4")]
    assert report.op == op and report.compressed
    assert report.table_mode == (
        "int4(per-tensor)" if axis is None else f"int4(axis={axis})"
    )
    assert report.bytes_after == -(-k.size // 2)
    assert "int4" in result.table()
    assert result.verification.bit_exact

    ((_, shape, codes, scales),) = _int4_tensors(path)
    np.testing.assert_array_equal(codes, layout(k))
    assert len(scales) == (1 if axis is None else shape[axis])
    # The requantised scale is the kernel's own step s (up to float32).
    np.testing.assert_allclose(scales, steps[: len(scales)], rtol=1e-5)
    # About half the kernel's int8 bytes saved (the bias is rescaled, not resized).
    saved = result.slim_baseline_bytes - result.size_bytes
    assert abs(saved - k.size // 2) <= 64, (saved, k.size)

    twin = _int8_twin(path, str(tmp_path / "twin.tflite"))
    np.testing.assert_array_equal(tflm_outputs(path, data), tflm_outputs(twin, data))
    # And close to Keras (the int4 grid is the kernel's own values).
    keras_out = model.predict(data, verbose=0)
    assert np.abs(tflm_outputs(path, data) - keras_out).max() < 0.1 * np.abs(
        keras_out
    ).max()


def test_a_tensor_off_the_int4_grid_with_always_is_an_error_and_nothing_written(
    tmp_path,
):
    model, _, _, data = _model("conv2d", np.random.default_rng(2), grid=False)
    path = tmp_path / "never.tflite"
    with pytest.raises(ExportError, match=r"layer 'conv'.*int4='auto'"):
        tflite_export.export(model, str(path), data, int4="always")
    assert not path.exists()
    # 'auto' leaves it a LUT.
    result = tflite_export.export(model, str(path), data, int4="auto")
    (conv,) = [t for t in result.tensors if t.layer == "conv"]
    assert not conv.table_mode.startswith("int4")
    assert not _int4_tensors(str(path))


def test_auto_keeps_a_lut_that_is_smaller_than_int4(tmp_path):
    """Ternary weights are int4-exact, but a 2-bit shared table is smaller."""
    rng = np.random.default_rng(5)
    inp = keras.Input((6, 6, 4))
    layer = keras.layers.Conv2D(32, 3, name="conv")
    out = keras.layers.Dense(4, name="head")(
        keras.layers.GlobalAveragePooling2D()(layer(inp))
    )
    model = keras.Model(inp, out)
    layer.kernel.assign((0.03 * rng.integers(-1, 2, layer.kernel.shape)).astype(np.float32))
    data = rng.normal(size=(8, 6, 6, 4)).astype(np.float32)
    result = tflite_export.export(model, str(tmp_path / "m.tflite"), data, int4="auto")
    (conv,) = [t for t in result.tensors if t.layer == "conv"]
    assert conv.table_mode.startswith("shared") and conv.compressed
    assert "int4-exact, but int4 (576 B) is larger" in conv.note


def test_per_channel_fully_connected_int4_is_an_error_naming_the_fix(tmp_path):
    model, _, _, data = _model("dense", np.random.default_rng(3))
    path = tmp_path / "fc.tflite"
    with pytest.raises(ExportError, match=r"layer 'fc'.*dense_per_tensor"):
        tflite_export.export(
            model, str(path), data, int4="always", weight_quantization="per_channel"
        )
    assert not path.exists()


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")
def test_packing_matches_the_converters_private_low_bit_route():
    """Cross-check only: TF's converter writes INT4 for FakeQuant(num_bits=4)
    weights under the private `_experimental_low_bit_qat` flag (no
    calibration); its bytes and scales equal `int4.pack` of the codes."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    k = rng.integers(-8, 8, (3, 3, 3, 5))  # 135 codes: the last byte padded
    s = rng.uniform(0.01, 0.05, 5)
    w = tf.constant((k * s).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 6, 6, 3], tf.float32)])
    def f(x):
        x = tf.quantization.fake_quant_with_min_max_vars(x, -3.0, 3.0, num_bits=8)
        q = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            w, tf.constant(-8 * s, tf.float32), tf.constant(7 * s, tf.float32),
            num_bits=4, narrow_range=False,
        )
        y = tf.nn.conv2d(x, q, 1, "VALID")
        return tf.quantization.fake_quant_with_min_max_vars(y, -3.0, 3.0, num_bits=8)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [f.get_concrete_function()], f
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter._experimental_low_bit_qat = True
    model = schema.ModelT.InitFromPackedBuf(bytearray(converter.convert()), 0)
    (tensor,) = [t for t in model.subgraphs[0].tensors if t.type == schema.TensorType.INT4]
    codes = np.transpose(k, (3, 0, 1, 2))
    assert bytes(model.buffers[tensor.buffer].data) == int4_lib.pack(codes)
    np.testing.assert_allclose(tensor.quantization.scale, s, rtol=1e-6)


@pytest.mark.parametrize("profile", ["cortex-m4-cmsis-nn", "cortex-m4-ref"])
def test_int4_on_a_target_adds_no_code_and_reports_its_instructions(tmp_path, profile):
    """int4 links no DECODE: the firmware shrinks by the file change. CMSIS-NN
    runs s4 kernels at a per-MAC factor; reference kernels unpack per weight."""
    from tflite_export.device import target as targets

    model, k, _, data = _model("conv2d", np.random.default_rng(3))
    result = tflite_export.export(model, str(tmp_path / "m.tflite"), data, int4="always",
                                  target=profile)
    device = result.device
    t = targets.get(profile)
    assert device.code_added == {} and not device.decoded
    assert device.flash_change == device.file_change < 0
    (int4,) = device.int4
    macs = 4 * 4 * 8 * 3 * 3 * 4  # 6x6x4 -> 4x4x8 with 3x3 filters
    assert (int4.op, int4.elements, int4.macs) == ("CONV_2D", k.size, macs)
    expected = (t.int4_mac_factor["CONV_2D"] - 1) * t.mac_instructions["CONV_2D"] * macs
    expected += t.int4_unpack_instructions * k.size
    assert int4.instructions == pytest.approx(expected) and int4.instructions > 0
    assert int4.saved_bytes == k.size // 2
    assert "int4 weights in 1 op(s)" in str(result)


def test_slim_keeps_the_bias_scale_tflm_reads_and_drops_the_others(tmp_path):
    """TFLM checks the bias scale of a per-tensor FULLY_CONNECTED (against
    input x filter scale) and of no per-channel op: the slim file keeps the
    Dense bias's quantisation, drops the conv's, and the step is kept."""
    from tflite_export.pipeline import flatbuffer

    rng = np.random.default_rng(4)
    inp = keras.Input((6, 6, 4))
    conv = keras.layers.Conv2D(8, 3, activation="relu", name="conv")
    head = keras.layers.Dense(4, name="head")
    model = keras.Model(inp, head(keras.layers.Flatten()(conv(inp))))
    conv.kernel.assign(_grid_kernel(tuple(conv.kernel.shape), 3, rng, True)[0])
    # Every channel holds all 16 codes: one dictionary per tensor.
    k = np.stack([rng.permutation(np.tile(np.arange(-8, 8), 8)) for _ in range(4)], 1)
    head.kernel.assign((0.02 * k).astype(np.float32))
    for layer in (conv, head):
        layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
    data = rng.normal(size=(16, 6, 6, 4)).astype(np.float32)
    path = str(tmp_path / "m.tflite")
    result = tflite_export.export(model, path, data, int4="always",
                                  weight_quantization="dense_per_tensor")
    assert result.verification.bit_exact
    assert "bias_quantization" in result.slim_steps
    assert not any("bias_quantization" in n for n in result.notes)
    with open(path, "rb") as f:
        flat = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    sub = flat.subgraphs[0]
    biases = {}
    for op in sub.operators:
        name = flatbuffer.op_name(flat, op)
        if name in ("CONV_2D", "FULLY_CONNECTED"):
            assert sub.tensors[op.inputs[1]].type == schema.TensorType.INT4
            biases[name] = sub.tensors[op.inputs[2]].quantization
    assert biases["CONV_2D"] is None
    assert biases["FULLY_CONNECTED"] is not None
    assert len(biases["FULLY_CONNECTED"].scale) == 1


def test_as_int8_unpacks_int4_tensors_and_is_none_without_them():
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as mschema

    codes = np.array([1, -2, 7, -8, 0], np.int8)
    other = np.array([5, 6], np.int8)
    packed = model_editor.Tensor(shape=(5,), dtype=mschema.TensorType.INT4,
                                 data=int4_lib.pack(codes))
    plain = model_editor.Tensor(shape=(2,), dtype=mschema.TensorType.INT8, data=other.tobytes())
    out = model_editor.Tensor(shape=(2,), dtype=mschema.TensorType.INT8)
    op = model_editor.Operator(opcode=mschema.BuiltinOperator.ADD, inputs=[packed, plain],
                               outputs=[out])
    model = model_editor.Model(subgraphs=[model_editor.Subgraph(
        tensors=[packed, plain, out], operators=[op], outputs=[out])])
    unpacked = int4_lib.as_int8(model.build())
    first, second, _ = model_editor.read(unpacked).subgraphs[0].tensors
    assert first.dtype == second.dtype == mschema.TensorType.INT8
    assert bytes(first.buffer.data) == codes.tobytes()
    assert bytes(second.buffer.data) == other.tobytes()
    assert int4_lib.as_int8(unpacked) is None
