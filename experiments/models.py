"""Model definitions for the examples and benchmarks (Keras 3 Functional).

The builders return uncompiled models. They use only layers that the
TFLite int8 converter maps onto TFLite Micro builtins: Conv2D, Dense,
BatchNormalization (folded), ReLU, Add, pooling, Flatten and a softmax.

Layer names are fixed so that weights can be matched across frameworks
(`benchmarks/tfmot_baseline.py` rebuilds `digits_cnn`, `lenet` and `mlp`
layer by layer in tf_keras and loads `model.get_weights()` in order).

| builder      | input        | parameters |
| ------------ | ------------ | ---------- |
| `digits_cnn` | (8, 8, 1)    | 23,946     |
| `lenet`      | (28, 28, 1)  | 431,080    |
| `mlp`        | (784,)       | 669,706    |
| `resnet8`    | (32, 32, 3)  | 78,666     |

(counts for `num_classes=10`; ResNet-8's includes the 480 BatchNormalization
moving statistics, as does `model.count_params()`.)

Every builder takes `batch_size=None`; `batch_size=1` builds a static-shape
twin for TFLite export (load weights with `transfer_weights`), so Flatten
converts to a single RESHAPE.
"""

import os

import keras
from keras import layers


def digits_cnn(num_classes=10, classifier_activation="softmax", batch_size=None):
    """Small CNN for scikit-learn's 8x8 digits.

    Conv2D(16, 3x3, same, relu) -> Conv2D(32, 3x3, valid, relu)
    -> MaxPooling2D(2) -> Flatten -> Dense(64, relu) -> Dense(num_classes).

    Args:
        num_classes: number of output classes.
        classifier_activation: activation of the last Dense layer,
            `"softmax"` (probabilities) or `None` (logits).
        batch_size: optional fixed batch size of the input. `None` (any
            batch) for training; 1 gives a static graph for TFLite export
            (otherwise Flatten converts to SHAPE/STRIDED_SLICE/PACK/RESHAPE).

    Returns:
        A `keras.Model` mapping `(batch, 8, 8, 1)` float images to
        `(batch, num_classes)`. 23,946 parameters for 10 classes.
    """
    inputs = keras.Input(shape=(8, 8, 1), batch_size=batch_size, name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(
        inputs
    )  # -> (8, 8, 16)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2")(x)  # (6, 6, 32)
    x = layers.MaxPooling2D(2, name="pool")(x)  # (3, 3, 32)
    x = layers.Flatten(name="flatten")(x)  # (288,)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = layers.Dense(
        num_classes, activation=classifier_activation, name="fc2"
    )(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def lenet(num_classes=10, classifier_activation="softmax", batch_size=None):
    """LeNet-5-style CNN for 28x28 MNIST (the 20/50/500 "Caffe" variant).

    Conv2D(20, 5x5, valid, relu) -> MaxPooling2D(2)
    -> Conv2D(50, 5x5, valid, relu) -> MaxPooling2D(2) -> Flatten
    -> Dense(500, relu) -> Dense(num_classes).

    This is the LeNet that weight-sharing papers (Deep Compression, LUT-Q)
    report on; its 400k-weight `fc1` dominates the size.

    Args:
        num_classes: number of output classes.
        classifier_activation: activation of the last Dense layer,
            `"softmax"` or `None` (logits).
        batch_size: optional fixed batch size of the input. `None` (any
            batch) for training; 1 gives a static graph for TFLite export
            (otherwise Flatten converts to SHAPE/STRIDED_SLICE/PACK/RESHAPE).

    Returns:
        A `keras.Model` mapping `(batch, 28, 28, 1)` to
        `(batch, num_classes)`. 431,080 parameters for 10 classes.
    """
    inputs = keras.Input(shape=(28, 28, 1), batch_size=batch_size, name="image")
    x = layers.Conv2D(20, 5, activation="relu", name="conv1")(inputs)  # 24x24
    x = layers.MaxPooling2D(2, name="pool1")(x)  # 12x12x20
    x = layers.Conv2D(50, 5, activation="relu", name="conv2")(x)  # 8x8
    x = layers.MaxPooling2D(2, name="pool2")(x)  # 4x4x50
    x = layers.Flatten(name="flatten")(x)  # (800,)
    x = layers.Dense(500, activation="relu", name="fc1")(x)
    outputs = layers.Dense(
        num_classes, activation=classifier_activation, name="fc2"
    )(x)
    return keras.Model(inputs, outputs, name="lenet")


def mlp(
    input_dim=784,
    hidden=(512, 512),
    num_classes=10,
    classifier_activation="softmax",
    batch_size=None,
):
    """Fully connected network, by default the 784-512-512-10 MNIST MLP.

    Args:
        input_dim: int, length of the flat input vector; or a shape tuple
            such as `(28, 28, 1)`, in which case the model starts with a
            Flatten layer so it takes the NHWC images of the loaders
            directly (same weights either way).
        hidden: sizes of the hidden Dense layers (ReLU).
        num_classes: number of output classes.
        classifier_activation: activation of the last Dense layer,
            `"softmax"` or `None` (logits).
        batch_size: optional fixed batch size of the input. `None` (any
            batch) for training; 1 gives a static graph for TFLite export
            (otherwise Flatten converts to SHAPE/STRIDED_SLICE/PACK/RESHAPE).

    Returns:
        A `keras.Model` mapping `(batch, input_dim)` (or
        `(batch, *input_dim)`) to `(batch, num_classes)`. The default has
        669,706 parameters.
    """
    if isinstance(input_dim, int):
        inputs = keras.Input(
            shape=(input_dim,), batch_size=batch_size, name="features"
        )
        x = inputs
    else:
        inputs = keras.Input(
            shape=tuple(input_dim), batch_size=batch_size, name="image"
        )
        x = layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(hidden, start=1):
        x = layers.Dense(units, activation="relu", name=f"fc{i}")(x)
    outputs = layers.Dense(
        num_classes,
        activation=classifier_activation,
        name=f"fc{len(hidden) + 1}",
    )(x)
    return keras.Model(inputs, outputs, name="mlp")


# ---------------------------------------------------------------------------
# ResNet-8 (MLPerf Tiny image classification)
# ---------------------------------------------------------------------------


def _conv(filters, kernel_size, strides, name, weight_decay):
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(weight_decay),
        name=name,
    )


