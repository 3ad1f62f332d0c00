"""Baseline: TensorFlow Model Optimization (tfmot) weight clustering.

tfmot only works with tf_keras (Keras 2), and importing it sets
`TF_USE_LEGACY_KERAS=1` for the whole process. So this is a standalone
script, run in its own process and in its own environment; the library
never imports it. Set that environment up with the project's `compare`
extra (tf-keras, tfmot; `examples` brings Pillow for CIFAR-10's images):

    python3 -m venv /work/venv-compare
    /work/venv-compare/bin/pip install -e ".[compare,examples]"

and call it from the Keras 3 side with `benchmarks.tfmot_runner`
(`run_tfmot_baseline(...)`), or directly:

    /work/venv-compare/bin/python benchmarks/tfmot_baseline.py \\
        --model=digits --data=digits --num_clusters=16 --epochs=2 \\
        --out=/tmp/tfmot.json

What it does, from one set of initial weights (`--weights_in`, else a
seeded random init, optionally float-trained `--pretrain_epochs`):

1. float run: plain tf_keras training for `--epochs`, timed;
2. clustering run: `tfmot.clustering.keras.cluster_weights` on every
   Conv2D/Dense kernel with `--num_clusters` centroids, fine-tuned for
   `--epochs` (timed), then `strip_clustering` and evaluated.

`--pretrained` (always for `--model=resnet8`) is `run_pretrained` instead:
only the clustering run, from a pretrained model: the MLPerf Tiny ResNet-8
(`--resnet8_h5`, x255 folded into the stem as on the Keras 3 side) on
CIFAR-10 (`--data`), or LeNet from `--weights_in` on MNIST; with the
learning-rate schedule of `benchmarks.recipe` (`--schedule`), on the test
set or on its validation split (`--split`), and with `--centroids` and
`--bn` ablations; with `--method=qat`, tfmot's n-bit quantisation-aware
training instead of clustering (`run_pretrained_qat`). `benchmarks/recipe.py`
(the tfmot rows, `tfmot-qat4` among them) and `benchmarks/tfmot_resnet8.py`
(the ablations) drive it.

The other architectures are the tf_keras twins of `experiments/models.py`
(`digits_cnn`, `lenet`, `mlp`), layer by layer, so that
`np.savez(path, *keras3_model.get_weights())` loads here in order.

Output (`--out`, JSON): test accuracies (initial, float after training,
clustered before fine-tuning, clustered after fine-tuning and stripping),
the median train-step time of each run in ms/step (per-epoch time divided
by steps, median over epochs, the first epoch excluded since it includes
tracing/compilation), and the number of distinct values of each kernel
after stripping (a sanity check: at most `--num_clusters`).
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tfmot needs Keras 2; say so before TensorFlow is imported.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

# Run as a file (`python benchmarks/tfmot_baseline.py`): make the repo root
# importable for `experiments.datasets` (numpy-only at import time).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks import timing  # noqa: E402

MODELS = ("digits_cnn", "lenet", "mlp", "speed_cnn")
# Short names accepted by --model.
MODEL_ALIASES = {"digits": "digits_cnn", "cnn": "digits_cnn"}

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    "digits",
    "Architecture: mlp | lenet | digits_cnn | speed_cnn (aliases: digits, "
    "cnn).",
)
flags.DEFINE_integer("num_clusters", 16, "Clusters (LUT entries) per kernel.")
flags.DEFINE_integer("epochs", 2, "Epochs of each timed run.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate, both runs.")
flags.DEFINE_string(
    "data",
    "digits",
    "digits | synthetic (random images, for timing only) | path to "
    "mnist.npz (or a directory holding it).",
)
flags.DEFINE_string(
    "weights_in",
    None,
    "Optional .npz of initial weights in model.get_weights() order "
    "(np.savez(path, *model.get_weights()) on the Keras 3 side).",
)
flags.DEFINE_integer(
    "pretrain_epochs",
    0,
    "Untimed float training before both runs (for a sensible start "
    "without --weights_in).",
)
flags.DEFINE_enum(
    "centroid_init",
    "kmeans_plus_plus",
    ["kmeans_plus_plus", "linear", "density_based", "random"],
    "tfmot CentroidInitialization.",
)
flags.DEFINE_string("weights_out", None, "Optional .npz of stripped weights.")
flags.DEFINE_string("out", None, "Where to write the JSON result.")
flags.DEFINE_integer("seed", 0, "Seed of the random init and shuffling.")
flags.DEFINE_string(
    "resnet8_h5", None, "--model=resnet8: the MLPerf Tiny .h5 (--data: the "
    "CIFAR-10 path of experiments.datasets.load_cifar10).")
flags.DEFINE_bool(
    "pretrained", False,
    "Only cluster and fine-tune a pretrained model (`run_pretrained`): "
    "--model=lenet from --weights_in, --model=resnet8 (always this path) "
    "from --resnet8_h5.")
flags.DEFINE_enum(
    "schedule", "constant", ["constant", "cosine", "warmup"],
    "--pretrained: the learning-rate schedule, peaking at --learning_rate "
    "(benchmarks.recipe.learning_rate).")
flags.DEFINE_enum(
    "split", "test", ["test", "validation"],
    "--pretrained: fine-tune on all training images and evaluate on the test "
    "set (test), or fine-tune on 90 % of them and evaluate on the other 10 % "
    "(validation; experiments.datasets.validation_split).")
flags.DEFINE_enum(
    "centroids", "train", ["train", "freeze", "kmeans"],
    "--pretrained: tfmot's gradient-trained centroids (train), restored "
    "after every batch (freeze), or set to the mean of the original weights "
    "assigned to each after every batch, LUT-Q's update (kmeans).")
flags.DEFINE_enum(
    "bn", "wrapped", ["wrapped", "train"],
    "--pretrained: cluster_weights(model) as is, which wraps every "
    "layer, BatchNormalization included, and whose wrapper drops `training`, "
    "so BN runs in inference mode during fine-tuning (wrapped); or wrap only "
    "the Conv2D/Dense layers (tfmot's clone_model pattern), so BN trains "
    "(train).")
flags.DEFINE_enum(
    "method", "cluster", ["cluster", "qat"],
    "--pretrained: tfmot weight clustering (cluster), or tfmot's n-bit "
    "quantisation-aware training with --weight_bits weights and 8-bit "
    "activations (qat; `run_pretrained_qat`).")
flags.DEFINE_integer("weight_bits", 4, "--method=qat: bits of the weights.")
flags.DEFINE_integer("limit", None, "--pretrained: use only this many "
                     "training and test images (smoke tests).")


# ---------------------------------------------------------------------------
# Models: tf_keras twins of experiments/models.py (same layers, order, names).
# ---------------------------------------------------------------------------


def build_model(keras, name, input_shape, num_classes=10):
    """Builds `name` in tf_keras, matching `experiments.models` layer by layer."""
    L = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    if name == "digits_cnn":
        x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(
            inputs
        )
        x = L.Conv2D(32, 3, activation="relu", name="conv2")(x)
        x = L.MaxPooling2D(2, name="pool")(x)
        x = L.Flatten(name="flatten")(x)
        x = L.Dense(64, activation="relu", name="fc1")(x)
        outputs = L.Dense(num_classes, activation="softmax", name="fc2")(x)
    elif name == "lenet":
        x = L.Conv2D(20, 5, activation="relu", name="conv1")(inputs)
        x = L.MaxPooling2D(2, name="pool1")(x)
        x = L.Conv2D(50, 5, activation="relu", name="conv2")(x)
        x = L.MaxPooling2D(2, name="pool2")(x)
        x = L.Flatten(name="flatten")(x)
        x = L.Dense(500, activation="relu", name="fc1")(x)
        outputs = L.Dense(num_classes, activation="softmax", name="fc2")(x)
    elif name == "mlp":
        # Flatten has no weights: same get_weights() as mlp(input_dim=784).
        x = L.Flatten(name="flatten")(inputs)
        x = L.Dense(512, activation="relu", name="fc1")(x)
        x = L.Dense(512, activation="relu", name="fc2")(x)
        outputs = L.Dense(num_classes, activation="softmax", name="fc3")(x)
    elif name == "speed_cnn":
        # benchmarks/train_speed.py's conv-heavy CNN.
        x = L.Conv2D(32, 3, padding="same", activation="relu",
                     name="conv1")(inputs)
        x = L.Conv2D(64, 3, strides=2, padding="same", activation="relu",
                     name="conv2")(x)
        x = L.Conv2D(64, 3, strides=2, padding="same", activation="relu",
                     name="conv3")(x)
        x = L.GlobalAveragePooling2D(name="pool")(x)
        outputs = L.Dense(num_classes, activation="softmax", name="fc")(x)
    else:
        raise ValueError(f"--model must be one of {MODELS}, got {name!r}.")
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def synthetic_data(image_shape, num_classes=10, n_train=2048, n_test=512, seed=0):
    """Random images labelled by a fixed random linear teacher (learnable)."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(image_shape))
    teacher = rng.standard_normal((dim, num_classes)).astype(np.float32)

    def make(n):
        x = rng.random((n,) + tuple(image_shape), dtype=np.float32)
        y = ((x.reshape(n, -1) - 0.5) @ teacher).argmax(1).astype(np.int32)
        return x, y

    return make(n_train), make(n_test)


