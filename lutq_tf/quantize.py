"""`quantize_model` and `strip_model`: rebuilding Keras models with LUT-Q."""

import collections.abc
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Optional
from typing import Union
import warnings

import keras
from keras.src.models.functional import Functional  # no public alias
import numpy as np

from lutq_tf import registry
from lutq_tf.constraints import Constraint
from lutq_tf.model import LUTQModel
from lutq_tf.model import LUTQSequential
from lutq_tf.model import lutq_layers
from lutq_tf.quantizer import LUTQuantizer
from lutq_tf.quantizer import check_int
from lutq_tf.wrapper import LUTQWrapper

_SUBCLASSED_HINT = (
    "cannot rebuild a subclassed model. Wrap its layers in "
    "lutq_tf.LUTQWrapper and add lutq_tf.LUTQModelMixin to the model class "
    "(class Net(lutq_tf.LUTQModelMixin, keras.Model))."
)


# What `overrides` maps a layer name to.
LayerOptions = Union[Mapping[str, object], LUTQuantizer, None]


def quantize_model(
    model: keras.Model,
    bits: Optional[int] = None,
    num_values: Optional[int] = None,
    constraint: Union[str, Constraint] = "none",
    prune_rate: float = 0.0,
    per_channel: Optional[bool] = None,
    channel_scales: Optional[bool] = None,
    layer_types: Union[type, Iterable[type], None] = None,
    layer_names: Optional[Iterable[str]] = None,
    skip: Optional[Iterable[str]] = (),
    min_weights: int = 0,
    overrides: Optional[Mapping[str, LayerOptions]] = None,
    kmeans_every: int = 1,
    init_iterations: int = 20,
    dictionary_rate: float = 1.0,
    expected_weights: Optional[Mapping[str, int]] = None,
    granularity: Optional[str] = None,
) -> Union[LUTQModel, LUTQSequential]:
    """Returns a LUT-Q version of a Sequential or Functional model.

    The new model has the same inputs, outputs, layer names and current
    weights. Its selected layers are `LUTQWrapper`s whose dictionaries are
    fitted to the current weights, and its `train_step` runs the k-means
    step after each optimizer step, so `compile` + `fit` train it with LUT-Q.
    If `model` was compiled, the result is compiled with the same settings
    (a fresh optimizer).

    The quantizer options (`bits`, `num_values`, `constraint`,
    `prune_rate`, `granularity` and its aliases `per_channel` and
    `channel_scales`, `kmeans_every`, `init_iterations`,
    `dictionary_rate`) are `lutq_tf.LUTQuantizer`'s and are described
    there; they make the quantizer of every selected layer. `bits`
    defaults to 4 when neither `bits` nor `num_values` is given.

    Args:
        model: a Sequential or Functional Keras model (nested ones
            included).
        layer_types: quantise only layers of these types (a Keras layer
            class, or a tuple or list of them).
        layer_names: quantise only the layers with these names (a list).
        skip: names of layers to keep in float (a list; None for none).
        min_weights: an integer >= 0; layers whose quantisable kernels hold
            fewer weights stay float.
        overrides: `{layer_name: options}` where options is a dict of
            `LUTQuantizer` options replacing the defaults given here for
            that layer (e.g. `{"bits": 2, "granularity": "per_tensor"}`; a
            `granularity` replaces the default's layout, the aliases alone
            update it), a `LUTQuantizer`, or None to keep that layer in
            float.
        expected_weights: `{layer_name: count}`: the quantisable weights
            (biases excluded) each named layer must hold, e.g. those a
            flash-budget plan was measured on (`tflite_export.plan_budget`
            passes them); a ValueError naming the layers otherwise.

    Layers are cloned from their configs; `Lambda` layers included (the
    configs come from `model` in memory, not from a file). If Keras cannot
    rebuild the compile settings (a loss or metric that is a local function,
    not registered), the result is returned uncompiled with a warning.

    Returns:
        A `LUTQModel` (Functional) or `LUTQSequential`.
    """
    _check_model(model, "quantize_model")
    if lutq_layers(model):
        raise ValueError(
            f"Model '{model.name}' is already LUT-Q quantised (it has "
            "LUTQWrapper layers). Quantise the original float model, or "
            "lutq_tf.strip_model(model) first."
        )
    _check_rebuildable(model, "quantize_model")
    if bits is None and num_values is None:
        bits = 4
    default = LUTQuantizer(
        num_values=num_values, bits=bits, constraint=constraint,
        prune_rate=prune_rate, per_channel=per_channel,
        channel_scales=channel_scales, kmeans_every=kmeans_every,
        init_iterations=init_iterations, dictionary_rate=dictionary_rate,
        granularity=granularity,
    )
    _check_expected_weights(model, expected_weights)
    quantizers = _choose_quantizers(model, default, layer_types, layer_names,
                                    skip, min_weights, overrides)
    _fall_back_to_per_tensor(model, quantizers)

    def clone(layer):
        fresh = _fresh_copy(layer)
        if layer.name in quantizers:
            return LUTQWrapper(fresh, quantizers[layer.name])
        return fresh

    quantized = _rebuild(model, clone, LUTQModel, LUTQSequential)
    _copy_weights(model, quantized)
    for layer in lutq_layers(quantized):
        layer.initialize()
    if model.compiled:
        _compile_like(quantized, model)
    return quantized


