"""Renders the TFLM op resolver for exactly a .tflite file's operators.

`export(..., c_array="model_data.cc")` writes `model_data_ops.h` beside the
C array: the number of distinct ops, a function registering each of them on
a `tflite::MicroMutableOpResolver`, the arena estimated per kernel set for
a 32-bit build (`firmware.arenas`), and the arena measured on the host.

The tables below were written by hand from TFLM at commit 90b983c2
(`micro_mutable_op_resolver.h` and the kernel headers that declare the
type-specific `Register_*` functions); update them when moving to a newer
TFLM.
"""

import os
import re

from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.device import firmware
from tflite_export.device import kernel_scratch
from tflite_export.errors import UnsupportedModelError
from tflite_export.pipeline import c_array as c_array_lib
from tflite_export.pipeline import flatbuffer

# Builtin op (schema name) -> MicroMutableOpResolver method. Each takes an
# optional registration argument except those in `_NO_ARGUMENT`.
ADD_METHODS = {
    "ABS": "AddAbs",
    "ADD": "AddAdd",
    "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast",
    "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "COS": "AddCos",
    "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice",
    "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual",
    "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill",
    "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean",
    "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad",
    "MUL": "AddMul",
    "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable",
    "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax",
    "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound",
    "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape",
    "SIN": "AddSin",
    "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV",
    "SQRT": "AddSqrt",
    "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "SUM": "AddSum",
    "SVDF": "AddSvdf",
    "TANH": "AddTanh",
    "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
}
# Custom ops (their name in the file) -> the method that registers them.
CUSTOM_METHODS = {
    "TFLM_DECODE": "AddDecode",
    "CIRCULAR_BUFFER": "AddCircularBuffer",
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess",
}
_NO_ARGUMENT = {"AddDynamicUpdateSlice", "AddResizeNearestNeighbor"}

_I8, _I16, _I4 = schema.TensorType.INT8, schema.TensorType.INT16, schema.TensorType.INT4

# Type-specific registrations TFLM declares (with a fallback to the generic
# kernel where the build has none): op -> (input indices whose types select
# the variant, {types: suffix of Register_<OP>_<suffix>}).
_WEIGHT_VARIANTS = {(_I8, _I8): "INT8", (_I8, _I4): "INT4", (_I16, _I8): "INT16"}
VARIANTS = {
    "CONV_2D": ((0, 1), _WEIGHT_VARIANTS),
    "DEPTHWISE_CONV_2D": ((0, 1), _WEIGHT_VARIANTS),
    "FULLY_CONNECTED": ((0, 1), _WEIGHT_VARIANTS),
    "TRANSPOSE_CONV": ((2, 1), {(_I8, _I8): "INT8"}),
    # Softmax: (input, output); -1 stands for the op's first output.
    "SOFTMAX": ((0, -1), {(_I8, _I8): "INT8", (_I16, _I16): "INT16",
                          (_I8, _I16): "INT8_INT16"}),
    "AVERAGE_POOL_2D": ((0,), {(_I8,): "INT8", (_I16,): "INT16"}),
    "MAX_POOL_2D": ((0,), {(_I8,): "INT8", (_I16,): "INT16"}),
    "ADD": ((0,), {(_I8,): "INT8", (_I16,): "INT16"}),
    "MUL": ((0,), {(_I8,): "INT8"}),
    "MAXIMUM": ((0,), {(_I8,): "INT8"}),
    "MINIMUM": ((0,), {(_I8,): "INT8"}),
    "SVDF": ((0,), {(_I8,): "INT8"}),
    "BATCH_MATMUL": ((0, 1), {(_I8, _I8): "INT8", (_I16, _I16): "INT16"}),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": ((0, 2), {(_I8, _I8): "INT8", (_I16, _I8): "INT16"}),
    "PAD": ((0,), {(_I8,): "INT8"}),
    "TRANSPOSE": ((0,), {(_I8,): "INT8"}),
}
# Kernel headers micro_mutable_op_resolver.h does not include.
_EXTRA_HEADERS = {
    "PAD": "tensorflow/lite/micro/kernels/pad.h",
    "TRANSPOSE": "tensorflow/lite/micro/kernels/transpose.h",
}