def load_data(data, model_name, seed):
    from experiments import datasets

    if data == "digits":
        return datasets.load_digits(seed=seed)
    if data == "synthetic":
        shape = (8, 8, 1) if model_name == "digits_cnn" else (28, 28, 1)
        return synthetic_data(shape, seed=seed)
    if os.path.exists(os.path.expanduser(data)):
        return datasets.load_mnist(data)
    raise ValueError(
        f"--data must be 'digits', 'synthetic' or an existing path to "
        f"mnist.npz (or a directory holding it); got {data!r}."
    )


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def fit_timed(keras, model, x, y, epochs, batch_size, seed):
    timer = timing.epoch_timer(keras)
    keras.utils.set_random_seed(seed)
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[timer],
    )
    steps = -(-len(x) // batch_size)
    return timing.ms_per_step(timer.seconds, steps)


def compile_model(keras, model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def accuracy(model, x, y):
    return float(model.evaluate(x, y, batch_size=256, verbose=0)[1])


def load_weights_npz(path, model):
    """Sets weights from an .npz saved as `np.savez(path, *get_weights())`."""
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.files)
        # np.savez(*arrays) names them arr_0, arr_1, ...: sort numerically.
        if all(k.startswith("arr_") and k[4:].isdigit() for k in keys):
            keys.sort(key=lambda k: int(k[4:]))
        weights = [f[k] for k in keys]
    expected = [tuple(w.shape) for w in model.get_weights()]
    got = [tuple(w.shape) for w in weights]
    if expected != got:
        raise ValueError(
            f"--weights_in {path!r} does not fit model {model.name!r}: "
            f"expected shapes {expected}, got {got}. Save it with "
            "np.savez(path, *model.get_weights()) from the same architecture."
        )
    model.set_weights(weights)


def cluster_model(keras, tfmot, model, num_clusters, centroid_init="kmeans_plus_plus",
                  bn="wrapped"):
    """tfmot weight clustering of `model` (not modified), per kernel.

    Args:
        keras, tfmot: the tf_keras and tfmot modules.
        model: a tf_keras model.
        num_clusters: centroids per kernel (K).
        centroid_init: a `CentroidInitialization` name, lower case.
        bn: `"wrapped"`: `cluster_weights(model)` as is, which wraps every
            layer, BatchNormalization included, and whose wrapper drops
            `training`, so BN runs in inference mode while fine-tuning;
            `"train"`: only the Conv2D/Dense layers are wrapped (tfmot's
            `clone_model` pattern), so BN trains. The same for models
            without BN.

    Returns:
        The clustered model (uncompiled).
    """
    init = getattr(tfmot.clustering.keras.CentroidInitialization, centroid_init.upper())

    def cluster(target):
        return tfmot.clustering.keras.cluster_weights(
            target, number_of_clusters=num_clusters, cluster_centroids_init=init)

    if bn == "wrapped":
        return cluster(model)
    return keras.models.clone_model(model, clone_function=lambda l: (
        cluster(l) if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense)) else l))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def run(
    model_name,
    num_clusters,
    epochs,
    batch_size,
    data,
    weights_in=None,
    learning_rate=1e-3,
    pretrain_epochs=0,
    centroid_init="kmeans_plus_plus",
    weights_out=None,
    seed=0,
):
    """Runs both baselines and returns the result dict (see module doc)."""
    try:
        import tensorflow as tf
        import tensorflow_model_optimization as tfmot
        import tf_keras as keras
    except ImportError as e:
        raise ImportError(
            f"{e}. This baseline needs tensorflow, tf-keras and "
            "tensorflow-model-optimization: run it with the python of a "
            "separate venv that has them (see the module docstring), e.g. "
            "LUTQ_COMPARE_PYTHON=/work/venv-compare/bin/python."
        ) from e

    model_name = MODEL_ALIASES.get(model_name, model_name)
    if model_name not in MODELS:
        raise ValueError(
            f"--model must be one of {MODELS} or {sorted(MODEL_ALIASES)}, "
            f"got {model_name!r}."
        )
    if num_clusters < 2:
        raise ValueError(f"--num_clusters must be >= 2, got {num_clusters}.")
    t_start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load_data(data, model_name, seed)
    expected_hw = (8, 8) if model_name == "digits_cnn" else (28, 28)
    if model_name != "mlp" and tuple(x_train.shape[1:3]) != expected_hw:
        raise ValueError(
            f"--model {model_name} takes {expected_hw} images but --data "
            f"{data!r} has {tuple(x_train.shape[1:])}."
        )
    input_shape = tuple(x_train.shape[1:])

    keras.utils.set_random_seed(seed)
    initial = build_model(keras, model_name, input_shape)
    if weights_in:
        load_weights_npz(weights_in, initial)
    compile_model(keras, initial, learning_rate)
    if pretrain_epochs:
        initial.fit(
            x_train, y_train, batch_size=batch_size, epochs=pretrain_epochs,
            verbose=0,
        )
    start_weights = initial.get_weights()
    initial_acc = accuracy(initial, x_test, y_test)

    # 1. Float run, same start, same schedule.
    float_model = build_model(keras, model_name, input_shape)
    float_model.set_weights(start_weights)
    compile_model(keras, float_model, learning_rate)
    float_ms, float_per_epoch = fit_timed(
        keras, float_model, x_train, y_train, epochs, batch_size, seed
    )
    float_acc = accuracy(float_model, x_test, y_test)

    # 2. Clustering run.
    base = build_model(keras, model_name, input_shape)
    base.set_weights(start_weights)
    clustered = cluster_model(keras, tfmot, base, num_clusters, centroid_init)
    compile_model(keras, clustered, learning_rate)
    clustered_acc_before = accuracy(clustered, x_test, y_test)
    cluster_ms, cluster_per_epoch = fit_timed(
        keras, clustered, x_train, y_train, epochs, batch_size, seed
    )
    stripped = tfmot.clustering.keras.strip_clustering(clustered)
    compile_model(keras, stripped, learning_rate)
    clustered_acc = accuracy(stripped, x_test, y_test)

    distinct = {
        layer.name: int(np.unique(layer.kernel.numpy()).size)
        for layer in stripped.layers
        if hasattr(layer, "kernel")
    }
    if weights_out:
        np.savez(weights_out, *stripped.get_weights())

    return {
        "model": model_name,
        "data": data,
        "input_shape": list(input_shape),
        "num_train": int(len(x_train)),
        "num_test": int(len(x_test)),
        "num_clusters": num_clusters,
        "centroid_init": centroid_init,
        "epochs": epochs,
        "pretrain_epochs": pretrain_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "steps_per_epoch": -(-len(x_train) // batch_size),
        "weights_in": weights_in,
        "initial_test_accuracy": initial_acc,
        "float_test_accuracy": float_acc,
        "clustered_test_accuracy_before_finetune": clustered_acc_before,
        "test_accuracy": clustered_acc,
        "ms_per_step": cluster_ms,
        "ms_per_step_epochs": cluster_per_epoch,
        "float_ms_per_step": float_ms,
        "float_ms_per_step_epochs": float_per_epoch,
        "slowdown_vs_float": cluster_ms / float_ms,
        "distinct_values_per_kernel": distinct,
        "distinct_values_ok": all(n <= num_clusters for n in distinct.values()),
        "num_params": int(stripped.count_params()),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "tf_keras": keras.__version__,
            "tfmot": getattr(tfmot, "__version__", "unknown"),
        },
        "wall_seconds": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------
# A pretrained model, clustered and fine-tuned (benchmarks/recipe.py's tfmot
# rows, benchmarks/tfmot_resnet8.py's ablations)
# ---------------------------------------------------------------------------


def load_resnet8(keras, path):
    """The .h5 in tf_keras with x255 folded into the stem, like Keras 3's
    `experiments.models.load_pretrained_resnet8` (same kernel, same L2)."""
    model = keras.models.load_model(path, compile=False)
    stem = next(l for l in model.layers if isinstance(l, keras.layers.Conv2D))
    stem.kernel.assign(stem.kernel * 255.0)
    # The registered penalty calls this object: scale it in place (clones
    # read the value from its config).
    stem.kernel_regularizer.l2 = float(stem.kernel_regularizer.l2) / 255.0**2
    return model


def load_pretrained(keras, model_name, start, data, limit=None):
    """`(model, (train, test))`: a pretrained model and its data set.

    Args:
        keras: the tf_keras module.
        model_name: `"resnet8"` (`start`: the MLPerf Tiny .h5; `data`: the
            CIFAR-10 path of `experiments.datasets.load_cifar10`) or an MNIST
            model of `MODELS`, `"lenet"` or `"mlp"` (`start`: an .npz of its
            weights, see `load_weights_npz`; `data`: mnist.npz).
        start, data: see `model_name`.
        limit: use only this many training and test images (None: all).
    """
    from experiments import datasets

    if model_name == "resnet8":
        return load_resnet8(keras, start), datasets.load_cifar10(data, limit=limit)
    train, test = datasets.load_mnist(data, limit=limit)
    model = build_model(keras, model_name, train[0].shape[1:])
    load_weights_npz(start, model)
    return model, (train, test)


def cluster_means(tf, wrapper):
    """[(centroid variable, mean of the original weights per cluster)]."""
    out = []
    for name, w in wrapper.original_clusterable_weights.items():
        c = wrapper.cluster_centroids[name]
        k = int(c.shape[0])
        index = tf.reshape(tf.argmin(tf.abs(tf.reshape(w, [-1, 1]) - c), axis=-1), [-1])
        sums = tf.math.unsorted_segment_sum(tf.reshape(w, [-1]), index, k)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(tf.reshape(w, [-1])), index, k)
        out.append((c, tf.where(counts > 0, sums / tf.maximum(counts, 1.0), c)))
    return out


