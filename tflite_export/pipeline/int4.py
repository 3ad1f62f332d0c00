"""Native int4 weights: LUT kernels whose values are int4-exact.

A table (one per tensor, or one per output channel) is int4-exact when every
Keras value in it is s * k for one step s > 0 and integers k in [-8, 7].
Such a tensor can be stored as TFLite INT4 (two codes a byte, element 2i in
the low nibble, 2i+1 in the high one, flat in row-major order; an odd count
leaves the last high nibble 0: TFLM's `UnpackDenseInt4IntoInt8`) and read by
TFLM's CONV_2D and DEPTHWISE_CONV_2D (per tensor or per channel) and
FULLY_CONNECTED (per tensor only: per-channel int4 FC is refused at prepare,
90b983c2 `fully_connected_common.cc`). No DECODE op is involved (DECODE
cannot output int4); TFLM's reference kernels unpack the codes into an arena
scratch buffer.

Requantisation, as in `shared_tables`: the converter quantised table c with
`scale_c = max|real_c| / max|q_c|` (q: its int8 codes, max|q_c| = 127), and
real_c = |g_c| s_c k (g_c: a folded batch norm), so the int4 scale is
`scale_c * max|q_c| / max|k_c|` and the int32 bias is multiplied by
`max|k_c| / max|q_c|` and rounded. The int8 twin is rebuilt with the codes
k and these scales and biases; the int4 file must run bit-exact with it.
"""

import dataclasses

import numpy as np

from tflite_export.errors import ExportError
from tflite_export.pipeline import compress
from tflite_export.pipeline import shared_tables
from tflite_export.pipeline import tflm

CHOICES = ("never", "auto", "always")
DEFAULT = "never"
INT4_MIN, INT4_MAX = -8, 7
# Ops TFLM (90b983c2) runs with int4 weights, and whether per channel.
PER_CHANNEL_OPS = {"CONV_2D": True, "DEPTHWISE_CONV_2D": True, "FULLY_CONNECTED": False}
# Relative error of s * k against a Keras value still taken as exact.
RTOL = 1e-6


@dataclasses.dataclass
class Int4Tensor:
    """One weight tensor to store as INT4.

    Attributes:
        index: Weight tensor index in subgraph 0.
        bias_index: Its op's int32 bias tensor index, or None.
        requantized: `shared_tables.SharedCodes` for the int8 twin (codes k,
            the int4 scales, the bias ratios).
        packed: The packed INT4 bytes.
        tables: Number of scales (1 per tensor, else channels).
        codes: Distinct codes in the fullest table.
    """

    index: int
    bias_index: object
    requantized: object
    packed: bytes
    tables: int
    codes: int

    @property
    def nbytes(self):
        return len(self.packed)


def fit_step(values):
    """`(s, k)` with `values == s * k` for integer k in [-8, 7], else None.

    The coarsest such step is taken (s = max|v| / m for the smallest m).
    Robust to float rounding: |v - s k| <= 1e-6 max|v|. All-zero values
    give `(0.0, zeros)`.
    """
    v = np.asarray(values, np.float64).ravel()
    peak = np.abs(v).max() if v.size else 0.0
    if peak == 0:
        return 0.0, np.zeros(v.shape, np.int8)
    for m in range(1, -INT4_MIN + 1):
        s = peak / m
        k = np.round(v / s)
        if k.min() < INT4_MIN or k.max() > INT4_MAX:
            continue
        if np.abs(v - s * k).max() <= RTOL * peak:
            return s, k.astype(np.int8)
    return None


