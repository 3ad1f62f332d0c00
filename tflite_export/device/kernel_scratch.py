"""Scratch buffers TFLM's reference and CMSIS-NN kernels request, per op.

The exporter measures a file's arena with the x86 tflite-micro wheel, which
runs TFLM's reference kernels. A Cortex-M4 firmware built with
`OPTIMIZED_KERNEL_DIR=cmsis_nn` runs CMSIS-NN kernels whose `Prepare` asks
for other scratch buffers (`RequestScratchBufferInArena`). This module
models those requests so the CMSIS-NN arena can be estimated from the
reference one.

Read from source, not measured:

- TFLM commit 90b983c2b3f1480642e040bbd2ddb37b998f3424: the `Prepare` of
  `tensorflow/lite/micro/kernels/cmsis_nn/*.cc` and of the reference
  `conv_common.cc`, `depthwise_conv_common.cc`, `fully_connected.cc`,
  `transpose_conv.cc`, `pooling.cc`.
- CMSIS-NN commit 4ab83cc3cc98fb85ed6dafb55e8ca02f1628dcae (v7.0.0-33, the
  zip that TFLM's `tools/make/ext_libs/cmsis_nn_download.sh` pins): the
  `*_get_buffer_size*` functions, built for Cortex-M4, i.e. `ARM_MATH_DSP`
  defined and `ARM_MATH_MVEI` undefined.

The figures are what `Prepare` requests; the memory planner rounds each
request up to `ALIGNMENT` bytes (`micro_allocator.cc`, `CreatePlan`) and the
allocator keeps one `ScratchBufferHandle` (a pointer) per request in the
persistent area. Re-check them against a real CMSIS-NN build (e.g. with
`RecordingMicroInterpreter`) before relying on them: a newer TFLM or
CMSIS-NN changes them.

Persistent allocations: for int8 activations the data-dependent persistent
buffers of the modelled ops are the same in both kernel sets (per-channel
output multiplier and shift, 2 * 4 bytes per output channel, for CONV_2D,
DEPTHWISE_CONV_2D, TRANSPOSE_CONV, and for per-channel FULLY_CONNECTED via
the shared `CalculateOpDataFullyConnected`). CMSIS-NN's FULLY_CONNECTED
keeps kernel sums in a persistent buffer only when its scratch size is
non-zero, which `arm_fully_connected_s8_get_buffer_size` makes true on MVE
only. So there is no `persistent_bytes`: what still differs is the size of
each kernel's `OpData` struct (allocated in `Init`; `arena.OP_DATA` models
it with the 64- to 32-bit change), one handle per scratch request, and
float CONV_2D/DEPTHWISE_CONV_2D, for which CMSIS-NN skips the per-channel
arrays the reference kernels allocate.

Not modelled: int16 activations (CMSIS-NN's s16 paths), the in-kernel
decompression scratch of builds with `USE_TFLM_COMPRESSION` (the CMSIS-NN
kernels at this commit have no such code), and ops with their own CMSIS-NN
kernel that request scratch or persistent memory differently (SVDF,
UNIDIRECTIONAL_SEQUENCE_LSTM, BATCH_MATMUL). Ops outside `CMSIS_NN_OPS` run
the same reference code in both builds, so their requests cancel out.
"""

import collections

from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.pipeline import flatbuffer

TFLM_COMMIT = "90b983c2b3f1480642e040bbd2ddb37b998f3424"
CMSIS_NN_COMMIT = "4ab83cc3cc98fb85ed6dafb55e8ca02f1628dcae"
KERNEL_SETS = ("reference", "cmsis-nn")
COMPILERS = ("gcc", "armclang")
# MicroArenaBufferAlignment(): the planner rounds each request up to this.
ALIGNMENT = 16

