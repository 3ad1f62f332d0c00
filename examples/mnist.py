"""LUT-Q on MNIST: a LeNet-5-style CNN, exported to TFLite Micro.

    python -m examples.mnist --data_dir=../shared/data/mnist.npz \
        [--bits=2] [--constraint=none|pow2|uniform] [--prune_rate=0.5] \
        [--per_channel] [--float_epochs=3] [--lutq_epochs=2]

Without `--data_dir` MNIST is downloaded with `keras.datasets` (needs
internet). Steps: train `lenet` (431k weights, 400k of them in `fc1`) in
float, fine-tune it with LUT-Q, export float32 / int8 / LUT-Q int8 .tflite
files, verify them on TFLM and run them there on the test set.

Measured (2 CPU cores shared with another job, defaults: 2-bit per-tensor
LUT-Q, 3 float + 2 LUT-Q epochs, batch 64, seed 0; 10,000 test images;
3.5 min in all, of which 55 s float training, 45 s LUT-Q, 95 s exports and
TFLM runs):

    variant                      export   Keras acc  TFLM acc  flash bytes  arena bytes
    float                        float32  98.91%     98.91%    1,727,536    60,480
    float + int8 post-training   int8     98.91%     98.92%    450,432      21,440
    LUT-Q 2-bit / tensor + int8  int8     99.07%     99.05%    114,768      405,088

The LUT-Q file is 3.9x smaller than int8 (fc1: 400,000 -> 100,020 bytes).
TFLM decodes the kernels into the arena, so the arena grows by the decoded
fc1 (400 kB): flash is traded for RAM.

Outputs in `--out_dir`: the three .tflite files, `lutq_model_data.cc/.h`
and `results.md`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "mnist.npz (or a directory holding it), e.g. ../shared/data/mnist.npz; "
    "unset: download with keras.datasets.")
_LIMIT = flags.DEFINE_integer(
    "limit", None, "Use only this many train and test images (quick runs).")
_OUT_DIR = flags.DEFINE_string("out_dir", "out/mnist",
                               "Directory for the .tflite files and table.")
_BITS = flags.DEFINE_integer("bits", 2, "LUT-Q index bits (K = 2**bits).")
_CONSTRAINT = flags.DEFINE_enum("constraint", "none",
                                ["none", "pow2", "uniform"],
                                "Dictionary constraint.")
_PRUNE_RATE = flags.DEFINE_float(
    "prune_rate", 0.0, "Fraction of each table's weights set to exactly 0.")
_PER_CHANNEL = flags.DEFINE_boolean(
    "per_channel", False, "One dictionary per output channel.")
_FLOAT_EPOCHS = flags.DEFINE_integer("float_epochs", 3,
                                     "Epochs of float training.")
_LUTQ_EPOCHS = flags.DEFINE_integer("lutq_epochs", 2,
                                    "Epochs of LUT-Q fine-tuning.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3,
                                    "Adam learning rate (float training).")
_LUTQ_LEARNING_RATE = flags.DEFINE_float(
    "lutq_learning_rate", 5e-4, "Adam learning rate of LUT-Q fine-tuning.")
_TFLM_SAMPLES = flags.DEFINE_integer(
    "tflm_samples", None,
    "Run the exports on TFLM on this many test images (default: all; "
    "TFLM takes ~3 ms per image here).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialisation and shuffling.")


def _check_flags():
    if not 1 <= _BITS.value <= 7:
        raise app.UsageError(
            f"--bits must be in 1..7 (TFLM indices have 1 to 7 bits), got "
            f"{_BITS.value}.")
    if not 0.0 <= _PRUNE_RATE.value < 1.0:
        raise app.UsageError(
            f"--prune_rate must be in [0, 1), got {_PRUNE_RATE.value}.")
    for flag in (_FLOAT_EPOCHS, _LUTQ_EPOCHS):
        if flag.value < 0:
            raise app.UsageError(f"--{flag.name} must be >= 0, got {flag.value}.")
    for flag in (_LIMIT, _TFLM_SAMPLES):
        if flag.value is not None and flag.value < 1:
            raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}.")


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

    pipeline.log(f"1/5 loading MNIST from {_DATA_DIR.value or 'keras.datasets'}")
    train, test = datasets.load_mnist(_DATA_DIR.value, limit=_LIMIT.value)
    pipeline.log(f"    {len(train[0])} train / {len(test[0])} test images")

    pipeline.log(f"2/5 float training: lenet, {_FLOAT_EPOCHS.value} epochs")
    model = models.lenet()
    float_seconds = pipeline.train_float(
        model, train, _FLOAT_EPOCHS.value, _BATCH_SIZE.value,
        _LEARNING_RATE.value, seed=_SEED.value)

    options = dict(bits=_BITS.value, constraint=_CONSTRAINT.value,
                   prune_rate=_PRUNE_RATE.value, per_channel=_PER_CHANNEL.value)
    label = pipeline.variant_label(**options)
    pipeline.log(f"3/5 {label} fine-tuning, {_LUTQ_EPOCHS.value} epochs")
    lutq_model, lutq_seconds = pipeline.lutq_finetune(
        model, train, _LUTQ_EPOCHS.value, _BATCH_SIZE.value,
        _LUTQ_LEARNING_RATE.value, seed=_SEED.value, **options)
    lutq_tf.summary(lutq_model)

    pipeline.log("4/5 exports: float32, int8 post-training, LUT-Q int8; "
                 "each verified and run on TFLM")
    rows = pipeline.compare_exports(
        model, lutq_model, out_dir, train[0], test, label,
        tflm_samples=_TFLM_SAMPLES.value, float_seconds=float_seconds,
        lutq_seconds=lutq_seconds, bits=_BITS.value,
        per_channel=_PER_CHANNEL.value)
    pipeline.log("5/5 results")
    pipeline.report(rows, out_dir)


if __name__ == "__main__":
    app.run(main)
