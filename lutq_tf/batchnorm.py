"""Batch-norm statistics re-estimated for the quantised weights."""

import keras
import numpy as np


def reestimate_batchnorm(model, x, batch_size=64):
    """Re-estimates every BatchNormalization layer's moving mean and variance.

    Quantising the weights (`quantize_model`) shifts the activations that
    each batch norm normalises, while its moving statistics still describe
    the float model's. Running `x` through the model in training mode, each
    layer's moving mean and variance become the average of its batch
    statistics over the batches (every earlier layer already quantised).
    Use it when the model is exported without fine-tuning, or before
    fine-tuning; `fit` adapts the statistics by itself. Nothing else of the
    model changes: no weight, dictionary or assignment.

    Args:
        model: a Keras model (LUT-Q or plain), built.
        x: input array `(N,) + input shape` (a list of arrays for several
            inputs): training images, a few thousand are plenty.
        batch_size: images per batch; statistics are averaged over the
            `N // batch_size` full batches.

    Returns:
        The names of the layers re-estimated (empty without batch norms).

    Raises:
        ValueError: `x` holds fewer than `batch_size` samples.
    """
    inputs = list(x) if isinstance(x, (list, tuple)) else [x]
    count = len(inputs[0])
    if count < batch_size:
        raise ValueError(
            f"reestimate_batchnorm: `x` holds {count} samples, fewer than "
            f"batch_size={batch_size}; give more data or a smaller batch_size."
        )
    layers = [
        layer for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    try:
        for i in range(count // batch_size):
            # moving <- moving * i/(i+1) + batch / (i+1): the running average
            # of the batch statistics (layers run eagerly, so the momentum is
            # read at every call).
            for layer in layers:
                layer.momentum = i / (i + 1.0)
            batch = [np.asarray(a[i * batch_size:(i + 1) * batch_size]) for a in inputs]
            model(batch if len(batch) > 1 else batch[0], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return [layer.name for layer in layers]