# Ops registered by a file under kernels/cmsis_nn/ at TFLM_COMMIT. Any other
# op runs the reference kernel on a CMSIS-NN build too.
CMSIS_NN_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED", "MAXIMUM", "MAX_POOL_2D", "MINIMUM", "MUL", "PAD",
    "PADV2", "SOFTMAX", "SVDF", "TRANSPOSE", "TRANSPOSE_CONV",
    "UNIDIRECTIONAL_SEQUENCE_LSTM",
})
# Ops with a CMSIS-NN kernel whose Prepare requests no scratch, and whose
# reference Prepare requests none either.
_NO_SCRATCH = frozenset({
    "ADD", "MAXIMUM", "MAX_POOL_2D", "MINIMUM", "MUL", "PAD", "PADV2",
    "SOFTMAX", "TRANSPOSE",
})
MODELLED_OPS = frozenset({
    "AVERAGE_POOL_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED",
    "TRANSPOSE_CONV",
}) | _NO_SCRATCH

# arm_nnsupportfunctions.h, REVERSE_TCOL_EFFICIENT_THRESHOLD.
_REVERSE_TCOL_THRESHOLD = 16

_DEFAULTS = {
    "strides": (1, 1),
    "padding": "valid",
    "dilation": (1, 1),
    "depth_multiplier": None,
    "input_dtype": "int8",
    "filter_dtype": "int8",
    "per_channel": True,
    "compiler": "gcc",
}

OpScratch = collections.namedtuple("OpScratch", "index op reference cmsis_nn")
OpScratch.__doc__ = """Scratch bytes one op's Prepare requests in each kernel set.

`reference`/`cmsis_nn` are None for ops this module does not model.
"""


def _params(params):
    params = dict(params or {})
    unknown = set(params) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    merged = {**_DEFAULTS, **params}
    if merged["padding"] not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', not {merged['padding']!r}")
    if merged["filter_dtype"] not in ("int8", "int4"):
        raise ValueError(f"filter_dtype must be 'int8' or 'int4', not {merged['filter_dtype']!r}")
    if merged["input_dtype"] not in ("int8", "float32"):
        raise ValueError(
            f"input_dtype {merged['input_dtype']!r} is not modelled (int8 or float32)"
        )
    if merged["compiler"] not in COMPILERS:
        raise ValueError(f"compiler must be one of {COMPILERS}, not {merged['compiler']!r}")
    return merged


def _prod(shape):
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _padding(padding, stride, dilation, in_size, filter_size):
    """TFLM's padding for one spatial axis.

    As `ComputePaddingHeightWidth` in tensorflow/lite/kernels/padding.h:
    the output size follows from the padding type, and the padding is half
    the (non-negative) total padding, rounded down.
    """
    effective = (filter_size - 1) * dilation + 1
    if padding == "same":
        out = (in_size + stride - 1) // stride
    else:
        out = (in_size + stride - effective) // stride
    total = (out - 1) * stride + effective - in_size
    return max(total, 0) // 2


def _align4(n):
    return n + (-n % 4)


def _cmsis_convolve_s8_size(input_c, kernel_h, kernel_w):
    # arm_convolve_get_buffer_sizes_s8.c, arm_convolve_s8_get_buffer_size
    # (non-MVE): two int16 im2col columns of the kernel volume, padded to 4.
    return 2 * _align4(kernel_h * kernel_w * input_c) * 2


def _cmsis_1x1_fast_size(input_c, compiler):
    # arm_convolve_get_buffer_sizes_s8.c,
    # arm_convolve_1x1_s8_fast_get_buffer_size_dsp: 2 * C int16 values when
    # built by Arm Compiler 6 (__ARMCC_VERSION >= 6010050), else 0.
    return 2 * input_c * 2 if compiler == "armclang" else 0


def _conv(kernels, input_shape, filter_shape, p):
    _, in_h, in_w, in_c = input_shape
    _, k_h, k_w, filter_c = filter_shape
    if kernels == "reference":
        # conv_common.cc, ConvPrepare: int4 filters are unpacked to int8 in
        # a scratch buffer of the filter's element count.
        return [_prod(filter_shape)] if p["filter_dtype"] == "int4" else []
    # cmsis_nn/conv.cc, Prepare: int8 input takes
    # arm_convolve_wrapper_s8_get_buffer_size for int8 *and* int4 filters.
    (s_h, s_w), (d_h, d_w) = p["strides"], p["dilation"]
    pad_h = _padding(p["padding"], s_h, d_h, in_h, k_h)
    pad_w = _padding(p["padding"], s_w, d_w, in_w, k_w)
    # arm_nnsupportfunctions.h, arm_nn_is_convolve_1x1 / _1x1_fast. The
    # 1xN path (arm_nn_is_convolve_1_x_n) has the generic size on DSP.
    is_1x1 = (pad_h == 0 and pad_w == 0 and k_h == 1 and k_w == 1
              and d_h == 1 and d_w == 1 and in_c == filter_c)
    if is_1x1:
        size = _cmsis_1x1_fast_size(in_c, p["compiler"]) if (s_h, s_w) == (1, 1) else 0
    else:
        size = _cmsis_convolve_s8_size(in_c, k_h, k_w)
    return [size] if size > 0 else []


