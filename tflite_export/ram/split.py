"""Splits layers into output-channel groups, so no decoded kernel is large.

TFLM decodes a LUT-compressed kernel into the arena right before the op
that reads it, so the arena grows by the largest decoded kernel. A Dense or
Conv2D layer split into G layers over groups of its output channels, joined
by a Concatenate, computes the same tensor while each group's DECODE output
is about 1/G of the kernel.

The split is made on the Keras model, before conversion: the converter then
gives the split model's uncompressed twin (for the bit-exact check), and
each group's kernel is a slice of the LUT kernel, so it keeps the layer's
dictionary (its values are a subset of d) and maps like any other kernel.

What follows a split layer and acts per channel (a BatchNormalization on
the last axis, an elementwise activation, inference-time Dropout) is moved
into every group, so the converter still folds the batch norm into each
group's kernel and fuses the activation into each op; an activation that is
not elementwise (softmax) is applied after the Concatenate.

TFLM's CONCATENATION takes at most 10 inputs (`kMaxInputNum`); more groups
are joined in stages (`concat_tree`).
"""

import dataclasses

import keras
import numpy as np

from tflite_export.pipeline import lut_tensors
from tflite_export.pipeline import tflm_limits

# Activations that act on each value alone, so they can run per group.
ELEMENTWISE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "tanh", "elu",
    "selu", "swish", "silu", "hard_swish", "hard_silu", "gelu", "softplus",
    "softsign", "leaky_relu", "exponential", "mish", "celu",
})


