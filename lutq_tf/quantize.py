"""`quantize_model` and `strip_model`: rebuilding Keras models with LUT-Q."""

import keras
import numpy as np
from keras.src.models.functional import Functional  # no public alias

from lutq_tf import registry
from lutq_tf.model import LUTQModel, LUTQSequential, lutq_layers
from lutq_tf.quantizer import LUTQuantizer
from lutq_tf.wrapper import LUTQWrapper

_SUBCLASSED_HINT = (
    "cannot rebuild a subclassed model. Wrap its layers in "
    "lutq_tf.LUTQWrapper and add lutq_tf.LUTQModelMixin to the model class "
    "(class Net(lutq_tf.LUTQModelMixin, keras.Model))."
)


def quantize_model(
    model,
    bits=None,
    num_values=None,
    constraint="none",
    prune_rate=0.0,
    per_channel=False,
    channel_scales=False,
    layer_types=None,
    layer_names=None,
    skip=(),
    min_weights=0,
    overrides=None,
    kmeans_every=1,
    init_iterations=20,
):
    """Returns a LUT-Q version of a Sequential or Functional model.

    The new model has the same inputs, outputs, layer names and current
    weights. Its selected layers are `LUTQWrapper`s whose dictionaries are
    fitted to the current weights, and its `train_step` runs the k-means
    step after each optimizer step, so `compile` + `fit` train it with LUT-Q.
    If `model` was compiled, the result is compiled with the same settings
    (a fresh optimizer).

    Args:
        model: a Sequential or Functional Keras model (nested ones
            included).
        bits: index bits per weight; K = 2**bits. Defaults to 4 when
            neither `bits` nor `num_values` is given.
        num_values: K, any integer >= 2 (instead of `bits`).
        constraint: "none", "pow2", "uniform" or a
            `lutq_tf.constraints.Constraint`.
        prune_rate: fraction in [0, 1) of weights per table set to exactly 0.
        per_channel: one dictionary per output channel.
        channel_scales: one dictionary per tensor over the weights divided
            by their output channel's max |W| (s_c); Q = s_c * d[A].
            Excludes `per_channel`.
        layer_types: quantise only layers of these types (a class or tuple).
        layer_names: quantise only the layers with these names.
        skip: names of layers to keep in float.
        min_weights: layers whose quantisable kernels hold fewer weights
            stay float.
        overrides: `{layer_name: options}` where options is a dict of the
            arguments above (`bits`, `num_values`, `constraint`,
            `prune_rate`, `per_channel`, `channel_scales`, `kmeans_every`),
            a `LUTQuantizer`, or None to keep that layer in float.
        kmeans_every: run the k-means step every this many optimizer steps.
        init_iterations: Lloyd iterations of the initial k-means.

    Returns:
        A `LUTQModel` (Functional) or `LUTQSequential`.
    """
    _check_rebuildable(model, "quantize_model")
    if lutq_layers(model):
        raise ValueError(
            f"Model '{model.name}' is already LUT-Q quantised (it has "
            "LUTQWrapper layers). Quantise the original float model, or "
            "lutq_tf.strip_model(model) first."
        )
    if bits is None and num_values is None:
        bits = 4
    default = LUTQuantizer(
        num_values=num_values, bits=bits, constraint=constraint,
        prune_rate=prune_rate, per_channel=per_channel,
        channel_scales=channel_scales, kmeans_every=kmeans_every,
        init_iterations=init_iterations,
    )
    plan = _plan(model, default, layer_types, layer_names, skip, min_weights,
                 overrides)

    def clone(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        if layer.name in plan:
            return LUTQWrapper(fresh, plan[layer.name])
        return fresh

    quantized = _rebuild(model, clone, LUTQModel, LUTQSequential)
    _copy_weights(model, quantized)
    for layer in lutq_layers(quantized):
        layer.initialize()
    if model.compiled:
        quantized.compile_from_config(model.get_compile_config())
    return quantized


def strip_model(model):
    """A plain Keras model whose quantised kernels hold exactly d[A].

    It has no lutq_tf classes, the same layer names, and predicts what the
    LUT-Q model predicts. Use it for export or deployment.
    """
    _check_rebuildable(model, "strip_model")

    def clone(layer):
        inner = layer.layer if isinstance(layer, LUTQWrapper) else layer
        return inner.__class__.from_config(inner.get_config())

    stripped = _rebuild(model, clone, keras.Model, keras.Sequential)
    _copy_weights(model, stripped)
    return stripped


def _check_rebuildable(model, what):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{what} takes a Keras model, got {type(model).__name__}."
        )
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"{what}: model '{model.name}' of class {type(model).__name__} "
            f"is subclassed; {what} {_SUBCLASSED_HINT}"
        )
    if not model.built:
        raise ValueError(
            f"{what}: model '{model.name}' is not built. Give it an input "
            "shape (keras.Input) or call it on data first."
        )


