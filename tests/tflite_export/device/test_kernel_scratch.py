"""Scratch requests of TFLM's reference and CMSIS-NN (Cortex-M4) kernels.

Expectations are worked by hand from the formulas cited in
tflite_export/kernel_scratch.py (TFLM 90b983c2, CMSIS-NN 4ab83cc3).
"""

import keras
import numpy as np
import pytest

from tflite_export.device import kernel_scratch as ks
from tflite_export.pipeline import convert


def both(op, input_shape, filter_shape, output_shape, **params):
    return tuple(
        ks.scratch_bytes(k, op, input_shape, filter_shape, output_shape, params)
        for k in ks.KERNEL_SETS
    )


# (reference, cmsis-nn) per case.
@pytest.mark.parametrize("case, expected", [
    # 3x3 same: im2col of 3*3*3 = 27 values, padded to 28, two int16
    # columns: 2 * 28 * 2 = 112. Reference int8 conv requests nothing.
    (("CONV_2D", (1, 16, 16, 3), (8, 3, 3, 3), (1, 16, 16, 8), {"padding": "same"}), (0, 112)),
    # 1x1 stride 1, no padding: fast 1x1 path, no buffer with GCC.
    (("CONV_2D", (1, 8, 8, 16), (32, 1, 1, 16), (1, 8, 8, 32), {}), (0, 0)),
    # ... and 2 * 16 int16 = 64 bytes with Arm Compiler 6.
    (("CONV_2D", (1, 8, 8, 16), (32, 1, 1, 16), (1, 8, 8, 32), {"compiler": "armclang"}), (0, 64)),
    # 1x1 stride 2: the non-fast 1x1 path, no buffer even with armclang.
    (("CONV_2D", (1, 8, 8, 16), (32, 1, 1, 16), (1, 4, 4, 32),
      {"strides": (2, 2), "compiler": "armclang"}), (0, 0)),
    # 1xN (input height 1, 1x5 kernel): generic size on DSP, 5*8 = 40
    # (already a multiple of 4): 2 * 40 * 2 = 160.
    (("CONV_2D", (1, 1, 32, 8), (4, 1, 5, 8), (1, 1, 28, 4), {}), (0, 160)),
    # int4 filter: the reference kernel unpacks it, 8*3*3*3 = 216 bytes;
    # CMSIS-NN's Prepare still sizes with the s8 function: 112.
    (("CONV_2D", (1, 16, 16, 3), (8, 3, 3, 3), (1, 16, 16, 8),
      {"padding": "same", "filter_dtype": "int4"}), (216, 112)),
    # Float conv: nothing in either set.
    (("CONV_2D", (1, 16, 16, 3), (8, 3, 3, 3), (1, 16, 16, 8),
      {"padding": "same", "input_dtype": "float32"}), (0, 0)),
    # Depthwise 3x3 same stride 1: padding 1 -> the 3x3 path, no buffer.
    (("DEPTHWISE_CONV_2D", (1, 16, 16, 8), (1, 3, 3, 8), (1, 16, 16, 8),
      {"padding": "same"}), (0, 0)),
    # 3x3 same stride 2 on 16: total padding 7*2+3-16 = 1, padding 0: 3x3.
    (("DEPTHWISE_CONV_2D", (1, 16, 16, 8), (1, 3, 3, 8), (1, 8, 8, 8),
      {"padding": "same", "strides": (2, 2)}), (0, 0)),
    # 5x5 same: padding 2 -> opt path, 8*5*5 int16 = 400.
    (("DEPTHWISE_CONV_2D", (1, 16, 16, 8), (1, 5, 5, 8), (1, 16, 16, 8),
      {"padding": "same"}), (0, 400)),
    # Depth multiplier 2 (4 -> 8 channels): generic path, no buffer.
    (("DEPTHWISE_CONV_2D", (1, 16, 16, 4), (1, 5, 5, 8), (1, 16, 16, 8),
      {"padding": "same", "depth_multiplier": 2}), (0, 0)),
    # Dilation 2: generic path, no buffer.
    (("DEPTHWISE_CONV_2D", (1, 16, 16, 8), (1, 5, 5, 8), (1, 8, 8, 8),
      {"dilation": (2, 2)}), (0, 0)),
    # int4 3x3: s4 has no 3x3 exception, 8*3*3*2 = 144; the reference
    # unpacks 1*3*3*8 = 72 bytes.
    (("DEPTHWISE_CONV_2D", (1, 16, 16, 8), (1, 3, 3, 8), (1, 16, 16, 8),
      {"padding": "same", "filter_dtype": "int4"}), (72, 144)),
    # Dense on 2-D output: arm_fully_connected_s8 needs nothing on DSP.
    (("FULLY_CONNECTED", (1, 64), (10, 64), (1, 10), {"per_channel": False}), (0, 0)),
    # 3-D output, depth 64 (multiple of 4): 1x1-conv path; per-tensor adds
    # a fake per-channel multiplier+shift array, 10 * 2 * 4 = 80.
    (("FULLY_CONNECTED", (1, 5, 64), (10, 64), (1, 5, 10), {"per_channel": False}), (0, 80)),
    # ... plus 2 * 64 int16 = 256 with Arm Compiler 6.
    (("FULLY_CONNECTED", (1, 5, 64), (10, 64), (1, 5, 10),
      {"per_channel": False, "compiler": "armclang"}), (0, 336)),
    # Per-channel: no fake array.
    (("FULLY_CONNECTED", (1, 5, 64), (10, 64), (1, 5, 10), {}), (0, 0)),
    # Depth 62 is no multiple of 4: the plain FC path, nothing.
    (("FULLY_CONNECTED", (1, 5, 62), (10, 62), (1, 5, 10), {"per_channel": False}), (0, 0)),
    # int4 per-tensor: the reference unpacks 10*64 = 640 bytes; CMSIS none.
    (("FULLY_CONNECTED", (1, 64), (10, 64), (1, 10),
      {"per_channel": False, "filter_dtype": "int4"}), (640, 0)),
    # Transpose conv, stride 2, 32 > 16 input channels: reverse-conv path,
    # 2 * align4(3*3*32 = 288) * 2 = 1152 plus the reversed filter
    # 32*3*3*16 = 4608: 5760. Reference: int32 per output, 16*16*16*4.
    (("TRANSPOSE_CONV", (1, 8, 8, 32), (16, 3, 3, 32), (1, 16, 16, 16),
      {"strides": (2, 2), "padding": "same"}), (16384, 5760)),
    # 8 input channels: column path, ((8-1)*2 + max(3, 2)) * 4 = 68 wide,
    # max(3, 2) = 3 high, int32: 68*3*4 = 816. Reference 16*16*4*4 = 4096.
    (("TRANSPOSE_CONV", (1, 8, 8, 8), (4, 3, 3, 8), (1, 16, 16, 4),
      {"strides": (2, 2), "padding": "same"}), (4096, 816)),
    # Stride (4, 1), 32 channels: stride > 2, column path; CMSIS-NN takes
    # max(kernel width 3, stride h 4): ((4-1)*1 + 4) * 8 = 56 wide,
    # max(3, 4) = 4 high: 56*4*4 = 896. Reference 16*6*8*4 = 3072.
    (("TRANSPOSE_CONV", (1, 4, 4, 32), (8, 3, 3, 32), (1, 16, 6, 8),
      {"strides": (4, 1)}), (3072, 896)),
    # Average pool int8: one int32 per channel on CMSIS-NN.
    (("AVERAGE_POOL_2D", (1, 8, 8, 24), None, (1, 4, 4, 24), {}), (0, 96)),
    (("AVERAGE_POOL_2D", (1, 8, 8, 24), None, (1, 4, 4, 24), {"input_dtype": "float32"}),
     (0, 0)),
    (("MAX_POOL_2D", (1, 8, 8, 24), None, (1, 4, 4, 24), {}), (0, 0)),
    (("SOFTMAX", (1, 10), None, (1, 10), {}), (0, 0)),
    (("ADD", (1, 8, 8, 4), None, (1, 8, 8, 4), {}), (0, 0)),
])
def test_hand_computed(case, expected):
    op, input_shape, filter_shape, output_shape, params = case
    assert both(op, input_shape, filter_shape, output_shape, **params) == expected


