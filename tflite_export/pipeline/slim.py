"""Removes from a .tflite flatbuffer what TFLM never reads.

TF's converter writes tensor names, signature defs, conversion metadata, a
zero point per channel (int64), quantisation arrays for int32 biases and
one empty buffer per activation tensor. On a small model that is half the
file. Bias quantisation goes only where TFLM never reads it (it checks the
bias scale of FULLY_CONNECTED with a per-tensor filter: `_bias_and_encoded`).
Each step below is named so that the exporter can drop one that changes an
output on TFLM (it verifies the slim file bit-exact against the full one)
and say so in its report.
"""

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.pipeline import flatbuffer

# Metadata TFLM reads (micro_allocator: offline-planned arena offsets).
_KEPT_METADATA = (b"OfflineMemoryAllocation",)

STEPS = (
    "names",
    "metadata",
    "zero_points",
    "bias_quantization",
    "encoded_quantization",
    "min_max",
    "shape_signatures",
    "empty_buffers",
)

_DECODE = "TFLM_DECODE"


def _per_tensor(subgraph, index):
    """Whether tensor `index` is quantised with one scale (per tensor)."""
    quant = subgraph.tensors[index].quantization
    scales = quant.scale if quant is not None else None
    return scales is not None and len(scales) == 1


def _bias_and_encoded(model, subgraph):
    """Indices of the weight ops' biases whose quantisation TFLM never
    reads, and of DECODE's encoded inputs.

    TFLM reads a bias's scale only where a kernel checks it against input
    scale x filter scale: FULLY_CONNECTED with a per-tensor filter
    (fully_connected_common.cc:136-141 -> kernel_util.cc:291-325 at
    90b983c2, int8 and int4 filters, reference and CMSIS-NN kernels alike;
    a bias without quantisation has scale 0 and fails the check). Per-channel
    filters (conv, depthwise, FULLY_CONNECTED) take per-channel multipliers
    from the filter's scales, and CONV_2D / DEPTHWISE_CONV_2D check the bias
    only for uint8 input (kernel_util.cc:271-281), which the exporter never
    writes.
    """
    biases, read, encoded = set(), set(), set()
    for op in subgraph.operators:
        name = flatbuffer.op_name(model, op)
        inputs = list(op.inputs) if op.inputs is not None else []
        if name in flatbuffer.WEIGHT_OPS:
            slot = 3 if name == "TRANSPOSE_CONV" else 2
            if len(inputs) > slot and inputs[slot] >= 0:
                bias = int(inputs[slot])
                biases.add(bias)
                if name == "FULLY_CONNECTED" and _per_tensor(subgraph, inputs[1]):
                    read.add(bias)
        elif name == _DECODE:
            # Inputs come in (encoded, ancillary) pairs.
            encoded.update(int(i) for i in inputs[0::2])
    return biases - read, encoded


def slim(model_bytes, steps=STEPS):
    """Applies the named slimming steps.

    Args:
        model_bytes: A .tflite flatbuffer.
        steps: Names from `STEPS`.

    Returns:
        The slim flatbuffer (aligned for TFLM), as bytes.

    Raises:
        ValueError: An unknown step name.
    """
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown slimming steps {sorted(unknown)}; known: {STEPS}.")
    from tflite_export.pipeline import tflm

    steps = set(steps)
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    if "names" in steps:
        model.description = None
    if "metadata" in steps:
        model.signatureDefs = None
        model.metadata = [
            m for m in (model.metadata or []) if m.name in _KEPT_METADATA
        ] or None
        model.metadataBuffer = None
    for subgraph in model.subgraphs:
        biases, encoded = _bias_and_encoded(model, subgraph)
        if "names" in steps:
            subgraph.name = None
        for index, tensor in enumerate(subgraph.tensors):
            if "names" in steps:
                tensor.name = None
            if "shape_signatures" in steps:
                tensor.shapeSignature = None
            quant = tensor.quantization
            if quant is None:
                continue
            if ("bias_quantization" in steps and index in biases) or (
                "encoded_quantization" in steps and index in encoded
            ):
                tensor.quantization = None
                continue
            if "min_max" in steps:
                quant.min = quant.max = None
            zeros = quant.zeroPoint
            # TFLM reads element 0 when the array is shorter than the
            # scales, but drops the quantisation when it is empty.
            if (
                "zero_points" in steps
                and zeros is not None
                and len(zeros) > 1
                and np.all(np.asarray(zeros) == zeros[0])
            ):
                quant.zeroPoint = [int(zeros[0])]
    if "empty_buffers" in steps:
        _drop_empty_buffers(model)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return tflm.align(bytes(builder.Output()))


def _drop_empty_buffers(model):
    """Points data-less tensors at buffer 0 and drops unreferenced buffers."""
    used = {0}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data
            if data is None or len(data) == 0:
                tensor.buffer = 0
            used.add(tensor.buffer)
    for entry in model.metadata or []:
        used.add(entry.buffer)
    order = sorted(used)
    new_index = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.buffer = new_index[tensor.buffer]
    for entry in model.metadata or []:
        entry.buffer = new_index[entry.buffer]
