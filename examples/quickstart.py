"""Quickstart: LUT-Q on scikit-learn's digits, exported to TFLite Micro.

    python -m examples.quickstart [--bits=2] [--out_dir=out/quickstart]

Steps (one progress line each): load the bundled 8x8 digits (offline),
train `digits_cnn` in float, fine-tune it with 2-bit LUT-Q (every kernel
becomes 4 values + a 2-bit index per weight), strip it, export it as a
full-int8 .tflite with bit-packed LUT kernels (+ a C array), verify it on
TFLM, and run float32 / int8 / LUT-Q exports on TFLM over the whole test
set. The final table compares accuracy (Keras and TFLM) and bytes.

Measured (2 CPU cores shared with another job, defaults, seed 0; 450 test
images; 25 s in all, ~20 s of it training and exporting):

    variant                      export   Keras acc  TFLM acc  flash bytes  arena bytes
    float                        float32  98.00%     98.00%    99,000       11,232
    float + int8 post-training   int8     98.00%     97.78%    30,944       5,376
    LUT-Q 2-bit / tensor + int8  int8     97.56%     97.56%    11,120       22,000

The LUT-Q file is 2.8x smaller than int8 (8.9x smaller than float32); its
uncompressed twin is 28,088 bytes. The compressed model's TFLM outputs are
bit-identical to the uncompressed twin's. The arena is larger because TFLM
decodes the LUT kernels into it.

Outputs in `--out_dir`: `float32.tflite`, `int8.tflite`, `lutq.tflite`,
`lutq_model_data.cc/.h` and `results.md`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "out/quickstart",
                               "Directory for the .tflite files and table.")
_BITS = flags.DEFINE_integer("bits", 2, "LUT-Q index bits (K = 2**bits).")
_PER_CHANNEL = flags.DEFINE_boolean(
    "per_channel", False, "One dictionary per output channel.")
_FLOAT_EPOCHS = flags.DEFINE_integer("float_epochs", 30,
                                     "Epochs of float pretraining.")
_LUTQ_EPOCHS = flags.DEFINE_integer("lutq_epochs", 15,
                                    "Epochs of LUT-Q fine-tuning.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3,
                                    "Adam learning rate (float training).")
_LUTQ_LEARNING_RATE = flags.DEFINE_float(
    "lutq_learning_rate", 5e-4, "Adam learning rate of LUT-Q fine-tuning.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialisation and shuffling.")


def _check_flags():
    if not 1 <= _BITS.value <= 7:
        raise app.UsageError(
            f"--bits must be in 1..7 (TFLM indices have 1 to 7 bits), got "
            f"{_BITS.value}.")
    for flag in (_FLOAT_EPOCHS, _LUTQ_EPOCHS):
        if flag.value < 0:
            raise app.UsageError(f"--{flag.name} must be >= 0, got {flag.value}.")
    if _BATCH_SIZE.value < 1:
        raise app.UsageError(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}.")


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

    pipeline.log("1/5 loading scikit-learn digits")
    train, test = datasets.load_digits(seed=_SEED.value)
    pipeline.log(f"    {len(train[0])} train / {len(test[0])} test images, 8x8")

    pipeline.log(f"2/5 float training: digits_cnn, {_FLOAT_EPOCHS.value} epochs")
    model = models.digits_cnn()
    float_seconds = pipeline.train_float(
        model, train, _FLOAT_EPOCHS.value, _BATCH_SIZE.value,
        _LEARNING_RATE.value, seed=_SEED.value)

    tables = "per channel" if _PER_CHANNEL.value else "per tensor"
    pipeline.log(f"3/5 LUT-Q fine-tuning: {_BITS.value}-bit, {tables}, "
                 f"{_LUTQ_EPOCHS.value} epochs")
    lutq_model, lutq_seconds = pipeline.lutq_finetune(
        model, train, _LUTQ_EPOCHS.value, _BATCH_SIZE.value,
        _LUTQ_LEARNING_RATE.value, seed=_SEED.value, bits=_BITS.value,
        per_channel=_PER_CHANNEL.value)
    lutq_tf.summary(lutq_model)

    pipeline.log("4/5 exports: float32, int8 post-training, LUT-Q int8; "
                 "each verified and run on TFLM")
    rows = pipeline.compare_exports(
        model, lutq_model, out_dir, train[0], test,
        pipeline.variant_label(_BITS.value, per_channel=_PER_CHANNEL.value),
        float_seconds=float_seconds, lutq_seconds=lutq_seconds,
        bits=_BITS.value, per_channel=_PER_CHANNEL.value)
    pipeline.log("5/5 results")
    pipeline.report(rows, out_dir)


if __name__ == "__main__":
    app.run(main)
