"""Random tiny architectures and LUT-Q settings for the pipeline fuzz test.

`draw(seed)` returns a `Case`: a float Keras model (Sequential or
Functional) built from the seed alone, random data for it, and the
`quantize_model` arguments. The same seed always gives the same case.
Models stay tiny (inputs like (8, 8, 3) or (16,), a few layers of a few
channels), so a case runs through the whole pipeline in seconds.
"""

import dataclasses

import keras
import numpy as np

from lutq_tf import registry

CONSTRAINTS = ("none", "pow2", "uniform")
MODES = ("tensor", "channel", "scaled")
# TFLM's CONCATENATION takes at most this many inputs (kMaxInputNum).
TFLM_MAX_CONCAT_INPUTS = 10


@dataclasses.dataclass
class Case:
    seed: int
    model: keras.Model
    x: np.ndarray
    y: np.ndarray
    options: dict  # quantize_model keyword arguments
    jit_compile: bool  # for `compile`: XLA for the whole train step
    description: str

    def describe(self):
        options = {k: v for k, v in self.options.items() if k != "overrides"}
        overrides = self.options.get("overrides") or {}
        return (f"seed {self.seed}: {self.description}; {options}"
                + ("; jit_compile" if self.jit_compile else "")
                + (f"; overrides {overrides}" if overrides else ""))


def draw(seed, avoid_refusals=True):
    """The case of `seed`.

    With `avoid_refusals` (mostly true; see `run`), layers whose tables
    hold fewer than K weights get an override (per tensor, fewer values or
    float) instead of the ValueError `quantize_model` gives for them.
    """
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)  # the layers' initial weights
    kind = str(rng.choice(["image", "image", "image", "sequence", "vector"]))
    functional = bool(rng.random() < 0.6)
    builder = _Builder(rng, kind, functional)
    model = builder.build(f"fuzz_{seed}")
    classes = int(rng.integers(2, 6))
    shape = (32,) + tuple(model.input_shape[1:])
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.integers(0, classes, size=(32,)).astype(np.int32)

    k = int(rng.integers(2, 17))
    mode = str(rng.choice(MODES))
    options = {
        "num_values": k,
        "constraint": str(rng.choice(CONSTRAINTS)),
        "prune_rate": float(rng.choice([0.0, 0.0, rng.uniform(0.3, 0.5)])),
        "per_channel": mode == "channel",
        "channel_scales": mode == "scaled",
    }
    # XLA for the whole train step costs seconds of compilation per case:
    # one case in four (the k-means steps are compiled with XLA anyway).
    jit_compile = bool(rng.random() < 0.25)
    if avoid_refusals:
        overrides = _overrides(model, k, mode)
        if overrides:
            options["overrides"] = overrides
    description = (f"{'Functional' if functional else 'Sequential'} "
                   f"{kind} {model.input_shape[1:]}: "
                   + " > ".join(builder.trace))
    return Case(seed, model, x, y, options, jit_compile, description)