def strip_model(model: keras.Model) -> keras.Model:
    """A plain Keras model whose quantised kernels hold exactly d[A].

    It has no lutq_tf classes, the same layer names, and predicts what the
    LUT-Q model predicts. Use it for export or deployment.

    Args:
        model: a LUT-Q model: Sequential or Functional (from
            `quantize_model`), or a built subclassed model (`LUTQWrapper`
            layers, `LUTQModelMixin`).

    Returns:
        A `keras.Sequential` or Functional `keras.Model`. A subclassed model
        becomes a Functional model traced from its `call` on inputs of the
        shape it was built with (float32): its Python control flow is fixed
        as traced, with `training` left at its default.
    """
    _check_model(model, "strip_model")
    if not isinstance(model, (keras.Sequential, Functional)):
        model = _trace(model, "strip_model")
    _check_rebuildable(model, "strip_model")

    def clone(layer):
        inner = layer.layer if isinstance(layer, LUTQWrapper) else layer
        return _fresh_copy(inner)

    stripped = _rebuild(model, clone, keras.Model, keras.Sequential)
    _copy_weights(model, stripped)
    return stripped


def _fresh_copy(layer):
    """A new, unbuilt layer configured as `layer` (weights copied later)."""
    if isinstance(layer, keras.layers.Lambda):
        # Its config holds the function as bytecode, which Keras refuses to
        # load in safe mode and which loses the function's globals; the
        # function object itself is at hand.
        return keras.layers.Lambda(
            layer.function, output_shape=layer._output_shape,
            mask=layer.mask, arguments=dict(layer.arguments),
            name=layer.name, dtype=layer.dtype_policy,
            trainable=layer.trainable)
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as error:  # noqa: BLE001 (custom layers raise anything)
        raise ValueError(
            f"Cannot copy layer '{layer.name}' ({type(layer).__name__}) from "
            f"its config: {error} Give its class a get_config() that "
            "from_config() accepts, and register custom functions and "
            "classes it uses with @keras.saving.register_keras_serializable()."
        ) from error


def _check_model(model, what):
    """A built Keras 3 model, else a clear error."""
    registry.check_keras3(
        model, f"{what}: model '{getattr(model, 'name', model)}'")
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{what} takes a Keras model (keras.Model), got "
            f"{type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            f"{what}: model '{model.name}' is not built. Give it an input "
            "shape (keras.Input) or call it on data first."
        )


def _check_rebuildable(model, what):
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"{what}: model '{model.name}' of class {type(model).__name__} "
            f"is subclassed; {what} {_SUBCLASSED_HINT}"
        )


def _trace(model, what):
    """A Functional model over `model`'s own layers, traced from its call.

    Subclassed models have no config to clone from, and a copy of one
    cannot be made generically (its `__init__` is the user's). Calling its
    `call` on symbolic inputs records the layers it uses as a graph, which
    `_rebuild` then clones like any Functional model.
    """
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        raise ValueError(
            f"{what}: subclassed model '{model.name}' was not built from one "
            f"input (build shapes: {shapes or 'unknown'}), so its call cannot "
            "be traced. Call it once on a batch of data (model(x)) or "
            "model.build(input_shape) first."
        )
    (shape,) = shapes.values()
    inputs = keras.tree.map_shape_structure(
        lambda s: keras.Input(batch_shape=(None, *tuple(s)[1:])), shape)
    try:
        outputs = model.call(inputs)
        traced = keras.Model(inputs, outputs, name=model.name)
    except Exception as error:  # noqa: BLE001 (any error in user code)
        raise ValueError(
            f"{what}: cannot trace the call of subclassed model "
            f"'{model.name}' on symbolic inputs of shape {shape}: {error} "
            "Write its call with Keras layers and keras.ops (not tf.* "
            "functions or Python branches on tensor values)."
        ) from error
    traced.trainable = model.trainable
    return traced