def path(c_array_path):
    """The resolver header beside a C array: `a/model_data.cc` -> `a/model_data_ops.h`."""
    return os.path.splitext(os.fspath(c_array_path))[0] + "_ops.h"


def _types(subgraph, op, indices):
    types = []
    for i in indices:
        tensors = op.outputs if i < 0 else op.inputs
        position = -i - 1 if i < 0 else i
        if tensors is None or position >= len(tensors) or tensors[position] < 0:
            return None
        types.append(subgraph.tensors[tensors[position]].type)
    return tuple(types)


def ops(model_bytes):
    """The registration of each distinct operator of a .tflite file.

    Args:
        model_bytes: The flatbuffer.

    Returns:
        `[(op, method, registration)]` in order of first use: the op's
        name in the file (e.g. `"CONV_2D"`, `"TFLM_DECODE"`), the
        `MicroMutableOpResolver` method, and the argument it is called with
        (e.g. `"tflite::Register_CONV_2D_INT8()"`, or `""` for the method's
        default: the op's generic kernel).

    Raises:
        UnsupportedModelError: An op has no Add method in TFLM's
            `MicroMutableOpResolver` (90b983c2).
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    keys = {}  # op name -> set of variant type tuples, in first-use order
    for subgraph in model.subgraphs:
        for op in subgraph.operators or []:
            name = flatbuffer.op_name(model, op)
            found = keys.setdefault(name, set())
            if name in VARIANTS:
                found.add(_types(subgraph, op, VARIANTS[name][0]))
    rows = []
    for name, found in keys.items():
        method = ADD_METHODS.get(name) or CUSTOM_METHODS.get(name)
        if method is None:
            raise UnsupportedModelError(
                f"op {name!r} has no Add method in TFLM's MicroMutableOpResolver "
                "(90b983c2), so no op resolver header can be written for it; "
                "remove the op from the model, or export without c_array= and "
                "register a kernel for it by hand (AddCustom)."
            )
        registration = ""
        if name in VARIANTS and len(found) == 1:
            suffix = VARIANTS[name][1].get(next(iter(found)))
            if suffix is not None:
                registration = f"tflite::Register_{name}_{suffix}()"
        rows.append((name, method, registration))
    return rows


def render(model_bytes, name, arena_bytes=None, cmsis_nn_arena_bytes=None,
           reference_arena_bytes=None):
    """Renders the op resolver header of a .tflite file.

    Args:
        model_bytes: The flatbuffer.
        name: The symbol prefix (a C identifier, e.g. `"model_data"`).
        arena_bytes: The smallest arena measured on the host wheel
            (`ExportResult.arena_bytes`), written as `NAME_kArenaBytes`;
            None writes no arena constant.
        cmsis_nn_arena_bytes: The arena estimate for a 32-bit build with
            CMSIS-NN kernels (`firmware.arena`), written as
            `NAME_kArenaBytesCmsisNn`; None writes none.
        reference_arena_bytes: The same for reference kernels, written as
            `NAME_kArenaBytesReference`; None writes none.

    Returns:
        The header text: `NAME_kOpCount`, the arena constants and
        `NAME_RegisterOps(tflite::MicroMutableOpResolver<NAME_kOpCount>&)`.

    Raises:
        UnsupportedModelError: An op has no Add method in TFLM.
    """
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ValueError(f"name={name!r} is not a C identifier.")
    rows = ops(model_bytes)
    guard = f"{name.upper()}_OPS_H_"
    includes = ["tensorflow/lite/micro/micro_mutable_op_resolver.h"] + sorted(
        {_EXTRA_HEADERS[op] for op, _, reg in rows if reg and op in _EXTRA_HEADERS}
    )
    lines = [
        "// Generated by tflite_export. Do not edit.",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <cstddef>",
        "",
        *[f'#include "{h}"' for h in includes],
        "",
        f"// The distinct operators of the model ({', '.join(op for op, _, _ in rows)}).",
        f"constexpr int {name}_kOpCount = {len(rows)};",
    ]
    if reference_arena_bytes is not None or cmsis_nn_arena_bytes is not None:
        lines += [
            "",
            "// Tensor arena per kernel set for a 32-bit Cortex-M build of TFLM "
            f"{kernel_scratch.TFLM_COMMIT[:8]}:",
            "// upper bounds estimated from the host wheel's arena, its activations kept",
            "// and its persistent data recomputed for 32-bit pointers from struct sizes,",
            "// with worst-case alignment (tflite_export.device.firmware.arena); CMSIS-NN adds its",
            "// largest scratch buffer. No margin beyond that: another TFLM version can",
            "// need more.",
        ]
        if reference_arena_bytes is not None:
            lines.append(
                f"constexpr size_t {name}_kArenaBytesReference = {int(reference_arena_bytes)};")
        if cmsis_nn_arena_bytes is not None:
            lines.append(
                f"constexpr size_t {name}_kArenaBytesCmsisNn = {int(cmsis_nn_arena_bytes)};")
    if arena_bytes is not None:
        lines += [
            "",
            "// Smallest tensor arena, measured with TFLM's reference kernels on the",
            "// host tflite-micro wheel (64-bit pointers): an upper bound for a 32-bit",
            "// build with reference kernels.",
            f"constexpr size_t {name}_kArenaBytes = {int(arena_bytes)};",
        ]
    lines += [
        "",
        "// Registers exactly the model's operators. Where TFLM declares a",
        "// type-specific registration for the tensor types the model uses",
        "// (e.g. Register_CONV_2D_INT8), it is used, so the linker can drop the",
        "// kernels for other types (measured outside this project: up to 30 KB",
        "// of code on a CMSIS-NN build); without optimized kernels it falls back",
        "// to the generic kernel.",
    ]
    if any(method == "AddDecode" for _, method, _ in rows):
        lines += [
            "// AddDecode registers TFLM_DECODE, which expands the compressed weights",
            "// into the arena before their op runs: it does not need",
            "// USE_TFLM_COMPRESSION.",
        ]
    lines += [
        f"inline TfLiteStatus {name}_RegisterOps(",
        f"    tflite::MicroMutableOpResolver<{name}_kOpCount>& resolver) {{",
    ]
    for op, method, registration in rows:
        lines += [
            f"  if (resolver.{method}({registration}) != kTfLiteOk) {{  // {op}",
            "    return kTfLiteError;",
            "  }",
        ]
    lines += ["  return kTfLiteOk;", "}", "", f"#endif  // {guard}", ""]
    return "\n".join(lines)


def render_for_export(model_bytes, c_array_path, arena_bytes, device_report=None):
    """The header `export(c_array=...)` writes beside the C array.

    Args:
        model_bytes: The written .tflite.
        c_array_path: The `.cc` path (names the symbols, like the C array's).
        arena_bytes: `ExportResult.arena_bytes`; with it, the 32-bit arena
            estimates of both kernel sets (`firmware.arenas`) are written too.
        device_report: `ExportResult.device`, or None; its arena estimate
            is the one written for its target's kernel set.

    Returns:
        The header text.
    """
    estimates = {}
    if arena_bytes is not None:
        estimates = {k: v[0] for k, v in firmware.arenas(model_bytes, arena_bytes).items()}
    if device_report is not None and device_report.arena_bytes is not None:
        estimates[device_report.target.kernels] = device_report.arena_bytes
    return render(model_bytes, c_array_lib.symbol_name(c_array_path), arena_bytes,
                  cmsis_nn_arena_bytes=estimates.get("cmsis-nn"),
                  reference_arena_bytes=estimates.get("reference"))