def _residual_block(x, filters, strides, name, weight_decay):
    """conv-BN-relu-conv-BN, plus a shortcut, add, relu.

    The shortcut is the identity when shape is kept, else a strided 1x1
    conv (no BN on the shortcut, as in the MLPerf Tiny reference).
    """
    y = _conv(filters, 3, strides, f"{name}_conv1", weight_decay)(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(filters, 3, 1, f"{name}_conv2", weight_decay)(y)
    # The shortcut conv is created before the second BN so that the order of
    # layers with weights matches the reference .h5 (see `transfer_weights`).
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, f"{name}_shortcut", weight_decay)(
            x
        )
    else:
        shortcut = x
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_relu2")(y)


def resnet8(
    input_shape=(32, 32, 3),
    num_classes=10,
    weight_decay=1e-4,
    classifier_activation="softmax",
    batch_size=None,
):
    """ResNet-8 of the MLPerf Tiny image-classification benchmark.

    Stem: Conv2D(16, 3x3) -> BN -> ReLU. Then three residual blocks with
    16, 32, 64 filters and strides 1, 2, 2 (each conv-BN-ReLU-conv-BN plus
    a shortcut that is a strided 1x1 conv when the shape changes; Add;
    ReLU). Then AveragePooling2D over the remaining 8x8 map, Flatten and
    Dense(num_classes). Convs use "same" padding, biases, He-normal
    initialisation and L2 `weight_decay` on their kernels.

    Args:
        input_shape: NHWC input shape without the batch axis. The final
            pooling covers the whole feature map (input size / 4).
        num_classes: number of output classes.
        weight_decay: L2 factor on conv kernels (MLPerf Tiny: 1e-4).
        classifier_activation: `"softmax"` (reference) or `None` (logits).
        batch_size: optional fixed batch size of the input. `None` (any
            batch) for training; 1 gives a static graph for TFLite export
            (otherwise Flatten converts to SHAPE/STRIDED_SLICE/PACK/RESHAPE).

    Returns:
        A `keras.Model` mapping `(batch, 32, 32, 3)` to
        `(batch, num_classes)`: 78,666 parameters for 10 classes (78,186
        trainable + 480 BN moving statistics), the same as the reference
        `pretrainedResnet.h5`.
    """
    inputs = keras.Input(
        shape=tuple(input_shape), batch_size=batch_size, name="image"
    )
    x = _conv(16, 3, 1, "stem_conv", weight_decay)(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, (filters, strides) in enumerate(((16, 1), (32, 2), (64, 2)), 1):
        x = _residual_block(x, filters, strides, f"stack{i}", weight_decay)
    # Global average over the final map, written as a fixed-size
    # AveragePooling2D (TFLite AVERAGE_POOL_2D) like the reference.
    x = layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]), name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(
        num_classes,
        activation=classifier_activation,
        kernel_initializer="he_normal",
        name="fc",
    )(x)
    return keras.Model(inputs, outputs, name="resnet8")


