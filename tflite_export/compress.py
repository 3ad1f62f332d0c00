"""Plans the LUT tables of each weight tensor and compresses the model.

For each weight tensor that holds a LUT kernel: the table mode follows the
tensor's quantisation (TFLM decodes per channel only along the
`quantized_dimension` of a per-channel quantised tensor; a per-tensor or
float tensor needs one table, anything else decodes to wrong values), the
index width is what the fullest table needs, and the tensor is compressed
only if that makes the file smaller.
"""

import dataclasses
import warnings

import numpy as np

from tflite_export import tflm
from tflite_export.errors import ExportError
from tflite_export.lut_tensors import MAX_TABLE_VALUES
from tflite_export.lut_tensors import distinct_per_column

# Bytes of the DECODE op's common metadata in front of the value tables.
_DCM_BYTES = 16
# File bytes a compressed tensor adds beyond its data: the DECODE op, an
# ancillary tensor and a decoded tensor (named after the original) and
# buffer alignment: measured 150-190 bytes plus the two names on small
# models, rounded up so that a tensor we compress never grows the file.
_OVERHEAD_BYTES = 256
# The decoded tensor copies the quantisation: a float32 scale and an int64
# zero point per channel.
_BYTES_PER_SCALE = 12


@dataclasses.dataclass
class TablePlan:
    """How one weight tensor is (or is not) compressed.

    Attributes:
        match: The `mapping.Match` (weight tensor and Keras kernel).
        per_channel: Whether there is one table per channel.
        axis: The channel axis of per-channel tables, else None.
        tables: Number of tables.
        codes: Distinct stored values in the fullest table.
        keras_values: Distinct Keras kernel values in the fullest table.
        merged: Number of Keras values that quantisation merged into one
            code, summed over tables (0 = nothing rounded away).
        index_bits: Bits per index.
        bytes_before: Bytes of the tensor's data uncompressed.
        bytes_after: Bytes of packed indices plus value tables and metadata.
        compress: Whether the tensor is compressed.
        note: Why not, or anything else the report should say.
    """

    match: object
    per_channel: bool
    axis: int
    tables: int
    codes: int
    keras_values: int
    merged: int
    index_bits: int
    bytes_before: int
    bytes_after: int
    compress: bool = False
    note: str = ""

    @property
    def spread(self):
        """Whether a table holds more codes than the LUT-Q dictionary has values."""
        return self.codes > self.match.kernel.num_values


def _per_table(array, axis):
    """`array` as `[elements, tables]`: one column per table."""
    if axis is None:
        return array.reshape(-1, 1)
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1).T


def plan_table(match):
    """Counts the codes of one matched weight tensor and sizes its tables.

    Args:
        match: A `mapping.Match`.

    Returns:
        A `TablePlan` with `compress` still False.
    """
    weight = match.weight
    axis = weight.quantized_dimension
    codes = distinct_per_column(_per_table(weight.array, axis))
    keras_values = distinct_per_column(_per_table(match.layout, axis))
    most = int(codes.max())
    bits = max(1, (most - 1).bit_length())
    itemsize = weight.array.dtype.itemsize
    index_bytes = -(-weight.array.size * bits // 8)
    table_bytes = len(codes) * most * itemsize
    return TablePlan(
        match=match,
        per_channel=axis is not None,
        axis=axis,
        tables=len(codes),
        codes=most,
        keras_values=int(keras_values.max()),
        merged=int(np.maximum(keras_values - codes, 0).sum()),
        index_bits=bits,
        bytes_before=weight.nbytes,
        bytes_after=index_bytes + _DCM_BYTES + table_bytes,
    )


def decide(plan):
    """Sets `plan.compress` and `plan.note`; raises if a table cannot be stored."""
    kernel = plan.match.kernel
    where = f"layer '{kernel.layer}' ({kernel.tensor}, {plan.match.weight.op})"
    if plan.codes > MAX_TABLE_VALUES:
        raise ExportError(
            f"{where}: a value table would need {plan.codes} entries, more "
            f"than the {MAX_TABLE_VALUES} TFLM's LUT compression holds (K="
            f"{kernel.num_values}). TFLM decodes a float32 tensor with one "
            "table, so per-channel dictionaries or a batch norm folded into "
            "the kernel put up to K values per channel into it. Export with "
            "quantize='int8' (per-channel tables), or use per-tensor "
            "dictionaries without a batch norm after this layer."
        )
    notes = []
    if plan.merged:
        notes.append(
            f"int8 rounding merged {plan.merged} of the Keras values"
        )
    if plan.spread:
        notes.append(
            f"{plan.codes} codes > K={kernel.num_values}"
            + (" (batch norm folded)" if plan.match.folded else "")
        )
    weight = plan.match.weight
    scales = 0 if weight.scales is None else len(weight.scales)
    overhead = _OVERHEAD_BYTES + 2 * len(weight.name) + _BYTES_PER_SCALE * scales
    plan.compress = plan.bytes_after + overhead < plan.bytes_before
    if not plan.compress:
        notes.append(
            f"kept uncompressed: would add ~{plan.bytes_after + overhead - plan.bytes_before} bytes"
        )
    plan.note = "; ".join(notes)
    return plan


def compress_model(model_bytes, plans):
    """Writes the compressed model for the plans marked `compress`.

    Args:
        model_bytes: The uncompressed .tflite flatbuffer.
        plans: `TablePlan`s.

    Returns:
        The compressed flatbuffer (bytes), or `model_bytes` itself when no
        plan is marked `compress`.
    """
    chosen = [p for p in plans if p.compress]
    if not chosen:
        return bytes(model_bytes)
    compression, _, spec = tflm.require()
    builder = compression.SpecBuilder()
    for plan in chosen:
        mode = spec.PerChannel(axis=plan.axis) if plan.per_channel else spec.PerTensor()
        builder.add_tensor(subgraph=0, tensor=plan.match.weight.index).with_lut(
            index_bitwidth=plan.index_bits, mode=mode
        )
    with warnings.catch_warnings():
        # Our own size check ran first; the tool's expansion warning would
        # only repeat the per-tensor figures the report gives.
        warnings.filterwarnings(
            "ignore", message=".*resulted in expansion", category=UserWarning
        )
        try:
            return bytes(compression.compress(bytes(model_bytes), builder.build()))
        except Exception as e:
            raise ExportError(f"TFLM's compression tool failed: {e}") from e
