"""Lays out the LUT tables of each weight tensor and compresses the model.

For each weight tensor that holds a LUT kernel: the table mode follows the
tensor's quantisation (TFLM decodes per channel only along the
`quantized_dimension` of a per-channel quantised tensor; a per-tensor or
float tensor needs one table, anything else decodes to wrong values). A
per-channel tensor whose channels draw on one dictionary gets one table
shared by every channel (`shared_tables`); otherwise one per channel. The
index width is what the fullest table needs, and the tensor is compressed
only if that makes the file smaller.

The encoding is TFLM's LUT format (DECODE common metadata, then the value
tables), written here because TFLM's compressor always sets the table stride
to the table length; the DECODE ops are inserted by TFLM's own tool.
"""

import dataclasses

import numpy as np

from lutq_tf.quantizer import index_bits
from tflite_export.errors import ExportError
from tflite_export.pipeline import shared_tables
from tflite_export.pipeline import tflm
from tflite_export.pipeline.lut_tensors import MAX_TABLE_VALUES
from tflite_export.pipeline.lut_tensors import distinct_per_column

# Bytes of the DECODE op's common metadata in front of the value tables.
DCM_BYTES = 16
# File bytes a compressed tensor adds beyond its data in a slim file: the
# DECODE op and its opcode reference, an ancillary and a decoded tensor,
# two buffer entries and their alignment; measured ~104 bytes, rounded up
# so that a tensor we compress never grows the file.
_OVERHEAD_BYTES = 128
# Unslimmed, the encoded tensor keeps a float32 scale and an int64 zero
# point per channel.
_BYTES_PER_QUANTIZATION = 12
# The DCM's axis nibble for "one table" (tflite-micro's compression/lut.py).
# Written for per-tensor and shared tables alike. TFLM's kernel (90b983c2)
# masks byte 5 with 0x07 and never reads the nibble: it takes channels from
# the output's quantisation and shares a table through stride 0. The marker
# is for a kernel that reads it.
ONE_TABLE_AXIS = 0xF
_LUT_VERSION = 1
_DECODE_TYPE_LUT = 0
_DCM_VERSION = 1


@dataclasses.dataclass
class TableLayout:
    """How one weight tensor is (or is not) compressed.

    Attributes:
        match: The `mapping.Match` (weight tensor and Keras kernel).
        mode: `"shared"` (one table for every channel of a per-channel
            tensor), `"per-channel"` or `"per-tensor"`.
        axis: The channel axis of a per-channel tensor, else None.
        tables: Number of value tables.
        codes: Entries of the fullest table.
        keras_values: Distinct Keras kernel values in the fullest table.
        merged: Number of Keras values that quantisation merged into one
            code, summed over tables (0 = nothing rounded away).
        index_bits: Bits per index.
        bytes_before: Bytes of the tensor's data uncompressed.
        bytes_after: Bytes of packed indices, DECODE metadata and tables.
        shared: The `shared_tables.SharedCodes` of a shared table, else None.
        compress: Whether the tensor is compressed.
        note: Why not, or anything else the report should say.
    """

    match: object
    mode: str
    axis: int
    tables: int
    codes: int
    keras_values: int
    merged: int
    index_bits: int
    bytes_before: int
    bytes_after: int
    shared: object = None
    compress: bool = False
    note: str = ""

    @property
    def per_channel(self):
        return self.mode == "per-channel"

    @property
    def spread(self):
        """Whether a table holds more codes than the LUT-Q dictionary has values."""
        return self.mode != "shared" and self.codes > self.match.kernel.num_values

    @property
    def table_values(self):
        """Value-table entries stored (all tables)."""
        return self.tables * self.codes

    @property
    def index_bytes(self):
        return -(-self.match.weight.array.size * self.index_bits // 8)


def _per_table(array, axis):
    """`array` as `[elements, tables]`: one column per table."""
    if axis is None:
        return array.reshape(-1, 1)
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1).T