def _compile_like(quantized, model):
    """Compiles `quantized` as `model` was, or warns and leaves it as is."""
    try:
        quantized.compile_from_config(model.get_compile_config())
    except (TypeError, ValueError) as error:
        # A local function as loss or metric is saved by name only and
        # cannot be found again; the quantisation itself is still right.
        warnings.warn(
            f"quantize_model: the LUT-Q model is returned uncompiled: "
            f"Keras cannot rebuild the compile settings of model "
            f"'{model.name}' ({error}). Compile it yourself "
            "(model.compile(optimizer, loss, metrics)), or register the "
            "custom loss with @keras.saving.register_keras_serializable().",
            stacklevel=3,
        )


def _choose_quantizers(model, default, layer_types, layer_names, skip,
                       min_weights, overrides):
    """`{layer name: LUTQuantizer}` for the layers to quantise."""
    layers = {layer.name: layer for layer in registry.all_layers(model, include_models=False)}
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, collections.abc.Mapping):
        raise TypeError(
            "`overrides` takes a dict {layer_name: options}, got "
            f"{overrides!r}."
        )
    overrides = dict(overrides)
    skip = () if skip is None else skip
    min_weights = check_int("min_weights", min_weights, 0)
    for argument, names in (("layer_names", layer_names or ()),
                            ("skip", skip), ("overrides", overrides)):
        _check_names(argument, names)
        unknown = sorted(set(names) - set(layers))
        if unknown:
            raise ValueError(
                f"`{argument}` names layers that model '{model.name}' "
                f"doesn't have: {unknown}. Its layers: {sorted(layers)}."
            )
    if layer_types is not None:
        types = _check_types(layer_types)
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

    quantizers = {}
    for name, layer in layers.items():
        if name in overrides:
            options = overrides[name]
            if options is None:
                continue
            if isinstance(options, LUTQuantizer):
                quantizers[name] = options
            elif isinstance(options, dict):
                try:
                    quantizers[name] = default.with_options(**options)
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
        if name in skip or not registry.is_supported(layer):
            continue
        if layer_names is not None and name not in layer_names:
            continue
        if layer_types is not None and not isinstance(layer, types):
            continue
        if _quantizable_size(layer) < min_weights:
            continue
        quantizers[name] = default
    return quantizers


def _fall_back_to_per_tensor(model, quantizers):
    """Per-tensor dictionaries where per-channel ones would exceed a channel.

    A per-channel dictionary of K entries needs at least K weights per
    channel. A layer with smaller channels gets the same quantizer per
    tensor (`per_channel_fallback=True`), which still quantises the layer at
    the asked bits and exports as one table (a dictionary holding a channel
    exactly would not compress it, and pow2 cannot hold one). A layer with
    a tensor smaller than K is left to the wrapper's refusal: per tensor
    would not fit either. Updates `quantizers` in place and warns once,
    listing the layers.
    """
    layers = {layer.name: layer for layer in registry.all_layers(model, include_models=False)}
    fallen = []
    for name, quantizer in quantizers.items():
        if not quantizer.per_channel:
            continue
        sizes = _weights_per_channel(layers[name])
        smallest = min((per_channel, attribute)
                       for per_channel, _, attribute in sizes)
        fits_per_tensor = min(size for _, size, _ in sizes) >= (
            quantizer.num_values)
        if smallest[0] < quantizer.num_values and fits_per_tensor:
            quantizers[name] = quantizer.with_options(
                granularity="per_tensor", per_channel_fallback=True)
            fallen.append(f"'{name}' (`{smallest[1]}`: {smallest[0]} weights "
                          f"per channel, K={quantizer.num_values})")
    if fallen:
        warnings.warn(
            f"quantize_model: granularity='per_channel' (per_channel="
            f"True), but the output channels of "
            f"{len(fallen)} layer(s) of model '{model.name}' hold fewer "
            "weights than a dictionary's K entries, so each of their tensors "
            f"gets one dictionary per tensor instead: {', '.join(fallen)}. "
            "To choose otherwise, give such a layer an override (fewer bits "
            "per channel, or None to keep it float); lutq_tf.summary marks "
            "these tensors \"tensor (channels < K)\".",
            stacklevel=3,
        )


