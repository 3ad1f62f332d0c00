"""Which layers LUT-Q quantises, which of their weights, and their channels.

Each quantisable weight is described by a `QuantizableTensor`: the attribute
that holds it and the axes that form its output channel (one dictionary per
channel when `per_channel=True`, one scale per channel when
`channel_scales=True`). Biases and normalisation layers stay float.
"""

import collections

import keras

QuantizableTensor = collections.namedtuple(
    "QuantizableTensor", ["attribute", "channel_axes"]
)
QuantizableTensor.__doc__ = """A weight of a layer that LUT-Q quantises.

Attributes:
    attribute: name of the layer attribute holding the variable.
    channel_axes: axes (negative) that together index the output channel.
"""

_KERNEL = QuantizableTensor("kernel", (-1,))
# Transposed convolutions store kernels as [..., filters, in_channels].
_TRANSPOSED_KERNEL = QuantizableTensor("kernel", (-2,))
# Depthwise kernels are [..., in_channels, multiplier]; TFLite's channel is
# in_channels * multiplier. DepthwiseConv calls its kernel `kernel`,
# SeparableConv `depthwise_kernel`.
_DEPTHWISE_KERNEL = QuantizableTensor("kernel", (-2, -1))
_SEPARABLE_DEPTHWISE_KERNEL = QuantizableTensor("depthwise_kernel", (-2, -1))
_POINTWISE_KERNEL = QuantizableTensor("pointwise_kernel", (-1,))
_EMBEDDINGS = QuantizableTensor("embeddings", (-1,))

# Order matters: subclasses before their bases (isinstance lookup).
_TENSORS_BY_LAYER = (
    (keras.layers.Conv1DTranspose, (_TRANSPOSED_KERNEL,)),
    (keras.layers.Conv2DTranspose, (_TRANSPOSED_KERNEL,)),
    (keras.layers.Conv3DTranspose, (_TRANSPOSED_KERNEL,)),
    (keras.layers.SeparableConv1D, (_SEPARABLE_DEPTHWISE_KERNEL, _POINTWISE_KERNEL)),
    (keras.layers.SeparableConv2D, (_SEPARABLE_DEPTHWISE_KERNEL, _POINTWISE_KERNEL)),
    (keras.layers.DepthwiseConv1D, (_DEPTHWISE_KERNEL,)),
    (keras.layers.DepthwiseConv2D, (_DEPTHWISE_KERNEL,)),
    (keras.layers.Conv1D, (_KERNEL,)),
    (keras.layers.Conv2D, (_KERNEL,)),
    (keras.layers.Conv3D, (_KERNEL,)),
    (keras.layers.Dense, (_KERNEL,)),
    (keras.layers.Embedding, (_EMBEDDINGS,)),
)

SUPPORTED_LAYERS = tuple(cls for cls, _ in _TENSORS_BY_LAYER)


def quantizable_tensors(layer):
    """The `QuantizableTensor`s of `layer`, or () if LUT-Q doesn't take it."""
    for cls, tensors in _TENSORS_BY_LAYER:
        if isinstance(layer, cls):
            return tensors
    return ()


def is_supported(layer):
    return bool(quantizable_tensors(layer))