def _all_layers(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, keras.Model)
    ]


def _plan(model, default, layer_types, layer_names, skip, min_weights,
          overrides):
    """`{layer name: LUTQuantizer}` for the layers to quantise."""
    layers = {layer.name: layer for layer in _all_layers(model)}
    overrides = dict(overrides or {})
    for argument, names in (("layer_names", layer_names or ()),
                            ("skip", skip), ("overrides", overrides)):
        if isinstance(names, str):
            raise TypeError(f"`{argument}` takes a list of layer names.")
        unknown = sorted(set(names) - set(layers))
        if unknown:
            raise ValueError(
                f"`{argument}` names layers that model '{model.name}' "
                f"doesn't have: {unknown}. Its layers: {sorted(layers)}."
            )
    if layer_types is not None:
        types = tuple(np.atleast_1d(layer_types))
        unsupported = [t.__name__ for t in types
                       if not issubclass(t, registry.SUPPORTED_LAYERS)]
        if unsupported:
            raise ValueError(
                f"`layer_types` includes types LUT-Q cannot quantise: "
                f"{unsupported}. Supported: "
                f"{[c.__name__ for c in registry.SUPPORTED_LAYERS]}."
            )
    explicit = set(layer_names or ()) | {
        name for name, options in overrides.items() if options is not None
    }
    for name in sorted(explicit):
        if not registry.is_supported(layers[name]):
            raise ValueError(
                f"Layer '{name}' of type {type(layers[name]).__name__} was "
                "named for LUT-Q but cannot be quantised. Supported types: "
                f"{[c.__name__ for c in registry.SUPPORTED_LAYERS]}."
            )

    plan = {}
    for name, layer in layers.items():
        if name in overrides:
            options = overrides[name]
            if options is None:
                continue
            if isinstance(options, LUTQuantizer):
                plan[name] = options
            elif isinstance(options, dict):
                try:
                    plan[name] = default.with_options(**options)
                except (TypeError, ValueError) as error:
                    raise ValueError(
                        f"overrides['{name}']: {error}"
                    ) from error
            else:
                raise TypeError(
                    f"overrides['{name}'] must be a dict of options, a "
                    f"LUTQuantizer or None, got {options!r}."
                )
            continue
        if not registry.is_supported(layer) or name in skip:
            continue
        if layer_names is not None and name not in layer_names:
            continue
        if layer_types is not None and not isinstance(layer, types):
            continue
        if _quantizable_size(layer) < min_weights:
            continue
        plan[name] = default
    return plan


def _quantizable_size(layer):
    """Number of weights LUT-Q would quantise in `layer` (biases excluded)."""
    return sum(
        int(np.prod(getattr(layer, spec.attribute).shape))
        for spec in registry.quantizable_tensors(layer)
    )


def _rebuild(model, clone, functional_class, sequential_class):
    """Clones `model` layer by layer, outermost model of the given classes."""
    cloned = keras.models.clone_model(model, clone_function=clone,
                                      recursive=True)
    if isinstance(model, keras.Sequential):
        first = model._layers[0]
        inputs = []
        if isinstance(first, keras.layers.InputLayer):
            inputs = [keras.Input(batch_shape=first.batch_shape,
                                  dtype=first.dtype, name=first.name)]
        rebuilt = sequential_class(inputs + cloned.layers, name=model.name,
                                   trainable=model.trainable)
    else:
        rebuilt = functional_class(cloned.inputs, cloned.outputs,
                                   name=model.name)
        rebuilt.trainable = model.trainable
    return rebuilt


def _copy_weights(source, target):
    """Copies weights layer by layer; LUT-Q kernels become d[A]."""
    for layer in source.layers:
        if not layer.weights:
            continue  # Input layers among them: cloning renames those.
        twin = target.get_layer(layer.name)
        if isinstance(layer, keras.Model):
            _copy_weights(layer, twin)
            continue
        if isinstance(layer, LUTQWrapper):
            quantized = {id(s.variable): s.quantized for s in
                         layer.tensor_states}
            values = [quantized.get(id(v), v).numpy()
                      for v in layer.layer.weights]
        else:
            values = layer.get_weights()
        if isinstance(twin, LUTQWrapper):
            twin = twin.layer
        twin.set_weights(values)
