"""Where the bytes of a .tflite file go, and the information limit.

The information limit is what the weights themselves need: packed indices,
value-table entries, weights left uncompressed, 4 bytes per int32 bias and
4 bytes per weight-tensor channel scale. Everything else (DECODE headers,
activation quantisation, the graph, alignment) is overhead.
"""

import dataclasses

from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.pipeline import flatbuffer

_DCM_BYTES = 16
_DECODE = "TFLM_DECODE"


@dataclasses.dataclass
class Anatomy:
    """A file's bytes by part.

    Attributes:
        total: File bytes.
        packed_indices: Bytes of the bit-packed LUT indices.
        value_tables: Bytes of the value tables (after their headers).
        table_headers: Bytes of DECODE's 16-byte metadata headers.
        uncompressed_weights: Bytes of weight tensors stored as is.
        biases: Bytes of the weight ops' bias tensors.
        quantization: Bytes of all quantisation arrays (scales, zero
            points, min/max).
        other: The graph and everything else (`total` minus the above).
        information_limit: Packed indices, value-table entries,
            uncompressed weights, 4 B per bias and per weight channel scale.
    """

    total: int
    packed_indices: int
    value_tables: int
    table_headers: int
    uncompressed_weights: int
    biases: int
    quantization: int
    other: int
    information_limit: int

    def row(self):
        """The parts as `(name, bytes)` pairs, for reports."""
        return [
            ("packed indices", self.packed_indices),
            ("value tables", self.value_tables),
            ("table headers", self.table_headers),
            ("uncompressed weights", self.uncompressed_weights),
            ("biases", self.biases),
            ("quantization", self.quantization),
            ("graph and other", self.other),
        ]


def _quant_bytes(quant):
    if quant is None:
        return 0
    count = 0
    for field, size in (("scale", 4), ("zeroPoint", 8), ("min", 4), ("max", 4)):
        values = getattr(quant, field)
        count += 0 if values is None else size * len(values)
    return count


def read(model_bytes, layouts=()):
    """Breaks a flatbuffer down into its parts.

    Args:
        model_bytes: The .tflite flatbuffer.
        layouts: The exporter's `compress.TableLayout`s; the limit counts each
            compressed tensor's indices at its exact bit width and its
            table entries without padding.

    Returns:
        An `Anatomy`.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)

    def size(tensor):
        data = model.buffers[tensor.buffer].data
        return 0 if data is None else len(data)

    parts = dict(packed=0, tables=0, headers=0, weights=0, biases=0, quant=0)
    limit_scales = 0
    limit_biases = 0
    decoded_scales = {}
    for subgraph in model.subgraphs:
        tensors = subgraph.tensors
        parts["quant"] += sum(_quant_bytes(t.quantization) for t in tensors)
        for op in subgraph.operators:
            name = flatbuffer.op_name(model, op)
            inputs = list(op.inputs) if op.inputs is not None else []
            if name == _DECODE:
                for encoded, ancillary in zip(inputs[0::2], inputs[1::2]):
                    parts["packed"] += size(tensors[encoded])
                    table = size(tensors[ancillary])
                    parts["headers"] += min(table, _DCM_BYTES)
                    parts["tables"] += max(table - _DCM_BYTES, 0)
                for output in op.outputs:
                    quant = tensors[output].quantization
                    scales = 0 if quant is None or quant.scale is None else len(quant.scale)
                    decoded_scales[output] = scales
                continue
            if name not in flatbuffer.WEIGHT_OPS or len(inputs) < 2:
                continue
            weight = tensors[inputs[1]]
            weight_bytes = size(weight)
            parts["weights"] += weight_bytes
            if weight_bytes:
                quant = weight.quantization
                limit_scales += 0 if quant is None or quant.scale is None else len(quant.scale)
            else:
                limit_scales += decoded_scales.get(inputs[1], 0)
            slot = 3 if name == "TRANSPOSE_CONV" else 2
            if len(inputs) > slot and inputs[slot] >= 0:
                bias = tensors[inputs[slot]]
                parts["biases"] += size(bias)
                shape = [] if bias.shape is None else list(bias.shape)
                limit_biases += 4 * int(shape[-1]) if shape else 0
    compressed = [t for t in layouts if t.compress]
    if compressed:
        exact_indices = sum(-(-t.match.weight.array.size * t.index_bits // 8) for t in compressed)
        entries = sum(t.table_values * t.match.weight.array.dtype.itemsize for t in compressed)
    else:
        exact_indices, entries = parts["packed"], parts["tables"]
    known = sum(parts.values())
    parts = {key: int(value) for key, value in parts.items()}
    return Anatomy(
        total=len(model_bytes),
        packed_indices=parts["packed"],
        value_tables=parts["tables"],
        table_headers=parts["headers"],
        uncompressed_weights=parts["weights"],
        biases=parts["biases"],
        quantization=parts["quant"],
        other=len(model_bytes) - known,
        information_limit=int(exact_indices + entries + parts["weights"]
                              + limit_biases + 4 * limit_scales),
    )
