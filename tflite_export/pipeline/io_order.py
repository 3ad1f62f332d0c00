"""Puts a converted model's inputs and outputs in the Keras model's order.

TF's converter orders a SavedModel signature's inputs and outputs by name
(verified on TF 2.21: Keras inputs `zeta, alpha, mid` became TFLite inputs
`zeta, mid, alpha`; outputs `output_0, output_1` became `output_1,
output_0`). The signature def maps each name to its tensor, so the
subgraph's input and output lists can be reordered to the Keras order: then
the file needs no names (slimming drops them) and input i of TFLM is input i
of the Keras model, on the device too.
"""

import re

from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.errors import ExportError
from tflite_export.pipeline.flatbuffer import text


def _output_position(name):
    """Keras' SavedModel export names its flat outputs `output_<i>`."""
    found = re.fullmatch(r"output_(\d+)", name)
    return int(found.group(1)) if found else None


def _ordered(current, wanted, what):
    """`current` (tensor indices) sorted by `wanted` ({tensor index: position})."""
    if sorted(wanted) != sorted(current) or sorted(wanted.values()) != list(
        range(len(current))
    ):
        raise ExportError(
            f"cannot match the converted model's {what} to the Keras model's "
            f"(signature {sorted(wanted.values())} vs {len(current)} tensors); "
            "please report this model."
        )
    return sorted(current, key=lambda index: wanted[index])


def keras_order(model_bytes, input_names):
    """Reorders the subgraph's inputs and outputs to the Keras order.

    Args:
        model_bytes: The converter's flatbuffer (with its signature def).
        input_names: The signature names of the Keras inputs, in Keras
            order.

    Returns:
        The flatbuffer with inputs and outputs in Keras order; the bytes
        unchanged when they already are (always for one input and output).

    Raises:
        ExportError: The signature does not name every input and output.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    subgraph = model.subgraphs[0]
    inputs = [int(i) for i in subgraph.inputs]
    outputs = [int(i) for i in subgraph.outputs]
    if len(inputs) == 1 and len(outputs) == 1:
        return bytes(model_bytes)
    signatures = [s for s in model.signatureDefs or [] if s.subgraphIndex == 0]
    if not signatures:
        raise ExportError("the converted model has no signature def to order its inputs by.")
    signature = signatures[0]
    new_inputs = inputs
    if len(inputs) > 1:
        position = {name: i for i, name in enumerate(input_names)}
        wanted = {
            int(t.tensorIndex): position.get(text(t.name), -1)
            for t in signature.inputs
        }
        new_inputs = _ordered(inputs, wanted, "inputs")
    new_outputs = outputs
    if len(outputs) > 1:
        wanted = {
            int(t.tensorIndex): _output_position(text(t.name))
            for t in signature.outputs
        }
        if None in wanted.values():
            names = sorted(text(t.name) for t in signature.outputs)
            raise ExportError(
                f"the converted model's outputs are named {names}, not "
                "output_0, output_1, ...: cannot order them like the Keras "
                "model's. Return a list of tensors from the model, not a dict."
            )
        new_outputs = _ordered(outputs, wanted, "outputs")
    if new_inputs == inputs and new_outputs == outputs:
        return bytes(model_bytes)
    import flatbuffers

    from tflite_export.pipeline import tflm

    subgraph.inputs = new_inputs
    subgraph.outputs = new_outputs
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return tflm.align(bytes(builder.Output()))