def _depthwise(kernels, input_shape, filter_shape, output_shape, p):
    batch, in_h, in_w, in_c = input_shape
    _, k_h, k_w, out_c = filter_shape
    if p["depth_multiplier"] is not None and in_c * p["depth_multiplier"] != out_c:
        raise ValueError(
            f"depth_multiplier {p['depth_multiplier']} does not match "
            f"{in_c} input and {out_c} filter channels"
        )
    if output_shape is not None and int(output_shape[-1]) != out_c:
        raise ValueError("DEPTHWISE_CONV_2D output channels differ from the filter's")
    if kernels == "reference":
        # depthwise_conv_common.cc, DepthwiseConvPrepare: int4 unpack buffer.
        return [_prod(filter_shape)] if p["filter_dtype"] == "int4" else []
    # cmsis_nn/depthwise_conv.cc, Prepare ->
    # arm_depthwise_conv_wrapper_{s8,s4}_get_buffer_size
    # (arm_depthwise_conv_get_buffer_sizes_{s8,s4}.c). Only the "opt" path
    # (depth multiplier 1, batch 1, no dilation) needs C * KH * KW int16s;
    # for int8 filters the 3x3 path with padding <= 1 needs none.
    (s_h, s_w), (d_h, d_w) = p["strides"], p["dilation"]
    if not (in_c == out_c and batch == 1 and d_h == 1 and d_w == 1):
        return []
    if p["filter_dtype"] == "int8" and k_h == 3 and k_w == 3:
        pad_h = _padding(p["padding"], s_h, d_h, in_h, k_h)
        pad_w = _padding(p["padding"], s_w, d_w, in_w, k_w)
        if pad_h <= 1 and pad_w <= 1:
            return []
    return [in_c * k_h * k_w * 2]


def _fully_connected(kernels, filter_shape, output_shape, p):
    if p["filter_dtype"] == "int4" and p["per_channel"]:
        # fully_connected_common.cc, CalculateOpDataFullyConnected refuses
        # per-channel int4 filters in both kernel sets.
        raise ValueError("TFLM refuses per-channel int4 FULLY_CONNECTED")
    if kernels == "reference":
        # fully_connected.cc, FullyConnectedPrepare: int4 unpack buffer.
        return [_prod(filter_shape)] if p["filter_dtype"] == "int4" else []
    # cmsis_nn/fully_connected.cc, Prepare. int4 filters request nothing.
    if p["filter_dtype"] == "int4":
        return []
    accum_depth = int(filter_shape[-1])
    output_depth = int(output_shape[-1])
    if len(output_shape) > 2 and accum_depth % 4 == 0:
        # Runs as a 1x1 convolution; per-tensor filters get a fake
        # per-channel multiplier and shift array (2 int32 per channel).
        requests = [] if p["per_channel"] else [output_depth * 4 * 2]
        size = _cmsis_1x1_fast_size(accum_depth, p["compiler"])
        return requests + ([size] if size > 0 else [])
    # arm_fully_connected_s8_get_buffer_size_dsp returns 0 (no kernel sums).
    return []


