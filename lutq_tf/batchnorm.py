"""Batch norms: statistics re-estimated for the quantised weights
(`reestimate_batchnorm`), or folded into the layer before them
(`fold_batchnorm`)."""

import copy
import warnings

import keras
import numpy as np

from lutq_tf import registry
from lutq_tf.model import lutq_layers


def reestimate_batchnorm(model: keras.Model, x, batch_size: int = 64) -> list[str]:
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
        layer for layer in registry.all_layers(model)
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


# Layers whose kernel and bias can absorb a following batch norm, by exact
# type (a subclass may compute something else).
_FOLDABLE = (keras.layers.Dense, keras.layers.Conv2D,
             keras.layers.DepthwiseConv2D)


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of `model` with batch norms folded into the layer before them.

    Each Dense, Conv2D or DepthwiseConv2D followed by a BatchNormalization
    becomes one layer (same name, class and options, with a bias) whose
    kernel and bias hold the batch norm's inference-mode transform, per
    output channel c:

        f_c = gamma_c / sqrt(moving_variance_c + epsilon)
        kernel[..., c] <- kernel[..., c] * f_c
        bias_c <- (bias_c - moving_mean_c) * f_c + beta_c

    (gamma = 1 without `scale`, beta = 0 without `center`; computed in
    float64, stored in the variables' dtype). The copy's outputs equal the
    model's in inference mode to float32 rounding. Quantise the copy
    (`quantize_model`), so the dictionaries hold the weights that reach the
    device: the TFLite converter folds batch norms into the kernel itself,
    which would give every output channel its own factor and break a
    per-tensor dictionary (TFLM's FULLY_CONNECTED takes int4 per tensor
    only).

    The cost: the folded batch norms no longer train. Their statistics are
    fixed into the weights, so fine-tuning adapts no moving mean or
    variance and `reestimate_batchnorm` has nothing left to re-estimate
    there; fold after the float model is trained.

    A batch norm is folded only when the layer before it is one of those
    three classes (exact type), has a linear activation, no LoRA or Keras
    quantisation, is called once, and its output goes to that batch norm
    alone (not to another layer, not a model output); the batch norm is
    called once, on that output alone, normalising the output channels
    (its `axis`), and not with a fixed `training` argument. Any other batch
    norm stays, with one warning naming each and why. Layers inside nested
    models are copied unchanged. Nothing else changes: the other layers
    keep their weights, the copy is not compiled (compile it to train).

    Args:
        model: a built Sequential or Functional Keras model in float (fold
            before `quantize_model`).

    Returns:
        `(folded_model, folded)`: the new model, and a dict
        `{layer_name: batchnorm_name}` of the folds made, in model order
        (empty if none: the copy then equals the model).

    Raises:
        TypeError: `model` is not a Keras Sequential or Functional model.
        ValueError: `model` is LUT-Q quantised, or not built.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"fold_batchnorm takes a Keras model, got {type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            f"fold_batchnorm: model '{model.name}' is not built; build it "
            "(call it on data or give it an Input) first."
        )
    if lutq_layers(model):
        raise ValueError(
            f"fold_batchnorm: model '{model.name}' is LUT-Q quantised; fold "
            "the float model, then quantise the result (quantize_model), or "
            "lutq_tf.strip_model(model) first."
        )
    config = _model_config(model)
    if isinstance(model, keras.Sequential):
        pairs, kept = _sequential_pairs(model, config)
    else:
        pairs, kept = _functional_pairs(model, config)
    if kept:
        warnings.warn(
            f"fold_batchnorm: model '{model.name}' keeps "
            f"{len(kept)} batch norm(s) unfolded: "
            + "; ".join(f"'{name}' ({why})" for name, why in kept.items())
            + ". They stay batch norms in the copy (and the TFLite "
            "converter may still fold one into the weights before it, one "
            "factor per output channel, which a per-tensor dictionary "
            "there does not survive).",
            stacklevel=2,
        )
    folded = {layer: bn for layer, bn in pairs}
    _rewrite_config(config, folded)
    folded_model = type(model).from_config(config)
    for layer in folded_model.layers:
        source = model.get_layer(layer.name)
        if layer.name in folded:
            _assign_folded(source, model.get_layer(folded[layer.name]), layer)
        else:
            layer.set_weights(source.get_weights())
    return folded_model, folded


def _model_config(model):
    try:
        config = model.get_config()
    except NotImplementedError:
        config = None
    if not isinstance(config, dict) or "layers" not in config or not (
            isinstance(model, keras.Sequential) or "input_layers" in config):
        raise TypeError(
            f"fold_batchnorm: model '{model.name}' "
            f"({type(model).__name__}) is neither Sequential nor Functional; "
            "rebuild it with keras.Sequential or the functional API (or fold "
            "its batch norms by hand)."
        )
    return copy.deepcopy(config)


def _foldable_layer(layer):
    """None if `layer` can absorb a batch norm after it, else why not."""
    if type(layer) not in _FOLDABLE:
        return f"after '{layer.name}' ({type(layer).__name__}), not a Dense, "\
            "Conv2D or DepthwiseConv2D"
    if layer.get_config().get("activation") != "linear":
        return f"after '{layer.name}', whose activation is not linear"
    if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None):
        return f"after '{layer.name}', which has LoRA or Keras quantisation"
    if not layer.built:
        return f"after '{layer.name}', which is not built"
    return None