def pack(codes):
    """Packs int4 codes as TFLM reads them: element 2i low nibble, 2i+1 high."""
    flat = np.asarray(codes, np.int8).ravel()
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError("int4 codes must be in [-8, 7].")
    nibbles = (flat.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack(packed, count):
    """The `count` int8 codes of packed int4 bytes (inverse of `pack`)."""
    raw = np.frombuffer(bytes(packed), np.uint8)
    nibbles = np.empty(raw.size * 2, np.int16)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    nibbles = np.where(nibbles >= 8, nibbles - 16, nibbles)
    return nibbles[:count].astype(np.int8)


def _where(match):
    kernel = match.kernel
    return f"layer '{kernel.layer}' ({kernel.tensor}, {match.weight.op})"


def requantize(match):
    """`(Int4Tensor, None)` for an int4-exact weight tensor, else `(None, reason)`.

    Tables follow the tensor's int8 quantisation: one per output channel for
    a per-channel tensor, one for a per-tensor tensor.

    Args:
        match: A `mapping.Match` of an int8 weight tensor.
    """
    weight = match.weight
    if weight.op not in PER_CHANNEL_OPS:
        return None, f"TFLM's {weight.op} takes no int4 weights"
    if weight.scales is None or weight.array.dtype != np.int8:
        return None, "the weights are not int8"
    if weight.uses != 1:
        return None, "read by several ops"
    axis = weight.quantized_dimension
    if axis is not None and axis != weight.output_axis:
        return None, "not quantised per output channel"
    if axis is not None and not PER_CHANNEL_OPS[weight.op]:
        return None, (
            f"TFLM's {weight.op} takes int4 weights per tensor only, and this "
            "tensor is per channel"
        )
    out = weight.output_axis
    q = np.moveaxis(weight.array, out, 0).reshape(weight.array.shape[out], -1)
    keras_values = np.moveaxis(match.layout.astype(np.float64), out, 0)
    keras_values = keras_values.reshape(q.shape)
    factors = np.asarray(match.channel_factors, np.float64)
    sign = np.where(factors < 0, -1.0, 1.0)
    live = (factors != 0) & (np.abs(keras_values).max(axis=1) > 0)
    codes = np.zeros(q.shape, np.int8)
    if axis is None:
        # One grid: the converter's per-tensor factors are least-squares fits
        # (noisy at int8 rounding); a batch norm folded in with differing
        # factors fails the codes check below.
        sign[:] = -1.0 if np.sum(factors[live]) < 0 else 1.0
        fit = fit_step((keras_values * sign[:, None])[live])
        if fit is None:
            return None, "the values are not s*k with one step s and k in [-8, 7]"
        codes[live] = fit[1].reshape(-1, q.shape[1])
        peaks_k = np.full(1, np.abs(codes).max(), np.float64)
        peaks_q = np.full(1, np.abs(q).max(), np.float64)
    else:
        for c in np.flatnonzero(live):
            fit = fit_step(keras_values[c] * sign[c])
            if fit is None:
                return None, (
                    f"output channel {c}'s values are not s*k with one step s "
                    "and k in [-8, 7]"
                )
            codes[c] = fit[1]
        peaks_k = np.abs(codes).max(axis=1).astype(np.float64)
        peaks_q = np.abs(q).max(axis=1).astype(np.float64)
    # The int8 codes must be the int4 codes on the converter's grid (within
    # one code of rounding): else the tensor is not what the kernel says.
    per_table = peaks_q / np.where(peaks_k > 0, peaks_k, 1.0)
    expected = codes * (per_table[:, None] if axis is not None else per_table[0])
    if np.abs(expected - q).max(initial=0) > 1:
        return None, (
            "its int8 codes are not on the int4 grid (a batch norm folded into "
            "the kernel scales its channels differently?)"
        )
    zero = peaks_k == 0
    ratio = np.where(zero, 1.0, peaks_k / np.where(zero, 1.0, peaks_q))
    old = weight.scales.astype(np.float64)
    scales = np.where(zero, old, old / ratio)
    laid_out = np.moveaxis(codes.reshape(np.moveaxis(weight.array, out, 0).shape), 0, out)
    requantized = shared_tables.SharedCodes(
        codes=np.ascontiguousarray(laid_out).astype(np.int8),
        scales=scales.astype(np.float32),
        bias_ratios=ratio,
        table=np.unique(codes).astype(np.int8),
        negated=int(np.sum(live & (factors < 0))),
    )
    count = 1 if axis is None else q.shape[0]
    fullest = (
        len(np.unique(codes))
        if axis is None
        else max(len(np.unique(row)) for row in codes)
    )
    return Int4Tensor(
        index=weight.index,
        bias_index=weight.bias_index,
        requantized=requantized,
        packed=pack(requantized.codes),
        tables=count,
        codes=fullest,
    ), None


def _choice_bytes(layout, scales_kept):
    """File bytes of the tensor as its table layout stores it (LUT or int8)."""
    if not layout.compress:
        return layout.bytes_before
    weight = layout.match.weight
    scales = 0 if weight.scales is None else len(weight.scales)
    return layout.bytes_after + compress.overhead_bytes(len(weight.name), scales, scales_kept)


def choose(layouts, mode, scales_kept=False):
    """Picks the tensors to store as int4 and takes them off the LUT layouts.

    Args:
        layouts: `compress.TableLayout`s (after `compress.decide`).
        mode: `"never"`, `"auto"` (int4 where exact and no larger than the
            LUT or int8 choice) or `"always"` (every LUT kernel; one that is
            not int4-exact raises).
        scales_kept: Whether the file is unslimmed (`compress.decide`).

    Returns:
        `{weight tensor index: Int4Tensor}`; int4 layouts get `compress=False`
        and a note.

    Raises:
        ExportError: With `"always"`, a LUT kernel cannot be stored as int4
            (the message names it and says what to do).
    """
    chosen = {}
    if mode == "never":
        return chosen
    for layout in layouts:
        tensor, reason = requantize(layout.match)
        if tensor is None:
            if mode == "always":
                raise ExportError(_refusal(layout.match, reason))
            continue
        if mode == "auto" and tensor.nbytes > _choice_bytes(layout, scales_kept):
            layout.note = "; ".join(
                filter(None, [layout.note, f"int4-exact, but int4 ({tensor.nbytes} B) "
                              "is larger"])
            )
            continue
        layout.compress = False
        chosen[tensor.index] = tensor
    return chosen


def _refusal(match, reason):
    text = f"int4='always': {_where(match)} cannot be stored as int4: {reason}."
    if "per tensor only" in reason:
        text += (
            " Export with weight_quantization='dense_per_tensor' (FULLY_CONNECTED "
            "per tensor; the LUT-Q dictionary must then be per tensor), or give "
            "the layer a per-tensor dictionary, or use int4='auto'."
        )
    elif "not s*k" in reason:
        text += (
            " int4 needs every table's values on one uniform grid of at most 16 "
            "levels (e.g. lutq_tf's Uniform constraint, K <= 16); use int4='auto' "
            "to keep the other tensors as LUTs or int8."
        )
    else:
        text += " Use int4='auto' to store only the tensors that can be int4."
    return text + " Nothing was written."


def twin_rewrites(tensors):
    """`shared_tables.requantize` rewrites that put the int4 codes in the twin."""
    return {index: (t.requantized, t.bias_index) for index, t in tensors.items()}


def check_combinations(int4, quantize="int8", max_decode_bytes=None, ram_bytes=None):
    """Refuses `int4` (when given) where `export` would not apply it."""
    if int4 is None:
        return
    if quantize == "float32":
        raise ValueError(
            f"int4={int4!r} stores int8-quantised weights as int4, but "
            "quantize='float32' keeps float weights: drop int4, or export with "
            "quantize='int8'."
        )
    budget = [name for name, value in (("max_decode_bytes", max_decode_bytes),
                                       ("ram_bytes", ram_bytes)) if value is not None]
    if budget and int4 != "never":
        raise ValueError(
            f"int4={int4!r} with {budget[0]} is not supported yet (the RAM "
            "planner does not count int4 kernels' unpack buffers): drop one."
        )


def write(model_bytes, tensors):
    """Stores the given weight tensors as packed INT4 in a flatbuffer.

    Args:
        model_bytes: The requantised (maybe compressed) flatbuffer; tensor
            indices as in the converter's file (DECODE insertion appends).
        tensors: `{weight tensor index: Int4Tensor}`.

    Returns:
        The flatbuffer (aligned), or `model_bytes` when `tensors` is empty.
    """
    if not tensors:
        return bytes(model_bytes)
    tflm.require()
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    model = model_editor.read(bytes(model_bytes))
    subgraph = model.subgraphs[0]
    for index, tensor in tensors.items():
        target = subgraph.tensors[index]
        if target.dtype != schema_py_generated.TensorType.INT8:
            raise ExportError(
                f"int4: tensor {index} ({target.name}) is not int8 in the twin; "
                "cannot pack it."
            )
        target.dtype = schema_py_generated.TensorType.INT4
        target.buffer = model_editor.Buffer(data=tensor.packed)
    model_editor.prune_buffers(model)
    return tflm.align(model.build())


def as_int8(model_bytes):
    """The file with every INT4 tensor of subgraph 0 stored as INT8 (the same
    codes, scales and graph), or None when it holds no INT4 tensor.

    TFLM's reference kernels run it without unpacking anything: its arena
    on the wheel is the int4 file's without the unpack scratch buffers
    (`firmware.arena` estimates CMSIS-NN's from it).
    """
    tflm.require()
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    model = model_editor.read(bytes(model_bytes))
    found = False
    for tensor in model.subgraphs[0].tensors:
        if tensor.dtype == schema_py_generated.TensorType.INT4:
            codes = unpack(tensor.buffer.data, int(np.prod(tensor.shape)))
            tensor.dtype = schema_py_generated.TensorType.INT8
            tensor.buffer = model_editor.Buffer(data=codes.tobytes())
            found = True
    if not found:
        return None
    model_editor.prune_buffers(model)
    return tflm.align(model.build())