def group_sizes(channels, channel_bytes, limit):
    """Output channels per group so that no group decodes to more than `limit`.

    The fewest groups that fit, of sizes that differ by at most one.

    Args:
        channels: Output channels of the layer (C).
        channel_bytes: Decoded bytes of one output channel's weights.
        limit: Largest decoded bytes per group.

    Returns:
        A list of group sizes summing to `channels` (one entry: no split),
        or None when one channel alone exceeds `limit`.
    """
    if channel_bytes > limit:
        return None
    per_group = max(1, int(limit // channel_bytes))
    count = -(-int(channels) // per_group)
    base, extra = divmod(int(channels), count)
    return [base + 1] * extra + [base] * (count - extra)


def _nodes(model, layer):
    """The calls of `layer` that are part of `model`'s graph.

    A layer reused by another model (`split_model` reuses every layer it
    does not split) has nodes of that model too; they do not count here.
    """
    keys = getattr(model, "_nodes", None)
    if keys is None:
        return list(layer._inbound_nodes)
    return [
        node for i, node in enumerate(layer._inbound_nodes)
        if f"{id(layer)}_ib-{i}" in keys
    ]


def splittable(layer, model=None):
    """`(True, "")` if `split_model` can split the layer, else `(False, why)`.

    `model`: the Functional model it is in (calls by other models that
    reuse the layer do not count), or None.
    """
    kind = type(layer)
    if kind not in (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D):
        return False, (
            f"{kind.__name__} is not split (only Dense, Conv1D and Conv2D: a "
            "depthwise or transposed convolution's groups would need sliced "
            "inputs or outputs)"
        )
    if kind is not keras.layers.Dense:
        if getattr(layer, "groups", 1) != 1:
            return False, "a grouped convolution is not split"
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return False, "a channels_first convolution is not split"
    if len(_nodes(model, layer)) != 1:
        return False, "a layer called more than once is not split"
    return True, ""


def _activation_name(layer):
    value = layer.get_config().get("activation", "linear")
    if value is None:
        return "linear"
    return value if isinstance(value, str) else None


def _per_channel_follower(layer, rank):
    """Whether `layer` acts per channel on the last axis (can run per group)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.axis in (-1, rank - 1) or layer.axis == [rank - 1]
    if isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU,
                          keras.layers.Dropout)):
        return True
    if isinstance(layer, keras.layers.Activation):
        return _activation_name(layer) in ELEMENTWISE_ACTIVATIONS
    return False


def _consumers(model, layer):
    """Layers of `model` (a Functional) that read `layer`'s output."""
    keys = getattr(model, "_nodes", set())
    found = []
    for node in layer._outbound_nodes:
        consumer = node.operation
        index = consumer._inbound_nodes.index(node)
        if f"{id(consumer)}_ib-{index}" in keys:
            found.append((consumer, node))
    return found


def _chain(model, layer):
    """Per-channel layers right after `layer` that move into its groups.

    A follower is taken only when it is the single consumer of the tensor
    before it, reads nothing else, is called once, and is not a model output.
    """
    outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
    chain = []
    current = layer
    rank = len(_nodes(model, layer)[0].output_tensors[0].shape)
    while True:
        produced = _nodes(model, current)[0].output_tensors[0]
        if id(produced) in outputs:
            return chain
        consumers = _consumers(model, current)
        if len(consumers) != 1:
            return chain
        follower, node = consumers[0]
        if (
            len(_nodes(model, follower)) != 1
            or len(node.input_tensors) != 1
            or not _per_channel_follower(follower, rank)
        ):
            return chain
        chain.append(follower)
        current = follower


def concat_tree(tensors, name):
    """Concatenates on the last axis in stages of at most 10 inputs.

    The first groups are joined first, into as few extra CONCATENATION ops
    as keep every op within TFLM's limit; the last stage takes exactly 10
    inputs when there are more than 10, so the fewest channels are copied
    twice.

    Args:
        tensors: The group outputs, in channel order.
        name: Base name of the Concatenate layers.

    Returns:
        `(tensor, ops)`: the joined tensor and the number of Concatenates.
    """
    most = tflm_limits.MAX_CONCATENATION_INPUTS
    items = list(tensors)
    ops = 0
    while len(items) > most:
        take = min(most, len(items) - (most - 1))
        merged = keras.layers.Concatenate(axis=-1, name=f"{name}_stage{ops}")(
            items[:take]
        )
        items = [merged] + items[take:]
        ops += 1
    return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")(items), ops + 1


def group_name(layer_name, index):
    """Name of group `index` of a split layer."""
    return f"{layer_name}_part{index}"


def _slices(sizes):
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _group_layer(layer, name, size, activation):
    """A copy of `layer`'s configuration with `size` output channels."""
    config = dict(layer.get_config())
    config["name"] = name
    config["units" if isinstance(layer, keras.layers.Dense) else "filters"] = size
    config["activation"] = activation
    return type(layer).from_config(config)


def _follower_copy(follower, name, piece):
    config = dict(follower.get_config())
    config["name"] = name
    copy = type(follower).from_config(config)
    weights = None
    if isinstance(follower, keras.layers.BatchNormalization):
        weights = [w[piece] for w in follower.get_weights()]
    return copy, weights


@dataclasses.dataclass(frozen=True)
class SplitLayer:
    """How `split_model` split one layer.

    Attributes:
        groups: The group layers' names, in channel order.
        sizes: Output channels of each group (they sum to the layer's).
        concat_ops: CONCATENATION ops joining the groups (`concat_tree`).
        absorbed: Names of the layers after it moved into every group.
    """

    groups: tuple[str, ...]
    sizes: tuple[int, ...]
    concat_ops: int
    absorbed: tuple[str, ...]


def split_model(model, sizes):
    """A Functional model with the named layers split into channel groups.

    Args:
        model: A built Functional or Sequential Keras model (the plain model
            the exporter converts). Its layers are reused, not changed.
        sizes: `{layer name: [output channels of each group]}`; every named
            layer must pass `splittable` and be a top-level layer.

    Returns:
        `(split, info)`: the new model, computing the same function, and
        `{layer name: SplitLayer}` for each split layer.

    Raises:
        ValueError: A named layer is missing, not splittable, or inside a
            nested model.
    """
    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    if not hasattr(model, "_nodes"):
        raise ValueError(
            f"model '{model.name}' is subclassed: splitting layers needs a "
            "Functional or Sequential model (lutq_tf.strip_model gives one)."
        )
    top = {layer.name: layer for layer in model.layers}
    existing = {layer.name for layer in lut_tensors.all_layers(model)}
    splits = {}
    absorbed = {}
    for name, group in sizes.items():
        layer = top.get(name)
        if layer is None:
            raise ValueError(
                f"layer '{name}' is not a top-level layer of model "
                f"'{model.name}'; layers inside nested models are not split."
            )
        ok, why = splittable(layer, model)
        if not ok:
            raise ValueError(f"layer '{name}': {why}.")
        channels = layer.units if isinstance(layer, keras.layers.Dense) else layer.filters
        if sum(group) != channels or min(group) < 1:
            raise ValueError(
                f"layer '{name}': group sizes {group} must be >= 1 and sum to "
                f"its {channels} output channels."
            )
        chain = _chain(model, layer)
        splits[name] = (layer, list(group), chain)
        for follower in chain:
            absorbed[id(follower)] = name
    info = {}

    def call(layer, *args, **kwargs):
        if id(layer) in absorbed:
            return args[0]  # already applied inside the groups
        if layer.name not in splits:
            return layer(*args, **kwargs)
        layer, group, chain = splits[layer.name]
        (x,) = args
        activation = _activation_name(layer)
        per_group = activation in ELEMENTWISE_ACTIVATIONS
        weights = layer.get_weights()
        outputs, names = [], []
        for index, piece in enumerate(_slices(group)):
            name = _unique(group_name(layer.name, index), existing)
            part = _group_layer(
                layer, name, piece.stop - piece.start,
                activation if per_group else "linear",
            )
            y = part(x)
            part.set_weights(
                [weights[0][..., piece]] + [w[piece] for w in weights[1:]]
            )
            for follower in chain:
                copy, follower_weights = _follower_copy(
                    follower, _unique(f"{follower.name}_part{index}", existing), piece
                )
                y = copy(y)
                if follower_weights is not None:
                    copy.set_weights(follower_weights)
            outputs.append(y)
            names.append(name)
        y, ops = concat_tree(outputs, _unique(layer.name, existing, always=True))
        if not per_group:
            y = keras.layers.Activation(
                layer.activation, name=_unique(f"{layer.name}_activation", existing)
            )(y)
        info[layer.name] = SplitLayer(
            groups=tuple(names),
            sizes=tuple(group),
            concat_ops=ops,
            absorbed=tuple(f.name for f in chain),
        )
        return y

    split = keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call
    )
    return split, info


def _unique(name, taken, always=False):
    """`name`, or `name_N`, not yet in `taken` (which it joins)."""
    candidate = name if not always else f"{name}_split"
    number = 1
    while candidate in taken:
        candidate = f"{name}_{number}"
        number += 1
    taken.add(candidate)
    return candidate


def split_kernels(kernels, info):
    """The LUT kernels of the split model: each split kernel's channel slices.

    Args:
        kernels: `lut_tensors.LutKernel`s of the model before the split.
        info: What `split_model` returned as `info` (`{layer: SplitLayer}`).

    Returns:
        A new list: kernels of unsplit layers as they were, and for each
        split layer one kernel per group (same dictionary size and mode,
        the group's channels of the array and of any channel scales).
    """
    result = []
    for kernel in kernels:
        entry = info.get(kernel.layer)
        if entry is None or kernel.tensor != "kernel":
            result.append(kernel)
            continue
        for name, piece in zip(entry.groups, _slices(entry.sizes)):
            scales = kernel.channel_scales
            result.append(
                dataclasses.replace(
                    kernel,
                    layer=name,
                    array=np.ascontiguousarray(kernel.array[..., piece]),
                    channel_scales=None if scales is None
                    else np.asarray(scales)[piece],
                )
            )
    return result