def test_requests_and_alignment():
    # CMSIS-NN's transpose conv asks for its second buffer even when empty.
    assert ks.scratch_requests("cmsis-nn", "TRANSPOSE_CONV", (1, 8, 8, 8), (4, 3, 3, 8),
                               (1, 16, 16, 4), {"strides": (2, 2)}) == [816, 0]
    # 3 channels * 4 = 12 bytes, which the planner rounds up to 16.
    args = ("cmsis-nn", "AVERAGE_POOL_2D", (1, 8, 8, 3), None, (1, 4, 4, 3))
    assert ks.scratch_bytes(*args) == 12
    assert ks.scratch_bytes(*args, aligned=True) == 16


@pytest.mark.parametrize("kwargs, message", [
    ({"op": "SVDF"}, "not modelled"),
    ({"kernels": "cmsis"}, "kernels"),
    ({"params": {"stride": (1, 1)}}, "unknown params"),
    ({"params": {"input_dtype": "int16"}}, "not modelled"),
    ({"params": {"depth_multiplier": 3}}, "depth_multiplier"),
])
def test_refuses(kwargs, message):
    args = {"kernels": "cmsis-nn", "op": "DEPTHWISE_CONV_2D", "input_shape": (1, 8, 8, 4),
            "filter_shape": (1, 3, 3, 4), "output_shape": (1, 8, 8, 4), "params": {}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ks.scratch_bytes(**args)


def test_reads_a_converted_model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Conv2D(8, 1)(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    data = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    model_bytes = convert.convert(model, "int8", data)

    rows = ks.op_scratch(model_bytes)
    modelled = [(r.op, r.reference, r.cmsis_nn) for r in rows if r.op in ks.MODELLED_OPS]
    assert modelled == [
        # 3x3 conv on 3 channels: 2 * align4(27) * 2 = 112.
        ("CONV_2D", 0, 112),
        # 3x3 depthwise, padding 1: CMSIS-NN's 3x3 path.
        ("DEPTHWISE_CONV_2D", 0, 0),
        # 8 channels * 4 bytes.
        ("AVERAGE_POOL_2D", 0, 32),
        # 1x1 stride 1: fast path, no buffer with GCC.
        ("CONV_2D", 0, 0),
        # 2-D output: plain FC path.
        ("FULLY_CONNECTED", 0, 0),
    ]
    assert [r.index for r in rows] == list(range(len(rows)))
    assert all(r.reference is None for r in rows if r.op not in ks.MODELLED_OPS)
    # With Arm Compiler 6 the 1x1 conv asks for 2 * 8 int16 = 32 bytes.
    armclang = ks.op_scratch(model_bytes, compiler="armclang")
    assert [r.cmsis_nn for r in armclang if r.op == "CONV_2D"] == [112, 32]
