"""Graphs TFLM cannot run, refused before the arena search and the file.

TFLM's kernels have limits the converter does not know about. Without this
check such a model fails in the arena search, which doubles the arena up to
512 MiB before it gives up with the kernel's log, repeated per try.
"""

import keras
from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.errors import UnsupportedModelError
from tflite_export.pipeline import flatbuffer
from tflite_export.pipeline import lut_tensors

# tensorflow/lite/micro/kernels/concatenation.cc: kMaxInputNum.
MAX_CONCATENATION_INPUTS = 10


def check(model_bytes, keras_model):
    """Raises `UnsupportedModelError` for ops beyond TFLM's kernel limits.

    Args:
        model_bytes: the converted .tflite flatbuffer.
        keras_model: the Keras model it came from (to name the layers).
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    problems = []
    for number, op in enumerate(model.subgraphs[0].operators):
        name = flatbuffer.op_name(model, op)
        inputs = len(op.inputs) if op.inputs is not None else 0
        if name == "CONCATENATION" and inputs > MAX_CONCATENATION_INPUTS:
            problems.append(f"op {number} CONCATENATION has {inputs} inputs")
    if not problems:
        return
    layers = [
        layer.name for layer in lut_tensors.all_layers(keras_model)
        if isinstance(layer, keras.layers.Concatenate)
        and _inbound_count(layer) > MAX_CONCATENATION_INPUTS
    ]
    raise UnsupportedModelError(
        "TFLM cannot run this model: " + "; ".join(problems) + ", and TFLM's "
        f"CONCATENATION takes at most {MAX_CONCATENATION_INPUTS} inputs"
        + (f" (Keras layer(s) {', '.join(layers)})" if layers else "")
        + ". Concatenate in stages: nested Concatenate layers of at most "
        f"{MAX_CONCATENATION_INPUTS} inputs each give the same tensor."
    )


def _inbound_count(layer):
    """The most inputs any call of `layer` takes."""
    counts = [len(node.input_tensors) for node in layer._inbound_nodes]
    return max(counts, default=0)