def _transpose_conv(kernels, input_shape, filter_shape, output_shape, p):
    if p["filter_dtype"] == "int4":
        raise ValueError("TFLM's TRANSPOSE_CONV takes int8 filters only")
    if kernels == "reference":
        # transpose_conv.cc, TransposeConvPrepare: an int32 accumulator per
        # output element.
        return [_prod(output_shape) * 4]
    # cmsis_nn/transpose_conv.cc, Prepare requests two buffers, sized by
    # arm_transpose_conv_s8_get_buffer_size and
    # arm_transpose_conv_s8_get_reverse_conv_buffer_size
    # (arm_transpose_conv_get_buffer_sizes_s8.c, non-MVE branch).
    _, _, in_w, in_c = input_shape
    out_c, k_h, k_w, _ = filter_shape
    s_h, s_w = p["strides"]
    if s_w <= 2 and s_h <= 2 and in_c > _REVERSE_TCOL_THRESHOLD:
        # Runs as a convolution over the upsampled input, with the filter
        # reversed into the second buffer.
        return [_cmsis_convolve_s8_size(in_c, k_h, k_w), in_c * k_w * k_h * out_c]
    # Column buffer; CMSIS-NN takes max(kernel width, stride *height*) here.
    buf_x = ((in_w - 1) * s_w + max(k_w, s_h)) * int(output_shape[-1])
    buf_y = max(k_h, s_h)
    return [buf_x * buf_y * 4, 0]


def scratch_requests(kernels, op, input_shape, filter_shape, output_shape, params=None):
    """The scratch buffer sizes an op's Prepare requests, one per request.

    Args: as `scratch_bytes`.

    Returns:
        A list of byte counts (may hold a 0: CMSIS-NN's TRANSPOSE_CONV
        requests its second buffer even when it needs none).
    """
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels must be one of {KERNEL_SETS}, not {kernels!r}")
    if op not in MODELLED_OPS:
        raise ValueError(f"{op} is not modelled; modelled: {sorted(MODELLED_OPS)}")
    p = _params(params)
    if op in _NO_SCRATCH or p["input_dtype"] == "float32":
        # Float ops take the reference float code in both kernel sets, and
        # none of the modelled float kernels requests scratch.
        return []
    input_shape = tuple(int(d) for d in input_shape)
    output_shape = None if output_shape is None else tuple(int(d) for d in output_shape)
    filter_shape = None if filter_shape is None else tuple(int(d) for d in filter_shape)
    if op == "CONV_2D":
        return _conv(kernels, input_shape, filter_shape, p)
    if op == "DEPTHWISE_CONV_2D":
        return _depthwise(kernels, input_shape, filter_shape, output_shape, p)
    if op == "FULLY_CONNECTED":
        return _fully_connected(kernels, filter_shape, output_shape, p)
    if op == "TRANSPOSE_CONV":
        return _transpose_conv(kernels, input_shape, filter_shape, output_shape, p)
    # AVERAGE_POOL_2D: cmsis_nn/pooling.cc, AveragePrepare ->
    # arm_avgpool_s8_get_buffer_size_dsp: one int32 per channel. The
    # reference pooling kernels request nothing.
    return [] if kernels == "reference" else [int(output_shape[-1]) * 4]


def scratch_bytes(kernels, op, input_shape, filter_shape, output_shape, params=None,
                  aligned=False):
    """Scratch bytes an op's Prepare requests on a Cortex-M4 (DSP, no MVE).

    Args:
        kernels: `"reference"` or `"cmsis-nn"`.
        op: TFLite builtin op name, one of `MODELLED_OPS`.
        input_shape: The activation input's shape, NHWC for convolutions
            and pooling (for TRANSPOSE_CONV: input 2, not the output-shape
            tensor).
        filter_shape: The weights' TFLite shape (CONV_2D and TRANSPOSE_CONV
            OHWI, DEPTHWISE_CONV_2D 1HW(C*M), FULLY_CONNECTED (out, in)), or
            None for ops without weights.
        output_shape: The output's shape.
        params: Dict with any of `strides` (h, w), `padding` ("same" or
            "valid"), `dilation` (h, w), `depth_multiplier` (checked against
            the shapes), `input_dtype` ("int8" or "float32"), `filter_dtype`
            ("int8" or "int4"), `per_channel` (bool), `compiler` ("gcc" or
            "armclang": CMSIS-NN's 1x1 fast path takes a buffer only when
            built by Arm Compiler 6). Missing keys take `_DEFAULTS`.
        aligned: Round each request up to `ALIGNMENT`, as the planner does.

    Returns:
        The total bytes, an int.
    """
    requests = scratch_requests(kernels, op, input_shape, filter_shape, output_shape, params)
    if aligned:
        requests = [r + (-r % ALIGNMENT) for r in requests]
    return sum(requests)