def lut_bytes(size, tables, entries, itemsize=1):
    """Bytes of one compressed tensor's data: packed indices, DCM, tables.

    Args:
        size: Elements of the weight tensor.
        tables: Number of value tables (1 for a shared or per-tensor table).
        entries: Entries per table (the fullest table's codes).
        itemsize: Bytes per table entry (1 for int8).
    """
    packed = -(-int(size) * index_bits(entries) // 8)
    return packed + DCM_BYTES + int(tables) * int(entries) * int(itemsize)


def overhead_bytes(name_length=0, scales=0, scales_kept=False):
    """File bytes a compressed tensor adds beyond `lut_bytes` (see `decide`).

    Args:
        name_length: Characters of the weight tensor's name (counted only
            when `scales_kept`, an unslimmed file).
        scales: Number of the tensor's quantisation scales.
        scales_kept: Whether the encoded tensor keeps a copy of the scales.
    """
    if not scales_kept:
        return _OVERHEAD_BYTES
    return _OVERHEAD_BYTES + 2 * int(name_length) + _BYTES_PER_QUANTIZATION * int(scales)


def table_layout(match, share=True):
    """Counts the codes of one matched weight tensor and sizes its tables.

    A per-channel tensor whose channels share a dictionary gets the smaller
    of one shared table (requantised) and one table per channel.

    Args:
        match: A `mapping.Match`.
        share: Whether a shared table may be chosen.

    Returns:
        A `TableLayout` with `compress` still False.
    """
    weight = match.weight
    axis = weight.quantized_dimension
    codes = distinct_per_column(_per_table(weight.array, axis))
    keras_values = distinct_per_column(_per_table(match.layout, axis))
    most = int(codes.max())
    itemsize = weight.array.dtype.itemsize
    size = weight.array.size
    layout = TableLayout(
        match=match,
        mode="per-tensor" if axis is None else "per-channel",
        axis=axis,
        tables=len(codes),
        codes=most,
        keras_values=int(keras_values.max()),
        merged=int(np.maximum(keras_values - codes, 0).sum()),
        index_bits=index_bits(most),
        bytes_before=weight.nbytes,
        bytes_after=lut_bytes(size, len(codes), most, itemsize),
    )
    if axis is None or not share:
        return layout
    shared, reason = shared_tables.shared_codes(match)
    if shared is None:
        layout.note = f"per-channel tables: {reason}"
        return layout
    entries = len(shared.table)
    shared_after = lut_bytes(size, 1, entries, itemsize)
    if shared_after < layout.bytes_after:
        layout = dataclasses.replace(
            layout,
            mode="shared",
            tables=1,
            codes=entries,
            merged=max(int(keras_values.max()) - entries, 0)
            if not shared.negated
            else 0,
            index_bits=index_bits(entries),
            bytes_after=shared_after,
            shared=shared,
        )
        if shared.negated:
            layout.note = f"{shared.negated} channels negated"
    else:
        # Negated channels of an asymmetric dictionary, or all-zero channels
        # (a 0 code the dictionary lacks), cost the shared table an index bit.
        layout.note = (
            f"per-channel tables: smaller than one shared table of {entries} "
            f"codes ({shared.negated} channels negated)"
        )
    return layout


def decide(layout, scales_kept=True):
    """Sets `layout.compress` and `layout.note`; raises if a table cannot be stored.

    Args:
        layout: A `TableLayout`.
        scales_kept: Whether the encoded tensor keeps a copy of the scales
            (an unslimmed file).
    """
    kernel = layout.match.kernel
    where = f"layer '{kernel.layer}' ({kernel.tensor}, {layout.match.weight.op})"
    if layout.codes > MAX_TABLE_VALUES:
        raise ExportError(
            f"{where}: a value table would need {layout.codes} entries, more "
            f"than the {MAX_TABLE_VALUES} TFLM's LUT compression holds (K="
            f"{kernel.num_values}). TFLM decodes a float32 tensor with one "
            "table, so per-channel dictionaries or a batch norm folded into "
            "the kernel put up to K values per channel into it. Export with "
            "quantize='int8' (per-channel tables), or use per-tensor "
            "dictionaries without a batch norm after this layer."
        )
    notes = [layout.note] if layout.note else []
    if layout.merged:
        notes.append(
            f"int8 rounding merged {layout.merged} of the Keras values"
        )
    if layout.spread:
        notes.append(
            f"{layout.codes} codes > K={kernel.num_values}"
            + (" (batch norm folded)" if layout.match.folded else "")
        )
    weight = layout.match.weight
    # Unslimmed, the encoded tensor keeps a copy of the scales and zero
    # points, and the added tensors carry names.
    overhead = overhead_bytes(
        len(weight.name), 0 if weight.scales is None else len(weight.scales),
        scales_kept)
    layout.compress = layout.bytes_after + overhead < layout.bytes_before
    if not layout.compress:
        notes.append(
            "kept uncompressed: would add "
            f"~{layout.bytes_after + overhead - layout.bytes_before} bytes"
        )
    layout.note = "; ".join(notes)
    return layout


def pack_indices(indices, bits):
    """Packs indices, most significant bit first, as TFLM's DECODE reads them."""
    flat = np.asarray(indices, np.uint32).ravel()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((flat[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def _metadata(bits, axis, stride):
    """DECODE common metadata for a LUT: type, version, then the LUT header."""
    dcm = bytearray(DCM_BYTES)
    dcm[0] = _DECODE_TYPE_LUT
    dcm[1] = _DCM_VERSION
    dcm[4] = _LUT_VERSION
    dcm[5] = ((axis & 0x0F) << 4) | (bits & 0x07)
    dcm[6] = stride
    return bytes(dcm)


def encode(layout, array):
    """`(packed indices, ancillary data)` of one tensor, in TFLM's LUT format.

    Args:
        layout: The tensor's `TableLayout`.
        array: The tensor's values as stored in the (requantised) model.
    """
    if layout.mode == "shared":
        table = layout.shared.table
        indices = np.searchsorted(table, array)
        # Stride 0: every channel's table pointer stays on the one table.
        ancillary = (_metadata(layout.index_bits, ONE_TABLE_AXIS, 0)
                     + table.tobytes())
        return pack_indices(indices, layout.index_bits), ancillary
    if layout.mode == "per-tensor":
        table, indices = np.unique(array, return_inverse=True)
        ancillary = _metadata(layout.index_bits, ONE_TABLE_AXIS, len(table))
        return (pack_indices(indices, layout.index_bits),
                ancillary + table.tobytes())
    moved = np.moveaxis(array, layout.axis, 0)
    stride = layout.codes
    tables = np.zeros((moved.shape[0], stride), array.dtype)
    indices = np.empty(moved.shape, np.int64)
    for c, channel in enumerate(moved):
        values, inverse = np.unique(channel, return_inverse=True)
        tables[c, : len(values)] = values
        indices[c] = inverse.reshape(channel.shape)
    indices = np.moveaxis(indices, 0, layout.axis)
    ancillary = _metadata(layout.index_bits, layout.axis, stride) + tables.tobytes()
    return pack_indices(indices, layout.index_bits), ancillary


def compress_model(model_bytes, layouts):
    """Writes the compressed model for the layouts marked `compress`.

    Args:
        model_bytes: The uncompressed .tflite flatbuffer (requantised for
            the shared tables).
        layouts: `TableLayout`s.

    Returns:
        The compressed flatbuffer (bytes), or `model_bytes` itself when no
        layout is marked `compress`.
    """
    chosen = [t for t in layouts if t.compress]
    if not chosen:
        return bytes(model_bytes)
    tflm.require()
    from tflite_micro.tensorflow.lite.micro.compression import compressor
    from tflite_micro.tensorflow.lite.micro.compression import decode_insert
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    try:
        model = model_editor.read(bytes(model_bytes))
        tensors = model.subgraphs[0].tensors
        results = {}
        for layout in chosen:
            index = layout.match.weight.index
            encoded, ancillary = encode(layout, tensors[index].array)
            results[(0, index)] = compressor.CompressionResult(
                encoded_data=encoded, ancillary_data=ancillary
            )
        decode_insert.insert_decode_operators(model, results)
        return tflm.align(model.build())
    except Exception as e:
        raise ExportError(f"compressing the model failed: {e}") from e