def layers_with_weights(model):
    """The layers of `model` that own weights, in `model.layers` order."""
    return [layer for layer in model.layers if layer.weights]


def transfer_weights(source, target):
    """Copies weights layer by layer, matching layers with weights by order.

    Both models must have the same number of layers with weights, and the
    i-th such layers the same weight shapes (checked before anything is
    copied).

    Args:
        source: `keras.Model` to read weights from.
        target: `keras.Model` to write them to (modified in place).

    Returns:
        `target`.
    """
    src, dst = layers_with_weights(source), layers_with_weights(target)
    if len(src) != len(dst):
        raise ValueError(
            f"`source` has {len(src)} layers with weights but `target` has "
            f"{len(dst)}; the architectures differ."
        )
    for s, d in zip(src, dst):
        s_shapes = [tuple(w.shape) for w in s.weights]
        d_shapes = [tuple(w.shape) for w in d.weights]
        if s_shapes != d_shapes or type(s).__name__ != type(d).__name__:
            raise ValueError(
                f"Layer mismatch: source {type(s).__name__} {s.name!r} "
                f"{s_shapes} vs target {type(d).__name__} {d.name!r} "
                f"{d_shapes}."
            )
    for s, d in zip(src, dst):
        d.set_weights(s.get_weights())
    return target


# The reference ResNet-8 was trained on raw pixel values in [0, 255].
PRETRAINED_RESNET8_INPUT_SCALE = 255.0


def load_pretrained_resnet8(path, rebuild=True, rescale_inputs=True):
    """Loads the MLPerf Tiny pretrained ResNet-8 (`pretrainedResnet.h5`).

    The reference file (Keras 2.4, 78,666 parameters) loads in Keras 3 as a
    Functional model with generic layer names (`conv2d`, `conv2d_1`, ...,
    `batch_normalization`, `activation`, `add`, `average_pooling2d`,
    `flatten`, `dense`) and `Activation("relu")` layers. It expects RGB
    pixel values in [0, 255], not [0, 1]: fed the [0, 1] images of
    `experiments.datasets` as-is it predicts one class (10 % accuracy).

    Args:
        path: path of the .h5 file.
        rebuild: if True (default), return this module's `resnet8()` (with
            descriptive layer names and ReLU layers) holding the file's
            weights. If False, return the model exactly as loaded (inputs
            in [0, 255]); `rescale_inputs` is then ignored.
        rescale_inputs: only with `rebuild`: if True (default), fold the
            x255 input scale into the stem conv kernel, so the model takes
            [0, 1] images like the loaders and computes the same function
            as the reference on 255 times its input. No extra layer: the
            graph stays TFLite-friendly. The stem's L2 factor is divided by
            255**2 so its penalty is unchanged. If False, the rebuilt model
            takes [0, 255] inputs like the file.

    Returns:
        An uncompiled `keras.Model`, `(batch, 32, 32, 3)` ->
        `(batch, 10)` softmax.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`path` does not exist or is not a file: {path!r}. Pass the "
            "MLPerf Tiny `pretrainedResnet.h5`."
        )
    loaded = keras.models.load_model(path, compile=False)
    if not rebuild:
        return loaded
    model = resnet8(
        input_shape=tuple(loaded.input_shape[1:]),
        num_classes=int(loaded.output_shape[-1]),
    )
    transfer_weights(loaded, model)
    if rescale_inputs:
        scale = PRETRAINED_RESNET8_INPUT_SCALE
        stem = model.get_layer("stem_conv")
        # conv(scale * x, k) == conv(x, scale * k): the bias is untouched.
        stem.kernel.assign(stem.kernel * scale)
        l2 = float(stem.kernel_regularizer.l2) / scale**2
        regularizer = keras.regularizers.L2(l2)
        # Keras 3 computes the penalty from the variable's regularizer; the
        # layer attribute is what get_config() reports.
        stem.kernel_regularizer = regularizer
        stem.kernel.regularizer = regularizer
    return model