def table_sizes(layer, per_channel):
    """Weights per table of each quantisable tensor of `layer`."""
    sizes = []
    for spec in registry.quantizable_tensors(layer):
        shape = tuple(getattr(layer, spec.attribute).shape)
        size = int(np.prod(shape))
        channels = int(np.prod([shape[a] for a in spec.channel_axes]))
        sizes.append(size // channels if per_channel else size)
    return sizes


def _overrides(model, k, mode):
    """Per-layer settings for layers whose tables are smaller than K."""
    overrides = {}
    for layer in model.layers:
        if not registry.is_supported(layer):
            continue
        if min(table_sizes(layer, mode == "channel")) >= k:
            continue
        smallest = min(table_sizes(layer, False))
        if mode == "channel" and smallest >= k:
            overrides[layer.name] = {"per_channel": False}
        elif smallest >= 2:
            overrides[layer.name] = {
                "num_values": min(k, smallest), "per_channel": False}
        else:
            overrides[layer.name] = None
    return overrides


class _Builder:
    """Draws layers one by one; Functional models also draw branches."""

    def __init__(self, rng, kind, functional):
        self.rng = rng
        self.kind = kind
        self.functional = functional
        self.trace = []
        self.count = 0

    def _name(self, what):
        self.count += 1
        return f"{what}{self.count}"

    def _channels(self):
        return int(self.rng.integers(2, 9))

    def build(self, name):
        shape = {"image": (8, 8, int(self.rng.integers(1, 4))),
                 "sequence": (16, int(self.rng.integers(1, 4))),
                 "vector": (int(self.rng.integers(4, 17)),)}[self.kind]
        layers = [self._block() for _ in range(int(self.rng.integers(1, 4)))]
        if self.functional:
            inputs = keras.Input(shape)
            x = inputs
            for block in layers:
                x = block(x)
            x = self._head()(x)
            return keras.Model(inputs, x, name=name)
        flat = [layer for block in layers for layer in block.layers]
        head = self._head().layers
        return keras.Sequential([keras.Input(shape)] + flat + head, name=name)

    # A block is a callable on a tensor; `.layers` lists its layers in
    # order for a Sequential model (which has no branches).
    def _block(self):
        if (self.functional and self.kind != "vector"
                and self.rng.random() < 0.4):
            return self._branches()
        layers = [self._weight_layer()]
        if self.rng.random() < 0.4:
            layers.append(
                keras.layers.BatchNormalization(name=self._name("bn")))
            self.trace.append("BN")
        if self.rng.random() < 0.5:
            layers.append(keras.layers.Activation(
                str(self.rng.choice(["relu", "relu6", "tanh"])),
                name=self._name("act")))
        if self.kind != "vector" and self.rng.random() < 0.3:
            layers.append(self._pool())
        return _Chain(layers)

    def _weight_layer(self):
        choices = {
            "image": ["Conv2D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D",
                      "Conv2DTranspose", "Dense"],
            "sequence": ["Conv1D", "Conv1D", "Dense"],
            "vector": ["Dense"],
        }[self.kind]
        kind = str(self.rng.choice(choices))
        self.trace.append(kind)
        name = self._name(kind.lower())
        bias = bool(self.rng.random() < 0.7)
        # "same" padding keeps the spatial size, so blocks and branches
        # compose; strides of 2 are drawn only where they keep it >= 2.
        if kind in ("Conv2D", "Conv1D"):
            layer = getattr(keras.layers, kind)
            return layer(self._channels(), int(self.rng.choice([1, 3])),
                         padding="same", use_bias=bias, name=name)
        if kind == "DepthwiseConv2D":
            return keras.layers.DepthwiseConv2D(
                3, depth_multiplier=int(self.rng.integers(1, 3)),
                padding="same", use_bias=bias, name=name)
        if kind == "SeparableConv2D":
            return keras.layers.SeparableConv2D(
                self._channels(), 3, padding="same", use_bias=bias, name=name)
        if kind == "Conv2DTranspose":
            return keras.layers.Conv2DTranspose(
                self._channels(), 3, padding="same", use_bias=bias, name=name)
        return keras.layers.Dense(self._channels() + 2, use_bias=bias,
                                  name=name)

    def _pool(self):
        kind = str(self.rng.choice(["Max", "Average"]))
        self.trace.append(f"{kind}Pool")
        dims = "2D" if self.kind == "image" else "1D"
        layer = getattr(keras.layers, f"{kind}Pooling{dims}")
        return layer(2, padding="same", name=self._name("pool"))

    def _branches(self):
        """2-3 parallel convolutions merged by Add or Concatenate.

        Rarely, a Concatenate of more than TFLM's 10 inputs: a graph TFLM
        cannot run, which export must refuse clearly.
        """
        many = self.rng.random() < 0.08
        merge = ("Concatenate" if many
                 else str(self.rng.choice(["Add", "Concatenate"])))
        count = (TFLM_MAX_CONCAT_INPUTS + 1 if many
                 else int(self.rng.integers(2, 4)))
        skip = bool(self.rng.random() < 0.3)  # first branch the identity
        conv = (keras.layers.Conv2D if self.kind == "image"
                else keras.layers.Conv1D)
        branch = "Activation" if many else conv.__name__
        self.trace.append(f"{merge}[{'x, ' if skip else ''}"
                          f"{count - skip} x {branch}]")

        def block(x):
            # Layers are made here, where x's channels are known (Add needs
            # equal shapes); the draws stay in a fixed order.
            add_channels = int(x.shape[-1]) if skip else self._channels()
            outs = [x] if skip else []
            if many:
                # Weightless branches: the case is about the CONCATENATION,
                # and each LUT-Q kernel costs seconds of XLA compilation.
                for _ in range(count - skip):
                    outs.append(keras.layers.Activation(
                        str(self.rng.choice(["relu", "relu6", "tanh"])),
                        name=self._name("branch"))(x))
                return keras.layers.Concatenate(
                    name=self._name("concatenate"))(outs)
            for _ in range(count - skip):
                channels = add_channels if merge == "Add" else self._channels()
                outs.append(conv(channels, int(self.rng.choice([1, 3])),
                                 padding="same", name=self._name("branch"))(x))
            merge_layer = getattr(keras.layers, merge)
            return merge_layer(name=self._name(merge.lower()))(outs)

        block.layers = None  # Functional only
        return block

    def _head(self):
        """Flattens (or pools) the features into a small classifier."""
        layers = []
        if self.kind != "vector":
            pool = str(self.rng.choice(["flatten", "gap"]))
            dims = "2D" if self.kind == "image" else "1D"
            layers.append(keras.layers.Flatten(name=self._name("flatten"))
                          if pool == "flatten" else
                          getattr(keras.layers, f"GlobalAveragePooling{dims}")(
                              name=self._name("gap")))
            self.trace.append(pool)
        layers.append(keras.layers.Dense(5, name=self._name("head")))
        self.trace.append("Dense(5)")
        return _Chain(layers)


class _Chain:
    """Layers applied in order: a block of a Sequential or Functional model."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
