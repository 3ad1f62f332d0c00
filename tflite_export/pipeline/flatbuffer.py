"""Reads what the exporter needs from a .tflite flatbuffer.

Uses TensorFlow's own copy of the TFLite schema, so reading needs no
tflite-micro.
"""

import dataclasses

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

# Ops whose weights (input 1) TFLM can decode from a LUT, and the axis of the
# weight tensor that indexes output channels (where batch norm folds in).
WEIGHT_OPS = {
    "CONV_2D": 0,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 0,
    "TRANSPOSE_CONV": 0,
}
WEIGHT_INPUT = 1

_OP_NAMES = {
    value: name
    for name, value in vars(schema.BuiltinOperator).items()
    if not name.startswith("_")
}
_NUMPY_TYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT32: np.int32,
}


@dataclasses.dataclass
class WeightTensor:
    """A constant weight tensor of a CONV/DEPTHWISE/FC/TRANSPOSE_CONV op.

    Attributes:
        index: Tensor index in subgraph 0.
        name: Tensor name the converter gave it.
        op: Name of the (first) op that reads it, e.g. `"CONV_2D"`.
        array: Its values (int8 codes or float32), in TFLite layout.
        scales: float32 array of quantisation scales, or None (float).
        quantized_dimension: The axis of per-channel quantisation, or None
            when the tensor is per-tensor quantised or float.
        output_axis: The axis that indexes output channels.
        bias_index: Tensor index of the op's int32/int64 bias, or None.
        uses: Number of ops that read the tensor.
    """

    index: int
    name: str
    op: str
    array: np.ndarray
    scales: np.ndarray
    quantized_dimension: int
    output_axis: int
    bias_index: int = None
    uses: int = 1

    @property
    def nbytes(self):
        return self.array.nbytes

    @property
    def dtype(self):
        return self.array.dtype

    def dequantized(self):
        """The real values the tensor stands for."""
        values = self.array.astype(np.float64)
        if self.scales is None:
            return values
        if self.quantized_dimension is None:
            return values * float(self.scales[0])
        shape = [1] * values.ndim
        shape[self.quantized_dimension] = -1
        return values * self.scales.reshape(shape)


@dataclasses.dataclass
class ModelInfo:
    """The parts of a .tflite model the exporter reads.

    Attributes:
        weights: `WeightTensor`s of the LUT-decodable ops, in op order.
        num_inputs: Number of model inputs.
    """

    weights: list
    num_inputs: int


def text(value):
    """A flatbuffer string (bytes or None) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else (value or "")


def op_name(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        return text(code.customCode)
    return _OP_NAMES.get(builtin, str(builtin))


def read(model_bytes):
    """Reads a .tflite flatbuffer.

    Args:
        model_bytes: The flatbuffer.

    Returns:
        A `ModelInfo`.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    subgraph = model.subgraphs[0]
    weights = {}
    uses = {}
    for op in subgraph.operators:
        for index in op.inputs if op.inputs is not None else []:
            uses[int(index)] = uses.get(int(index), 0) + 1
    for op in subgraph.operators:
        name = op_name(model, op)
        if name not in WEIGHT_OPS or len(op.inputs) <= WEIGHT_INPUT:
            continue
        index = int(op.inputs[WEIGHT_INPUT])
        if index < 0 or index in weights:
            continue
        # TRANSPOSE_CONV reads its bias as input 3, the others as input 2.
        bias_input = 3 if name == "TRANSPOSE_CONV" else 2
        bias = int(op.inputs[bias_input]) if len(op.inputs) > bias_input else -1
        tensor = subgraph.tensors[index]
        data = model.buffers[tensor.buffer].data if tensor.buffer else None
        dtype = _NUMPY_TYPES.get(tensor.type)
        if data is None or len(data) == 0 or dtype is None:
            continue  # not a constant, or a type LUTs do not hold
        array = np.frombuffer(bytes(data), dtype=dtype).reshape(tensor.shape)
        scales, axis = None, None
        quant = tensor.quantization
        if quant is not None and quant.scale is not None and len(quant.scale):
            scales = np.asarray(quant.scale, dtype=np.float32)
            # Same reading as TFLM's compressor: one scale on axis 0 means
            # per tensor.
            if len(scales) > 1 or quant.quantizedDimension != 0:
                axis = int(quant.quantizedDimension)
        weights[index] = WeightTensor(
            index=index,
            name=text(tensor.name),
            op=name,
            array=array,
            scales=scales,
            quantized_dimension=axis,
            output_axis=WEIGHT_OPS[name],
            bias_index=bias if bias >= 0 else None,
            uses=uses.get(index, 0),
        )
    return ModelInfo(
        weights=list(weights.values()),
        num_inputs=len(subgraph.inputs),
    )
