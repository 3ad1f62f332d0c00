"""Finds the look-up-table kernels of a model: the interface with `lutq_tf`.

A LUT-Q model says itself which kernels are look-up tables
(`lutq_tf.summary_rows`) and hands over a plain Keras twin (`lutq_tf.strip_model`)
whose kernels hold exactly `d[A]`. Any other Keras model is scanned: a kernel
whose tables (the whole tensor, else each output channel) hold at most 128
distinct values, fewer than their element count, is taken as a LUT kernel.
"""

import dataclasses

import numpy as np

import lutq_tf
from lutq_tf import registry
from lutq_tf.registry import all_layers  # as lut_tensors.all_layers too

# TFLM's LUT compression stores indices of 1 to 7 bits.
MAX_TABLE_VALUES = 128

# Kernel attributes of the layers that become CONV_2D, DEPTHWISE_CONV_2D,
# FULLY_CONNECTED or TRANSPOSE_CONV. (`embeddings` become GATHER, which TFLM
# cannot decode from a LUT.)
KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")


@dataclasses.dataclass
class LutKernel:
    """A LUT kernel of the plain Keras model.

    Attributes:
        layer: Layer name.
        tensor: Kernel attribute name (`"kernel"`, `"depthwise_kernel"`, ...).
        layer_type: Layer class name, for messages.
        array: The kernel values, float32, in Keras layout.
        num_values: K, the dictionary size per table.
        per_channel: Whether the dictionary is per output channel.
        source: `"lutq_tf"` or `"detected"`.
        channel_scales: float `[C]`, per-output-channel scales s_c of a
            scaled dictionary (the kernel is s_c * d[A]), else None.
    """

    layer: str
    tensor: str
    layer_type: str
    array: np.ndarray
    num_values: int
    per_channel: bool
    source: str
    channel_scales: np.ndarray = None


def weight_layers(model):
    """Layers of the model that have a kernel TFLM could decode from a LUT."""
    return [
        layer
        for layer in all_layers(model)
        if any(_kernel(layer, a) is not None for a in KERNEL_ATTRIBUTES)
    ]


def distinct_per_column(table):
    """Number of distinct values in each column of a 2-D array."""
    if table.shape[0] == 0:
        return np.zeros(table.shape[1], dtype=np.int64)
    ordered = np.sort(table, axis=0)
    return 1 + np.count_nonzero(np.diff(ordered, axis=0), axis=0)


def _detect(layer, attribute, array):
    """Returns `(K, per_channel)` for a LUT kernel, else None.

    When both readings fit, the one with fewer index bits wins (per-channel
    dictionaries of K values make a tensor of up to K * channels values);
    per tensor on a tie, as one table is smaller.
    """
    if array.size < 2:
        return None
    whole = int(distinct_per_column(array.reshape(-1, 1))[0])
    found = None
    if whole <= MAX_TABLE_VALUES and whole < array.size:
        found = (whole, False)
    tables = registry.channel_matrix(array, registry.channel_axes(layer, attribute))
    if tables.shape[0] >= 2:
        most = int(distinct_per_column(tables).max())
        fewer_bits = (most - 1).bit_length() < (whole - 1).bit_length()
        if most <= MAX_TABLE_VALUES and most < tables.shape[0] and (
            found is None or fewer_bits
        ):
            found = (most, True)
    return found


def _kernel(layer, attribute):
    try:
        variable = getattr(layer, attribute, None)
    except Exception:  # Some layers compute the attribute and may refuse.
        return None
    if variable is None or not hasattr(variable, "numpy"):
        return None
    return np.asarray(variable.numpy(), dtype=np.float32)


def find_lut_kernels(model):
    """Finds the LUT kernels of a LUT-Q model or of a plain Keras model.

    Args:
        model: A `keras.Model`, LUT-Q (with `lutq_tf` layers) or plain.

    Returns:
        `(plain_model, kernels, notes)`: the plain Keras model to convert, a
        list of `LutKernel`, and a list of strings for the report.

    Raises:
        ValueError: A LUT-Q table has more than 128 values.
    """
    notes = []
    kernels = []
    if lutq_tf.is_quantized(model):
        rows = lutq_tf.summary_rows(model)
        plain = lutq_tf.strip_model(model)
        by_name = {layer.name: layer for layer in all_layers(plain)}
        for row in rows:
            if row.tensor not in KERNEL_ATTRIBUTES:
                notes.append(
                    f"{row.layer}.{row.tensor}: TFLM cannot decode a LUT for "
                    "this tensor; it stays uncompressed."
                )
                continue
            if row.num_values > MAX_TABLE_VALUES:
                raise ValueError(
                    f"Layer '{row.layer}' ({row.tensor}) has K={row.num_values}"
                    f" values per table, but TFLM's LUT compression holds at "
                    f"most {MAX_TABLE_VALUES} (7-bit indices). Retrain it with"
                    f" num_values <= {MAX_TABLE_VALUES}, or leave the layer "
                    "out of LUT-Q."
                )
            layer = by_name.get(row.layer)
            array = None if layer is None else _kernel(layer, row.tensor)
            if array is None and layer is not None and row.tensor == "depthwise_kernel":
                # Keras 3's DepthwiseConv2D names its depthwise kernel `kernel`.
                array = _kernel(layer, "kernel")
            if array is None:
                raise ValueError(
                    f"lutq_tf.strip_model() gave layer '{row.layer}' no "
                    f"'{row.tensor}' weight; cannot export it."
                )
            kernels.append(
                LutKernel(
                    layer=row.layer,
                    tensor=row.tensor,
                    layer_type=type(layer).__name__,
                    array=array,
                    num_values=int(row.num_values),
                    per_channel=bool(row.per_channel),
                    source="lutq_tf",
                    channel_scales=getattr(row, "channel_scales", None),
                )
            )
        return plain, kernels, notes

    for layer in all_layers(model):
        for attribute in KERNEL_ATTRIBUTES:
            array = _kernel(layer, attribute)
            if array is None:
                continue
            found = _detect(layer, attribute, array)
            if found is None:
                continue
            kernels.append(
                LutKernel(
                    layer=layer.name,
                    tensor=attribute,
                    layer_type=type(layer).__name__,
                    array=array,
                    num_values=found[0],
                    per_channel=found[1],
                    source="detected",
                )
            )
    return model, kernels, notes
