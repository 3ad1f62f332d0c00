"""One value table for all channels of a per-channel int8 weight tensor.

A kernel whose channels draw on one dictionary d is, after the converter
folds a batch norm (or a LUT-Q channel scale s_c) into it, g_c * d[A] in
channel c. The converter quantises each channel with its own scale
`max|g_c d[A_c]| / 127`, so the same d gives different int8 codes in each
channel, and the LUT needs one table per channel (C x K bytes).

Rewriting channel c's scale to `|g_c| max|d| / 127` gives every channel the
codes `round(127 d / max|d|)`, up to sign: one K-entry table serves them all
when TFLM's DECODE steps its table pointer by 0 per channel
(`decode_state_lut.cc`, verified on the pinned tflite-micro). Channels with
g_c < 0 (a negative batch-norm gamma) hold the negated codes; the table is
the union of both signs, which is K entries again for a symmetric d.

The int32 bias of the op is requantised with the new scales. The converter
set `scale_c = |g_c| max_c / 127` (max_c: the largest |d| used in channel
c), so the new scale is `scale_c * max|d| / max_c` exactly, and channels
that use the largest |d| keep their scale and codes bit for bit.
"""

import dataclasses

import numpy as np

from tflite_export.pipeline.lut_tensors import MAX_TABLE_VALUES

_INT8_MAX = 127


@dataclasses.dataclass
class SharedCodes:
    """A weight tensor requantised so that its channels share one table.

    Attributes:
        codes: int8 array in the TFLite layout, the new weight data.
        scales: float32 `[C]`, the new per-channel scales.
        bias_ratios: float64 `[C]`, old scale over new scale (the int32
            bias is multiplied by it and rounded).
        table: int8, the sorted distinct codes (the shared value table).
        negated: Number of channels whose codes are negated.
    """

    codes: np.ndarray
    scales: np.ndarray
    bias_ratios: np.ndarray
    table: np.ndarray
    negated: int


def _along(values, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(values, shape)


def shared_codes(match):
    """Requantises one matched weight tensor for a shared table.

    Args:
        match: A `mapping.Match` of a per-channel int8 weight tensor.

    Returns:
        `(SharedCodes, None)`, or `(None, reason)` when the channels do not
        draw on one dictionary or the tensor is not per-channel int8.
    """
    weight, kernel = match.weight, match.kernel
    if kernel.per_channel:
        return None, "per-channel dictionaries"
    if weight.scales is None or weight.array.dtype != np.int8:
        return None, "not int8"
    axis = weight.quantized_dimension
    if axis is None or axis != weight.output_axis:
        return None, "not quantised per output channel"
    if weight.uses != 1:
        return None, "read by several ops"
    ndim = weight.array.ndim
    base = match.layout.astype(np.float64)
    factors = np.asarray(match.channel_factors, np.float64)
    if kernel.channel_scales is not None:
        scales = np.asarray(kernel.channel_scales, np.float64)
        safe = np.where(scales != 0, scales, 1.0)
        base = base / _along(safe, axis, ndim)
    moved = np.moveaxis(np.abs(base), axis, 0).reshape(base.shape[axis], -1)
    channel_peak = moved.max(axis=1)
    peak = channel_peak.max()
    if peak == 0:
        return None, "all weights are 0"
    live = (channel_peak > 0) & (factors != 0)
    unit = np.round(base * (_INT8_MAX / peak))
    sign = np.where(factors < 0, -1.0, 1.0)
    codes = unit * _along(sign * live, axis, ndim)
    old = weight.scales.astype(np.float64)
    ratio = np.where(live, peak / np.where(live, channel_peak, 1.0), 1.0)
    table = np.unique(codes).astype(np.int8)
    if len(table) > MAX_TABLE_VALUES:
        return None, f"{len(table)} shared codes"
    return (
        SharedCodes(
            codes=codes.astype(np.int8),
            scales=(old * ratio).astype(np.float32),
            bias_ratios=1.0 / ratio,
            table=table,
            negated=int(np.sum(live & (factors < 0))),
        ),
        None,
    )


def requantize(model_bytes, rewrites):
    """Writes shared-table codes, scales and biases into a flatbuffer.

    Args:
        model_bytes: The converter's .tflite flatbuffer.
        rewrites: `{weight tensor index: (SharedCodes, bias tensor index or
            None)}`.

    Returns:
        The requantised flatbuffer (aligned), or `model_bytes` unchanged
        when `rewrites` is empty.
    """
    if not rewrites:
        return bytes(model_bytes)
    from tflite_export.pipeline import tflm

    compression, _, _ = tflm.require()
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    model = model_editor.read(bytes(model_bytes))
    tensors = model.subgraphs[0].tensors
    for index, (shared, bias_index) in rewrites.items():
        tensor = tensors[index]
        tensor.buffer = model_editor.Buffer(data=shared.codes.tobytes())
        quant = tensor.quantization
        quant.scales = [float(s) for s in shared.scales]
        if bias_index is None:
            continue
        bias = tensors[bias_index]
        values = bias.array.astype(np.float64) * shared.bias_ratios
        info = np.iinfo(bias.array.dtype)
        rounded = np.clip(np.round(values), info.min, info.max)
        bias.buffer = model_editor.Buffer(
            data=rounded.astype(bias.array.dtype).tobytes()
        )
        if bias.quantization is not None and len(bias.quantization.scales) == len(
            shared.bias_ratios
        ):
            bias.quantization.scales = [
                float(s / r)
                for s, r in zip(bias.quantization.scales, shared.bias_ratios)
            ]
    model_editor.prune_buffers(model)
    return tflm.align(model.build())
