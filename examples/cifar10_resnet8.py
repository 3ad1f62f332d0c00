"""LUT-Q on CIFAR-10: the MLPerf Tiny ResNet-8, exported to TFLite Micro.

    python -m examples.cifar10_resnet8 \
        --pretrained=../shared/models/mlperf_tiny_resnet8.h5 \
        --data_dir=../shared/data/cifar10_jpeg.tgz [--bits=4] [--epochs=1]

Starts from the MLPerf Tiny pretrained ResNet-8 (`pretrainedResnet.h5`,
rebuilt to take [0, 1] images). Two copies of it are fine-tuned on the
CIFAR-10 training set for the same `--epochs` with the same optimiser: one
in float (the fair float baseline, since the data may differ from what the
.h5 was trained on, e.g. a JPEG re-encoded copy) and one with LUT-Q. Both
are exported (float32, int8 post-training, LUT-Q int8 with bit-packed
kernels), verified on TFLM and run there on `--tflm_samples` test images
(TFLM takes ~11 ms per image here). `--data_dir` takes the python batches,
train/<class>/ + test/<class>/ image folders, or a .tgz of those; unset it
downloads with `keras.datasets`.

Measured (2 CPU cores, defaults: 4-bit per-tensor LUT-Q, 1 epoch, Adam
3e-4, batch 64, seed 0; the JPEG copy of CIFAR-10, on which the .h5 scores
75.48 %; Keras accuracy on all 10,000 test images, TFLM on a fixed 2,000;
4.4 min in all: ~1.5 min per fine-tuning, 1.6 min exports and TFLM runs):

    variant                      export   Keras acc  TFLM acc  flash bytes  arena bytes
    float                        float32  80.28%     79.60%    319,776      203,232
    float + int8 post-training   int8     80.28%     79.25%    97,040       55,936
    LUT-Q 4-bit / tensor + int8  int8     76.59%     76.10%    67,696       61,184

One epoch of per-tensor LUT-Q fine-tuning does not close the gap to float
(3.7 points). Per-channel dictionaries do better: in the `--quick`
benchmark (5,000 train images, 1 epoch) 80.7 % vs 75.1 % per tensor (float
81.3 %), for about the same size. Longer fine-tuning was not measured.
The file is 1.43x smaller than int8: the batch norms folded into the convs
turn each per-tensor dictionary into per-channel int8 tables, and the
small kernels (stem, shortcuts, fc) stay uncompressed because their tables
would cost more than the indices save.

Outputs in `--out_dir`: the three .tflite files, `lutq_model_data.cc/.h`
and `results.md`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_PRETRAINED = flags.DEFINE_string(
    "pretrained", None,
    "MLPerf Tiny pretrained ResNet-8 .h5, e.g. "
    "../shared/models/mlperf_tiny_resnet8.h5 (required).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "CIFAR-10: cifar-10-batches-py, train/ + test/ class folders, or a .tgz "
    "of them; unset: download with keras.datasets.")
_LIMIT = flags.DEFINE_integer(
    "limit", None, "Use only this many train and test images (quick runs).")
_OUT_DIR = flags.DEFINE_string("out_dir", "out/cifar10_resnet8",
                               "Directory for the .tflite files and table.")
_BITS = flags.DEFINE_integer("bits", 4, "LUT-Q index bits (K = 2**bits).")
_CONSTRAINT = flags.DEFINE_enum("constraint", "none",
                                ["none", "pow2", "uniform"],
                                "Dictionary constraint.")
_PRUNE_RATE = flags.DEFINE_float(
    "prune_rate", 0.0, "Fraction of each table's weights set to exactly 0.")
_PER_CHANNEL = flags.DEFINE_boolean(
    "per_channel", False, "One dictionary per output channel.")
_EPOCHS = flags.DEFINE_integer(
    "epochs", 1, "Fine-tuning epochs, for the float and the LUT-Q copy.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 3e-4, "Adam learning rate of both fine-tunings.")
_TFLM_SAMPLES = flags.DEFINE_integer(
    "tflm_samples", 2000,
    "Run the exports on TFLM on this many test images (a fixed random "
    "subset); 0 runs all of them.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of shuffling and k-means.")


def _check_flags():
    if _PRETRAINED.value is None:
        raise app.UsageError(
            "--pretrained is required: the path of the MLPerf Tiny "
            "pretrainedResnet.h5 (e.g. ../shared/models/mlperf_tiny_resnet8.h5).")
    if not os.path.isfile(os.path.expanduser(_PRETRAINED.value)):
        raise app.UsageError(
            f"--pretrained={_PRETRAINED.value!r} is not a file.")
    if not 1 <= _BITS.value <= 7:
        raise app.UsageError(
            f"--bits must be in 1..7 (TFLM indices have 1 to 7 bits), got "
            f"{_BITS.value}.")
    if not 0.0 <= _PRUNE_RATE.value < 1.0:
        raise app.UsageError(
            f"--prune_rate must be in [0, 1), got {_PRUNE_RATE.value}.")
    if _EPOCHS.value < 0:
        raise app.UsageError(f"--epochs must be >= 0, got {_EPOCHS.value}.")
    if _LIMIT.value is not None and _LIMIT.value < 1:
        raise app.UsageError(f"--limit must be >= 1, got {_LIMIT.value}.")
    if _TFLM_SAMPLES.value < 0:
        raise app.UsageError(
            f"--tflm_samples must be >= 0, got {_TFLM_SAMPLES.value}.")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # TF/absl chatter drowns the output
    _check_flags()
    import keras

    import lutq_tf
    from examples import datasets
    from examples import models
    from examples import pipeline

    out_dir = _OUT_DIR.value
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(_SEED.value)

    pipeline.log(f"1/5 loading CIFAR-10 from "
                 f"{_DATA_DIR.value or 'keras.datasets'}")
    train, test = datasets.load_cifar10(_DATA_DIR.value, limit=_LIMIT.value)
    pipeline.log(f"    {len(train[0])} train / {len(test[0])} test images")

    pretrained = models.load_pretrained_resnet8(_PRETRAINED.value)
    start = pipeline.keras_accuracy(pretrained, *test)
    pipeline.log(f"2/5 float fine-tuning of the pretrained ResNet-8 "
                 f"({100 * start:.2f}% before), {_EPOCHS.value} epoch(s)")
    model = models.load_pretrained_resnet8(_PRETRAINED.value)
    float_seconds = pipeline.train_float(
        model, train, _EPOCHS.value, _BATCH_SIZE.value, _LEARNING_RATE.value,
        seed=_SEED.value)

    options = dict(bits=_BITS.value, constraint=_CONSTRAINT.value,
                   prune_rate=_PRUNE_RATE.value, per_channel=_PER_CHANNEL.value)
    label = pipeline.variant_label(**options)
    pipeline.log(f"3/5 {label} fine-tuning of the pretrained ResNet-8, "
                 f"{_EPOCHS.value} epoch(s)")
    lutq_model, lutq_seconds = pipeline.lutq_finetune(
        pretrained, train, _EPOCHS.value, _BATCH_SIZE.value,
        _LEARNING_RATE.value, seed=_SEED.value, **options)
    lutq_tf.summary(lutq_model)

    pipeline.log("4/5 exports: float32, int8 post-training, LUT-Q int8; "
                 "each verified and run on TFLM")
    rows = pipeline.compare_exports(
        model, lutq_model, out_dir, train[0], test, label,
        tflm_samples=_TFLM_SAMPLES.value or None,
        float_seconds=float_seconds, bits=_BITS.value,
        per_channel=_PER_CHANNEL.value)
    # Both copies start from the same .h5: the LUT-Q row's time is its own.
    rows[-1].train_seconds = lutq_seconds
    pipeline.log("5/5 results")
    pipeline.report(rows, out_dir)


if __name__ == "__main__":
    app.run(main)
