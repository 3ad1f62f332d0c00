"""How a pruning rate is spread over the layers of a model."""

import keras
import numpy as np

from lutq_tf import registry
from lutq_tf.quantizer import check_fraction


def erk_prune_overrides(model: keras.Model,
                        prune_rate: float) -> dict[str, dict[str, float]]:
    """Per-layer prune rates that zero `prune_rate` of all quantised weights.

    The Erdos-Renyi-kernel allocation (Evci et al., "Rigging the Lottery",
    arXiv 1911.11134): a layer keeps a share of its weights proportional to
    sum(kernel shape) / prod(kernel shape), so large layers are pruned more
    and small ones (a stem conv, the classifier, 1x1 shortcuts) less, or not
    at all. Layers whose share would exceed 1 stay unpruned and the others
    share the remaining zeros. A layer with several kernels (SeparableConv)
    takes its first kernel's shape. Pass the result as `quantize_model`'s
    `overrides`, with the other options as usual:

        q = lutq_tf.quantize_model(model, bits=4, per_channel=True,
                                   overrides=erk_prune_overrides(model, 0.5))

    Args:
        model: a built Keras 3 model.
        prune_rate: the share in [0, 1) of all quantisable weights to prune.

    Returns:
        `{layer name: {"prune_rate": rate}}` for every layer LUT-Q can
        quantise; the rates averaged over the layers' weights give
        `prune_rate` (each table then prunes a whole number of weights).

    Raises:
        TypeError: `model` is not a Keras 3 model, or `prune_rate` is not a
            number.
        ValueError: `model` is not built, `prune_rate` is outside [0, 1),
            or the model has no quantisable layer.
    """
    registry.check_keras3(model, "erk_prune_overrides: `model`")
    if not isinstance(model, keras.Model):
        raise TypeError("erk_prune_overrides: `model` must be a Keras model (keras.Model), "
                        f"got {type(model).__name__}.")
    if not model.built:
        raise ValueError(f"erk_prune_overrides: model '{model.name}' is not built, so its "
                         "kernels have no shapes yet. Give it an input shape (keras.Input) "
                         "or call it on a batch first.")
    prune_rate = check_fraction("erk_prune_overrides: prune_rate", prune_rate)
    names, sizes, scores = [], [], []
    for layer in registry.all_layers(model):
        kernels = [tuple(getattr(layer, spec.attribute).shape)
                   for spec in registry.quantizable_tensors(layer)]
        if kernels:
            names.append(layer.name)
            sizes.append(sum(int(np.prod(k)) for k in kernels))
            scores.append(sum(kernels[0]) / np.prod(kernels[0]))
    if not names:
        raise ValueError("erk_prune_overrides: the model has no layer LUT-Q quantises "
                         f"(supported: {[c.__name__ for c in registry.SUPPORTED_LAYERS]}).")
    if prune_rate == 0.0:
        return {name: {"prune_rate": 0.0} for name in names}
    sizes, scores = np.array(sizes, float), np.array(scores)
    dense = np.zeros(len(names), bool)
    while True:
        kept = (1 - prune_rate) * sizes.sum() - sizes[dense].sum()
        density = np.where(dense, 1.0, kept / (scores[~dense] * sizes[~dense]).sum() * scores)
        if (density <= 1).all():
            break
        dense |= density > 1
    return {name: {"prune_rate": float(1 - d)} for name, d in zip(names, density)}
