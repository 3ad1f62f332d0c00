"""Which layers LUT-Q quantises, which of their weights, and their channels.

Each quantisable weight is described by a `QuantizableTensor`: the attribute
that holds it and the axes that form its output channel (one dictionary per
channel when `per_channel=True`, one scale per channel when
`channel_scales=True`). Biases and normalisation layers stay float.
"""

import collections

import keras
import numpy as np

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
    """The `QuantizableTensor`s of `layer`, or () if LUT-Q doesn't take it.

    Raises:
        TypeError: `layer` is a tf.keras 2.x (or other non-Keras 3) layer.
        ValueError: `layer` is supported but was quantised by Keras itself
            (`model.quantize("int8")`): LUT-Q needs its float weights.
    """
    check_keras3(layer, f"layer '{getattr(layer, 'name', layer)}'")
    for cls, tensors in _TENSORS_BY_LAYER:
        if isinstance(layer, cls):
            # Keras' own quantisation replaces the float kernel with int8
            # (or int4, float8) values and a scale: nothing to cluster.
            mode = getattr(layer, "quantization_mode", None)
            if mode is not None:
                raise ValueError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) was "
                    f"quantised by Keras (quantization_mode={mode!r}); LUT-Q "
                    "needs the float model. Apply LUT-Q to the model before "
                    "model.quantize(), or skip this layer."
                )
            return tensors
    return ()


def channel_axes(layer, attribute):
    """The output-channel axes of `layer`'s weight `attribute`.

    The last axis for a weight LUT-Q does not list (a custom layer's kernel).
    """
    for cls, tensors in _TENSORS_BY_LAYER:
        if isinstance(layer, cls):
            for tensor in tensors:
                if tensor.attribute == attribute:
                    return tensor.channel_axes
            break
    return (-1,)


def channel_order(rank, axes):
    """The axis order that moves the output-channel `axes` last.

    LUT-Q sees every weight as `[M, C]`: M weights in each of C output
    channels; this order, then a reshape, gives that view.
    """
    axes = [a % rank for a in axes]
    return [a for a in range(rank) if a not in axes] + axes


def channel_matrix(array, axes):
    """A NumPy weight as `[M, C]`, its output-channel `axes` last."""
    array = np.asarray(array)
    channels = int(np.prod([array.shape[a] for a in axes]))
    return np.transpose(array, channel_order(array.ndim, axes)).reshape(-1, channels)


def all_layers(model: keras.Model, include_models: bool = True) -> list[keras.layers.Layer]:
    """Every layer inside `model`, nested models' layers included.

    The one walk over a model's layers in lutq_tf and the exporter: depth
    first, in Keras' order, each layer once, `model` itself excluded.

    Args:
        model: a Keras model (or any object with `layers`; only those are
            listed then).
        include_models: False leaves out the nested models themselves
            (their layers stay listed).

    Returns:
        A list of layers.
    """
    if hasattr(model, "_flatten_layers"):
        # Keras' own walk (private, no public equivalent; see setup.cfg).
        layers = list(model._flatten_layers(include_self=False,
                                            recursive=True))
    else:
        layers = list(model.layers)
    if include_models:
        return layers
    return [layer for layer in layers if not isinstance(layer, keras.Model)]


def is_supported(layer):
    """True if LUT-Q quantises some weight of `layer` (see its errors)."""
    return bool(quantizable_tensors(layer))


def is_keras2_object(obj):
    """True if `obj` comes from tf.keras 2.x (`tf_keras`, `tf.keras`).

    Its classes are not Keras 3 classes (`keras.Layer`), and some class in
    its hierarchy lives in a tf.keras module.
    """
    if isinstance(obj, keras.Layer):
        return False
    modules = [cls.__module__ or "" for cls in type(obj).__mro__]
    return any(
        module.startswith(("tf_keras", "tensorflow.python.keras", "keras."))
        for module in modules
    )


def check_keras3(obj, what):
    """Raises a TypeError saying how to convert a tf.keras 2.x object.

    Args:
        obj: a layer or model.
        what: how the error names it ("model 'net'", "layer 'fc'").
    """
    if is_keras2_object(obj):
        raise TypeError(
            f"{what} is a tf.keras 2.x {type(obj).__name__} (module "
            f"{type(obj).__module__}); lutq_tf works on Keras 3 objects. "
            "Convert it: in tf.keras, model.save('model.h5'); then "
            "model = lutq_tf.load_model('model.h5') gives the Keras 3 model "
            "with the same weights."
        )