def _channel_axis(layer, rank):
    """The output channels' axis (non-negative) of a `_FOLDABLE` layer."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


def _batchnorm_axis_ok(layer, bn):
    axis = bn.axis if isinstance(bn.axis, int) else None
    rank = len(bn.input.shape)
    return axis is not None and axis % rank == _channel_axis(layer, rank)


def _sequential_pairs(model, config):
    """Foldable `(layer, batch norm)` name pairs of a Sequential model, and
    `{batch norm: why kept}`."""
    names = [entry["config"]["name"] for entry in config["layers"]]
    pairs, kept = [], {}
    for i, name in enumerate(names):
        try:
            bn = model.get_layer(name)
        except ValueError:  # the InputLayer
            continue
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        try:
            layer = model.get_layer(names[i - 1]) if i else None
        except ValueError:
            layer = None
        if layer is None:
            kept[name] = "the first layer"
            continue
        why = _foldable_layer(layer)
        if why is None and not _batchnorm_axis_ok(layer, bn):
            why = "its axis is not the output channels'"
        if why:
            kept[name] = why
        else:
            pairs.append((layer.name, name))
    return pairs, kept


def _history_refs(value):
    """Every `keras_history` `[layer, node, tensor]` inside a config value."""
    if isinstance(value, dict):
        if "keras_history" in value:
            yield value["keras_history"]
        for item in value.values():
            yield from _history_refs(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _history_refs(item)


def _output_refs(value):
    """The `[layer, node, tensor]` lists of a config's `output_layers` (one
    such list for a single output, else a nest of them)."""
    if (isinstance(value, list) and len(value) == 3
            and isinstance(value[0], str)):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _output_refs(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _output_refs(item)


def _functional_pairs(model, config):
    """As `_sequential_pairs`, for a Functional model's config graph."""
    entries = {entry["name"]: entry for entry in config["layers"]}
    # Who reads each layer's outputs: (reader, node) pairs, and "output".
    readers = {name: [] for name in entries}
    for name, entry in entries.items():
        for node, call in enumerate(entry["inbound_nodes"]):
            for ref in _history_refs(call):
                readers[ref[0]].append((name, node))
    for ref in _output_refs(config["output_layers"]):
        readers[ref[0]].append(("output", 0))
    pairs, kept = [], {}
    for name, entry in entries.items():
        bn = model.get_layer(name)
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        calls = entry["inbound_nodes"]
        if len(calls) != 1:
            kept[name] = f"called {len(calls)} times"
            continue
        refs = list(_history_refs(calls[0]["args"]))
        kwargs = calls[0].get("kwargs") or {}
        if len(refs) != 1 or list(_history_refs(kwargs)):
            kept[name] = "more than one input"
            continue
        if kwargs.get("training") is not None:
            kept[name] = f"called with training={kwargs['training']}"
            continue
        source = refs[0][0]
        layer = model.get_layer(source)
        why = _foldable_layer(layer)
        if why is None and len(entries[source]["inbound_nodes"]) != 1:
            why = f"after '{source}', which is called more than once"
        if why is None and readers[source] != [(name, 0)]:
            why = f"after '{source}', whose output is also used elsewhere"
        if why is None and not _batchnorm_axis_ok(layer, bn):
            why = "its axis is not the output channels'"
        if why:
            kept[name] = why
        else:
            pairs.append((source, name))
    return pairs, kept


def _rewrite_config(config, folded):
    """Drops the folded batch norms from `config`; their readers read the
    layer before them, which gets a bias."""
    by_bn = {bn: layer for layer, bn in folded.items()}
    layers = []
    for entry in config["layers"]:
        name = entry["config"]["name"]
        if name in by_bn:
            continue
        if name in folded:
            entry["config"]["use_bias"] = True
        for ref in _history_refs(entry.get("inbound_nodes", [])):
            if ref[0] in by_bn:
                ref[0] = by_bn[ref[0]]
        layers.append(entry)
    config["layers"] = layers
    for ref in _output_refs(config.get("output_layers", [])):
        if ref[0] in by_bn:
            ref[0] = by_bn[ref[0]]


def _assign_folded(layer, bn, target):
    """Sets `target`'s kernel and bias: `layer`'s with `bn` folded in."""
    variance = np.asarray(bn.moving_variance.numpy(), np.float64)
    factor = 1.0 / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        factor = factor * np.asarray(bn.gamma.numpy(), np.float64)
    shift = -np.asarray(bn.moving_mean.numpy(), np.float64)
    if layer.use_bias:
        shift = shift + np.asarray(layer.bias.numpy(), np.float64)
    bias = shift * factor
    if bn.center:
        bias = bias + np.asarray(bn.beta.numpy(), np.float64)
    kernel = np.asarray(layer.kernel.numpy(), np.float64)
    if type(layer) is keras.layers.DepthwiseConv2D:
        # [h, w, in, multiplier]: output channel i * multiplier + m.
        factor = factor.reshape(kernel.shape[-2:])
    target.kernel.assign((kernel * factor).astype(target.kernel.dtype))
    target.bias.assign(bias.astype(target.bias.dtype))
