"""Quickstart: LUT-Q on scikit-learn's digits, exported to TFLite Micro.

    python -m examples.quickstart [--bits=2] [--out_dir=out/quickstart]

Steps (one progress line each): load the bundled 8x8 digits (offline),
train `digits_cnn` in float, fine-tune it with 2-bit LUT-Q (every kernel
becomes 4 values + a 2-bit index per weight), strip it, export it as a
full-int8 .tflite with bit-packed LUT kernels (+ a C array), verify it on
TFLM, and run float32 / int8 / LUT-Q exports on TFLM over the whole test
set. The final table compares accuracy (Keras and TFLM) and bytes.

The compressed model's TFLM outputs are bit-identical to its uncompressed
twin's. The table of a run on this machine is `benchmarks/results/quickstart.md`
(`benchmarks/RESULTS.md` shows it).

Outputs in `--out_dir`: `float32.tflite`, `int8.tflite`, `lutq.tflite`,
`lutq_model_data.cc/.h` and `results.md`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_flags("out/quickstart", bits=2, batch_size=32, float_epochs=30,
                 lutq_epochs=15, lutq_options=False)


def main(argv):
    del argv
    cli.setup()
    from experiments import datasets
    from experiments import models
    from experiments import pipeline

    pipeline.start_example(FLAGS.out_dir, FLAGS.seed)
    pipeline.log("1/5 loading scikit-learn digits")
    train, test = datasets.load_digits(seed=FLAGS.seed)
    pipeline.log(f"    {len(train[0])} train / {len(test[0])} test images, 8x8")

    pipeline.log(f"2/5 float training: digits_cnn, {FLAGS.float_epochs} epochs")
    model = models.digits_cnn()
    float_seconds = pipeline.train_float(
        model, train, FLAGS.float_epochs, FLAGS.batch_size,
        FLAGS.learning_rate, seed=FLAGS.seed)

    tables = "per channel" if FLAGS.per_channel else "per tensor"
    pipeline.finetune_export_report(
        model, train, test, FLAGS.out_dir, cli.lutq_options(),
        FLAGS.lutq_epochs, FLAGS.batch_size, FLAGS.lutq_learning_rate,
        FLAGS.seed, float_seconds,
        f"LUT-Q fine-tuning: {FLAGS.bits}-bit, {tables}, "
        f"{FLAGS.lutq_epochs} epochs")


if __name__ == "__main__":
    app.run(main)