def fit_in_order(model, x, y, epochs, batch_size, seed, callbacks=()):
    """Fits `model` epoch by epoch, each in a fresh order drawn from
    `np.random.default_rng(seed)` (the first: that of
    `benchmarks/tfmot_resnet8.py`'s LUT-Q runs), unshuffled by `fit`;
    returns the seconds it took."""
    start = time.perf_counter()
    order = np.random.default_rng(seed)
    for epoch in range(epochs):
        permutation = order.permutation(len(x))
        x, y = x[permutation], y[permutation]
        model.fit(x, y, batch_size=batch_size, initial_epoch=epoch, epochs=epoch + 1,
                  shuffle=False, verbose=0, callbacks=list(callbacks))
    return time.perf_counter() - start


def start_pretrained(keras, model_name, start, data, limit, split, epochs, batch_size,
                     learning_rate, schedule, seed):
    """The common start of `run_pretrained` and `run_pretrained_qat`: seeds
    tf_keras, loads the model and `split`'s images, builds the learning
    rate and compiles the float model with it.

    Returns:
        `(model, (x, y), evaluate, rate, float accuracy on evaluate)`.
    """
    from benchmarks.recipe import learning_rate as schedule_rate
    from experiments import datasets

    keras.utils.set_random_seed(seed)
    model, ((x, y), evaluate) = load_pretrained(keras, model_name, start, data, limit)
    if split == "validation":
        (x, y), evaluate = datasets.validation_split(x, y)
    steps = epochs * -(-len(x) // batch_size)
    rate = schedule_rate(learning_rate, schedule, steps, keras)
    compile_model(keras, model, rate)
    return model, (x, y), evaluate, rate, accuracy(model, *evaluate)


def run_pretrained(model_name, start, data, num_clusters, epochs, batch_size, learning_rate,
                   seed, centroids="train", bn="wrapped", limit=None, schedule="constant",
                   split="test", centroid_init="kmeans_plus_plus"):
    """tfmot clustering of a pretrained model, fine-tuned with Adam.

    Args:
        model_name, start, data, limit: the model and its data (see
            `load_pretrained`).
        num_clusters: centroids per kernel (K).
        epochs, batch_size: of the fine-tuning.
        learning_rate: the peak rate of `schedule`.
        seed: seeds tf_keras (the centroid initialisation) and the batch
            order: each epoch runs in a fresh order drawn from
            `np.random.default_rng(seed)` (the first: that of
            `benchmarks/tfmot_resnet8.py`'s LUT-Q runs), unshuffled by `fit`.
        centroids: `"train"` (tfmot's gradient-trained centroids),
            `"freeze"` (restored after every batch) or `"kmeans"` (set to the
            mean of the original weights assigned to each after every batch,
            LUT-Q's update).
        bn, centroid_init: see `cluster_model`.
        schedule: `"constant"`, `"cosine"` or `"warmup"`: the schedule of
            `benchmarks.recipe.learning_rate` over all steps of the run.
        split: `"test"`: fine-tune on all training images, evaluate on the
            test set; `"validation"`: fine-tune on 90 % of them and evaluate
            on the other 10 % (`experiments.datasets.validation_split`, the
            same images as the Keras 3 side's).

    Returns:
        The result dict. Its accuracies (`float_test_accuracy`,
        `clustered_test_accuracy_before_finetune`, `test_accuracy`: after
        stripping, ...) are on `split`'s evaluation images.
    """
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    begin = time.perf_counter()
    base, (x, y), evaluate, rate, float_acc = start_pretrained(
        keras, model_name, start, data, limit, split, epochs, batch_size, learning_rate,
        schedule, seed)
    clustered = cluster_model(keras, tfmot, base, num_clusters, centroid_init, bn)
    wrappers = [l for l in clustered.layers if getattr(l, "cluster_centroids", None)]
    bn_layers = [getattr(l, "layer", l) for l in clustered.layers
                 if isinstance(getattr(l, "layer", l), keras.layers.BatchNormalization)]
    moving_mean = [l.moving_mean.numpy() for l in bn_layers]
    compile_model(keras, clustered, rate)
    before = accuracy(clustered, *evaluate)
    variables = [c for wr in wrappers for c in wr.cluster_centroids.values()]
    initial = [c.numpy() for c in variables]

    class Centroids(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if centroids == "freeze":
                for c, value in zip(variables, initial):
                    c.assign(value)
            elif centroids == "kmeans":
                for wr in wrappers:
                    for c, value in cluster_means(tf, wr):
                        c.assign(value)

    fit_seconds = fit_in_order(clustered, x, y, epochs, batch_size, seed, [Centroids()])
    trained = [c.numpy() for c in variables]
    bn_moved = float(max((np.abs(l.moving_mean.numpy() - m).max()
                          for l, m in zip(bn_layers, moving_mean)), default=0.0))
    after = accuracy(clustered, *evaluate)
    # Diagnostics: how far the centroids are from the cluster means of the
    # final weights, and the accuracy once they are replaced by those means.
    means = [value.numpy() for wr in wrappers for _, value in cluster_means(tf, wr)]
    for c, value in zip(variables, means):
        c.assign(value)
    means_acc = accuracy(clustered, *evaluate)
    for c, value in zip(variables, trained):
        c.assign(value)
    stripped = tfmot.clustering.keras.strip_clustering(clustered)
    compile_model(keras, stripped, rate)
    distinct = {l.name: int(np.unique(l.kernel.numpy()).size)
                for l in stripped.layers if hasattr(l, "kernel")}
    return {
        "model": model_name, "num_clusters": num_clusters, "centroids": centroids,
        "bn": bn, "bn_moving_mean_max_change": bn_moved,
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "schedule": schedule, "split": split, "num_train": int(len(x)),
        "num_evaluated": int(len(evaluate[0])),
        "seed": seed, "float_test_accuracy": float_acc,
        "clustered_test_accuracy_before_finetune": before,
        "test_accuracy": accuracy(stripped, *evaluate),
        "test_accuracy_wrapped": after,
        "test_accuracy_centroids_to_means": means_acc,
        "clustered_layers": [wr.layer.name for wr in wrappers],
        "distinct_values_per_kernel": distinct,
        "centroids_initial": [v.tolist() for v in initial],
        "centroids_trained": [v.tolist() for v in trained],
        "cluster_means_final": [v.tolist() for v in means],
        "fit_seconds": fit_seconds, "wall_seconds": time.perf_counter() - begin,
        "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__,
                     "tfmot": getattr(tfmot, "__version__", "unknown")},
    }


def quantize_aware(tfmot, model, weight_bits):
    """tfmot's n-bit quantisation-aware training model of `model`.

    tfmot's `DefaultNBitQuantizeScheme` as shipped: symmetric weights on
    [-(2^(b-1) - 1), 2^(b-1) - 1] per output channel for Conv2D and
    DepthwiseConv2D and per tensor for Dense (TFLM's int4 layouts),
    8-bit activations; batch norms stay separate layers.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.experimental.default_n_bit import (  # noqa: E501
        default_n_bit_quantize_scheme as n_bit,
    )

    annotated = tfmot.quantization.keras.quantize_annotate_model(model)
    scheme = n_bit.DefaultNBitQuantizeScheme(num_bits_weight=weight_bits,
                                             num_bits_activation=8)
    return tfmot.quantization.keras.quantize_apply(annotated, scheme)


def grid_levels(tf, model, weight_bits):
    """{layer: the most distinct values one output channel of its kernel
    takes once fake-quantised with the ranges QAT learnt}: at most
    2^weight_bits - 1 if the weights the model computes with are on the
    grid (a check that the scheme quantised what it says)."""
    levels = {}
    for wrapper in model.layers:
        # By variable name: during a call the wrapper replaces the inner
        # layer's `kernel` attribute with its fake-quantised tensor.
        by_name = {v.name.split("/")[-1].split(":")[0]: v for v in wrapper.weights}
        kernel, low, high = (by_name.get(n) for n in ("kernel", "kernel_min", "kernel_max"))
        if kernel is None or low is None or high is None:
            continue
        if low.shape.rank == 0:
            quantised = tf.quantization.fake_quant_with_min_max_vars(
                kernel, low, high, num_bits=weight_bits, narrow_range=True)
        else:
            quantised = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                kernel, low, high, num_bits=weight_bits, narrow_range=True)
        values = np.reshape(quantised.numpy(), (-1, kernel.shape[-1]))
        levels[wrapper.name] = int(max(np.unique(values[:, c]).size
                                     for c in range(values.shape[1])))
    return levels


def run_pretrained_qat(model_name, start, data, weight_bits, epochs, batch_size,
                       learning_rate, seed, limit=None, schedule="constant", split="test"):
    """tfmot's `weight_bits`-bit quantisation-aware training of a pretrained
    model (`quantize_aware`), fine-tuned with Adam; the anchor for LUT-Q's
    int4-exact dictionaries.

    Args: as `run_pretrained`; `weight_bits`: the weights' bits (4: int4).

    Returns:
        The result dict: `test_accuracy` of the QAT model (fake-quantised
        weights and activations) on `split`'s evaluation images, and
        `grid_levels` (see there).
    """
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    begin = time.perf_counter()
    base, (x, y), evaluate, rate, float_acc = start_pretrained(
        keras, model_name, start, data, limit, split, epochs, batch_size, learning_rate,
        schedule, seed)
    model = quantize_aware(tfmot, base, weight_bits)
    compile_model(keras, model, rate)
    before = accuracy(model, *evaluate)
    fit_seconds = fit_in_order(model, x, y, epochs, batch_size, seed)
    levels = grid_levels(tf, model, weight_bits)
    if not levels or max(levels.values()) > 2**weight_bits - 1:
        raise RuntimeError(f"QAT kernels are not on a {weight_bits}-bit grid: {levels}")
    return {
        "model": model_name, "method": "qat", "weight_bits": weight_bits,
        "activation_bits": 8, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "schedule": schedule, "split": split,
        "num_train": int(len(x)), "num_evaluated": int(len(evaluate[0])), "seed": seed,
        "float_test_accuracy": float_acc, "qat_test_accuracy_before_finetune": before,
        "test_accuracy": accuracy(model, *evaluate), "grid_levels": levels,
        "fit_seconds": fit_seconds, "wall_seconds": time.perf_counter() - begin,
        "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__,
                     "tfmot": getattr(tfmot, "__version__", "unknown")},
    }


def main(argv):
    del argv
    if FLAGS.model == "resnet8" or FLAGS.pretrained:
        start = FLAGS.resnet8_h5 if FLAGS.model == "resnet8" else FLAGS.weights_in
        if not start:
            raise app.UsageError("--pretrained needs --resnet8_h5 (resnet8) or --weights_in")
        if FLAGS.method == "qat":
            result = run_pretrained_qat(
                FLAGS.model, start, FLAGS.data, FLAGS.weight_bits, FLAGS.epochs,
                FLAGS.batch_size, FLAGS.learning_rate, FLAGS.seed, FLAGS.limit,
                FLAGS.schedule, FLAGS.split)
        else:
            result = run_pretrained(
                FLAGS.model, start, FLAGS.data, FLAGS.num_clusters, FLAGS.epochs,
                FLAGS.batch_size, FLAGS.learning_rate, FLAGS.seed, FLAGS.centroids,
                FLAGS.bn, FLAGS.limit, FLAGS.schedule, FLAGS.split, FLAGS.centroid_init)
    else:
        result = run(
            FLAGS.model,
            FLAGS.num_clusters,
            FLAGS.epochs,
            FLAGS.batch_size,
            FLAGS.data,
            weights_in=FLAGS.weights_in,
            learning_rate=FLAGS.learning_rate,
            pretrain_epochs=FLAGS.pretrain_epochs,
            centroid_init=FLAGS.centroid_init,
            weights_out=FLAGS.weights_out,
            seed=FLAGS.seed,
        )
    text = json.dumps(result, indent=2)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