def _weights_per_channel(layer):
    """`(weights per output channel, weights, attribute)` of each quantisable
    tensor of `layer`."""
    sizes = []
    for spec in registry.quantizable_tensors(layer):
        shape = tuple(getattr(layer, spec.attribute).shape)
        size = int(np.prod(shape))
        channels = int(np.prod([shape[a] for a in spec.channel_axes]))
        sizes.append((size // max(channels, 1), size, spec.attribute))
    return sizes


def _check_expected_weights(model, expected_weights):
    """A ValueError naming each layer whose weight count is not the expected one."""
    if expected_weights is None:
        return
    if not isinstance(expected_weights, collections.abc.Mapping):
        raise TypeError("`expected_weights` takes a dict {layer_name: count}, "
                        f"got {expected_weights!r}.")
    layers = {layer.name: layer for layer in registry.all_layers(model, include_models=False)}
    _check_names("expected_weights", expected_weights)
    wrong = [f"no layer '{name}'" if name not in layers else
             f"layer '{name}' has {_quantizable_size(layers[name]):,} weights, "
             f"expected {count:,}"
             for name, count in expected_weights.items()
             if name not in layers or _quantizable_size(layers[name]) != count]
    if wrong:
        raise ValueError(
            f"Model '{model.name}' is not the model these options were made "
            f"for (`expected_weights`, e.g. a flash-budget plan's): "
            f"{'; '.join(wrong)}. Plan this model itself "
            "(tflite_export.plan_budget) rather than reuse another's plan."
        )


def _check_names(argument, names):
    """A list (tuple, set) of layer names, else a TypeError."""
    form = f"`{argument}` takes a list of layer names"
    if isinstance(names, str):
        raise TypeError(
            f"{form}, got the string {names!r}: write [{names!r}].")
    if not isinstance(names, collections.abc.Iterable):
        raise TypeError(f"{form}, got {names!r}.")
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{form}; these are not strings: {bad!r}.")


def _check_types(layer_types):
    """`layer_types` as a tuple of classes, else a TypeError."""
    if isinstance(layer_types, type):
        return (layer_types,)
    if isinstance(layer_types, (tuple, list)) and all(
            isinstance(t, type) for t in layer_types):
        return tuple(layer_types)
    raise TypeError(
        "`layer_types` takes Keras layer classes (keras.layers.Dense, or a "
        f"tuple of classes), got {layer_types!r}."
    )


def _quantizable_size(layer):
    """Number of weights LUT-Q would quantise in `layer` (biases excluded)."""
    return sum(
        int(np.prod(getattr(layer, spec.attribute).shape))
        for spec in registry.quantizable_tensors(layer)
    )


def _rebuild(model, clone, functional_class, sequential_class):
    """Clones `model` layer by layer, outermost model of the given classes."""
    # clone_model compiles its clones of compiled models from their compile
    # configs, which fails for a local custom loss; the clone is discarded
    # and the caller compiles the result, so clone the models as uncompiled.
    models = [model] + [layer for layer in registry.all_layers(model)
                        if isinstance(layer, keras.Model)]
    compiled = [m.compiled for m in models]
    try:
        for m in models:
            m.compiled = False
        cloned = keras.models.clone_model(model, clone_function=clone,
                                          recursive=True)
    finally:
        for m, was_compiled in zip(models, compiled):
            m.compiled = was_compiled
    if isinstance(model, keras.Sequential):
        first = model._layers[0]
        inputs = []
        if isinstance(first, keras.layers.InputLayer):
            inputs = [keras.Input(batch_shape=first.batch_shape,
                                  dtype=first.dtype, name=first.name)]
        rebuilt = sequential_class(inputs + cloned.layers, name=model.name,
                                   trainable=model.trainable)
    else:
        # The structures (a bare tensor, a list, a dict), not flat lists:
        # calls with the same structures as the original then take no warning.
        rebuilt = functional_class(cloned.input, cloned.output,
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