_DTYPES = {
    schema.TensorType.INT8: "int8",
    schema.TensorType.INT4: "int4",
    schema.TensorType.FLOAT32: "float32",
}
_PADDING = {schema.Padding.SAME: "same", schema.Padding.VALID: "valid"}
# Index of the activation input and of the weights, per op.
_INPUTS = {"TRANSPOSE_CONV": (2, 1)}


def _shape(subgraph, index):
    shape = subgraph.tensors[index].shape
    return tuple(int(d) for d in shape) if shape is not None else ()


def _op_params(subgraph, op, name):
    """`scratch_bytes` arguments for one operator, or None if not modelled."""
    data_input, weight_input = _INPUTS.get(name, (0, 1))
    input_tensor = subgraph.tensors[op.inputs[data_input]]
    input_dtype = _DTYPES.get(input_tensor.type)
    if input_dtype not in ("int8", "float32"):
        return None
    params = {"input_dtype": input_dtype}
    filter_shape = None
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
        weights = subgraph.tensors[op.inputs[weight_input]]
        filter_shape = _shape(subgraph, op.inputs[weight_input])
        if input_dtype == "int8":
            filter_dtype = _DTYPES.get(weights.type)
            if filter_dtype not in ("int8", "int4"):
                return None
            params["filter_dtype"] = filter_dtype
            scales = weights.quantization.scale if weights.quantization else None
            params["per_channel"] = scales is not None and len(scales) > 1
    options = op.builtinOptions
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"):
        params["strides"] = (options.strideH, options.strideW)
        params["padding"] = _PADDING[options.padding]
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        params["dilation"] = (options.dilationHFactor, options.dilationWFactor)
    return (
        _shape(subgraph, op.inputs[data_input]),
        filter_shape,
        _shape(subgraph, op.outputs[0]),
        params,
    )


def op_requests(model_bytes, compiler="gcc"):
    """Per-op scratch requests of a .tflite file's subgraph 0, both kernel sets.

    Args:
        model_bytes: The flatbuffer.
        compiler: As `params["compiler"]` of `scratch_bytes`.

    Returns:
        A list of `(index, op, reference, cmsis_nn)` in execution order,
        where `reference` and `cmsis_nn` are lists of request sizes (raw
        bytes, one per `RequestScratchBufferInArena` call), or None where
        the op or its types are not modelled.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    subgraph = model.subgraphs[0]
    rows = []
    for index, op in enumerate(subgraph.operators or []):
        name = flatbuffer.op_name(model, op)
        args = _op_params(subgraph, op, name) if name in MODELLED_OPS else None
        if args is None:
            rows.append((index, name, None, None))
            continue
        input_shape, filter_shape, output_shape, params = args
        params["compiler"] = compiler
        ref, cmsis = (
            scratch_requests(k, name, input_shape, filter_shape, output_shape, params)
            for k in KERNEL_SETS
        )
        rows.append((index, name, ref, cmsis))
    return rows


def op_scratch(model_bytes, compiler="gcc", aligned=False):
    """Per-op scratch requests of a .tflite file's subgraph 0, both kernel sets.

    Args:
        model_bytes: The flatbuffer.
        compiler: As `params["compiler"]` of `scratch_bytes`.
        aligned: Round each request up to `ALIGNMENT` before summing, as
            the memory planner does.

    Returns:
        A list of `OpScratch(index, op, reference, cmsis_nn)`, one per
        operator in execution order; byte counts are the requests' sums
        (raw unless `aligned`), None where the op or its types are not
        modelled.
    """
    def total(requests):
        if requests is None:
            return None
        if aligned:
            requests = [r + (-r % ALIGNMENT) for r in requests]
        return sum(requests)

    return [
        OpScratch(index, name, total(ref), total(cmsis))
        for index, name, ref, cmsis in op_requests(model_bytes, compiler)
    ]
