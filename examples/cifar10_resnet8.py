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

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "pretrained", None,
    "MLPerf Tiny pretrained ResNet-8 .h5, e.g. "
    "../shared/models/mlperf_tiny_resnet8.h5 (required).")
cli.define_flags(
    "out/cifar10_resnet8", bits=4, batch_size=64, epochs=1,
    learning_rate=3e-4, seed_help="Seed of shuffling and k-means.",
    data_help="CIFAR-10: cifar-10-batches-py, train/ + test/ class folders, "
    "or a .tgz of them; unset: download with keras.datasets.")
flags.DEFINE_integer(
    "tflm_samples", 2000,
    "Run the exports on TFLM on this many test images (a fixed random "
    "subset); 0 runs all of them.")


def _check_flags():
    if FLAGS.pretrained is None:
        raise app.UsageError(
            "--pretrained is required: the path of the MLPerf Tiny "
            "pretrainedResnet.h5 (e.g. ../shared/models/mlperf_tiny_resnet8.h5).")
    if not os.path.isfile(os.path.expanduser(FLAGS.pretrained)):
        raise app.UsageError(f"--pretrained={FLAGS.pretrained!r} is not a file.")
    if FLAGS.tflm_samples < 0:
        raise app.UsageError(
            f"--tflm_samples must be >= 0, got {FLAGS.tflm_samples}.")


def main(argv):
    del argv
    cli.setup(_check_flags)
    from experiments import datasets
    from experiments import models
    from experiments import pipeline

    pipeline.start_example(FLAGS.out_dir, FLAGS.seed)
    pipeline.log(f"1/5 loading CIFAR-10 from "
                 f"{FLAGS.data_dir or 'keras.datasets'}")
    train, test = datasets.load_cifar10(FLAGS.data_dir, limit=FLAGS.limit)
    pipeline.log(f"    {len(train[0])} train / {len(test[0])} test images")

    pretrained = models.load_pretrained_resnet8(FLAGS.pretrained)
    start = pipeline.keras_accuracy(pretrained, *test)
    pipeline.log(f"2/5 float fine-tuning of the pretrained ResNet-8 "
                 f"({100 * start:.2f}% before), {FLAGS.epochs} epoch(s)")
    model = models.load_pretrained_resnet8(FLAGS.pretrained)
    float_seconds = pipeline.train_float(
        model, train, FLAGS.epochs, FLAGS.batch_size, FLAGS.learning_rate,
        seed=FLAGS.seed)

    # Both copies start from the same .h5: the LUT-Q row's time is its own.
    options = cli.lutq_options()
    pipeline.finetune_export_report(
        model, train, test, FLAGS.out_dir, options, FLAGS.epochs,
        FLAGS.batch_size, FLAGS.learning_rate, FLAGS.seed, float_seconds,
        f"{pipeline.variant_label(**options)} fine-tuning of the pretrained "
        f"ResNet-8, {FLAGS.epochs} epoch(s)", lutq_start=pretrained,
        tflm_samples=FLAGS.tflm_samples or None)


if __name__ == "__main__":
    app.run(main)
