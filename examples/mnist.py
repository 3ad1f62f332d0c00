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

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_flags(
    "out/mnist", bits=2, batch_size=64, float_epochs=3, lutq_epochs=2,
    data_help="mnist.npz (or a directory holding it), e.g. "
    "../shared/data/mnist.npz; unset: download with keras.datasets.")
flags.DEFINE_integer(
    "tflm_samples", None,
    "Run the exports on TFLM on this many test images (default: all; "
    "TFLM takes ~3 ms per image here).")


def _check_flags():
    if FLAGS.tflm_samples is not None and FLAGS.tflm_samples < 1:
        raise app.UsageError(
            f"--tflm_samples must be >= 1, got {FLAGS.tflm_samples}.")


def main(argv):
    del argv
    cli.setup(_check_flags)
    from experiments import datasets
    from experiments import models
    from experiments import pipeline

    pipeline.start_example(FLAGS.out_dir, FLAGS.seed)
    pipeline.log(f"1/5 loading MNIST from {FLAGS.data_dir or 'keras.datasets'}")
    train, test = datasets.load_mnist(FLAGS.data_dir, limit=FLAGS.limit)
    pipeline.log(f"    {len(train[0])} train / {len(test[0])} test images")

    pipeline.log(f"2/5 float training: lenet, {FLAGS.float_epochs} epochs")
    model = models.lenet()
    float_seconds = pipeline.train_float(
        model, train, FLAGS.float_epochs, FLAGS.batch_size,
        FLAGS.learning_rate, seed=FLAGS.seed)

    options = cli.lutq_options()
    pipeline.finetune_export_report(
        model, train, test, FLAGS.out_dir, options, FLAGS.lutq_epochs,
        FLAGS.batch_size, FLAGS.lutq_learning_rate, FLAGS.seed,
        float_seconds,
        f"{pipeline.variant_label(**options)} fine-tuning, "
        f"{FLAGS.lutq_epochs} epochs", tflm_samples=FLAGS.tflm_samples)


if __name__ == "__main__":
    app.run(main)
