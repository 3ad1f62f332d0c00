"""CIFAR-10 ResNet-8 without fine-tuning: batch-norm re-estimation.

`quantize_model`'s k-means fit of the MLPerf Tiny model, tested as fitted
and after `lutq_tf.reestimate_batchnorm` on the first `--images` images of
a fixed shuffle of the training set; the float model likewise (its .h5
statistics come from MLPerf's own input pipeline). Nothing is trained and
nothing is chosen: the test set only reports.

    nice python -m benchmarks.batchnorm --cifar10=../shared/data/cifar10_jpeg.tgz \\
        --resnet8_h5=../shared/models/mlperf_tiny_resnet8.h5
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks.record import save_record  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# (label, quantize_model options); None: the float model.
ROWS = (
    ("float", None),
    ("LUT-Q 4-bit / channel", {"bits": 4, "per_channel": True}),
    ("LUT-Q 3-bit / channel", {"bits": 3, "per_channel": True}),
    ("LUT-Q 2-bit / channel", {"bits": 2, "per_channel": True}),
    ("LUT-Q 4-bit / tensor", {"bits": 4}),
    ("LUT-Q 2-bit / tensor", {"bits": 2}),
)


def define_flags():
    flags.DEFINE_string("cifar10", None, "CIFAR-10 path (see experiments.datasets).")
    flags.DEFINE_string("resnet8_h5", None, "MLPerf Tiny ResNet-8 .h5.")
    flags.DEFINE_integer("images", 2048, "Training images the statistics are estimated on.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "batchnorm"),
                        "Output path without extension (.json and .md).")


def markdown(record):
    lines = [f"`{record['command']}` ({record['seconds'] / 60:.0f} min, {record['date']}); "
             f"test accuracy (Keras) of the k-means fit, statistics re-estimated on "
             f"{record['images']:,} training images:", "",
             "| model | as fitted | BN re-estimated |", "| --- | ---: | ---: |"]
    lines += [f"| {r['row']} | {100 * r['fitted']:.2f} % | {100 * r['reestimated']:.2f} % |"
              for r in record["runs"]]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import keras
    import numpy as np

    from experiments import datasets
    from experiments import models
    from experiments import pipeline
    import lutq_tf

    f = flags.FLAGS
    if not (f.cifar10 and f.resnet8_h5):
        raise app.UsageError("give --cifar10 and --resnet8_h5")
    start = time.time()
    (x, _), (x_test, y_test) = datasets.load_cifar10(f.cifar10)
    calibration = x[np.random.default_rng(0).permutation(len(x))[:f.images]]
    record = {"command": "python -m benchmarks.batchnorm " + " ".join(sys.argv[1:]),
              "images": f.images, "runs": []}
    for label, options in ROWS:
        model = models.load_pretrained_resnet8(f.resnet8_h5)
        if options is not None:
            keras.utils.set_random_seed(0)  # k-means initialisation draws
            model = lutq_tf.quantize_model(model, **options)
        fitted = pipeline.keras_accuracy(model, x_test, y_test)
        lutq_tf.reestimate_batchnorm(model, calibration)
        record["runs"].append({"row": label, "fitted": fitted,
                               "reestimated": pipeline.keras_accuracy(model, x_test, y_test)})
        print(record["runs"][-1], flush=True)
    record["seconds"] = round(time.time() - start)
    record["date"] = time.strftime("%Y-%m-%d")
    save_record(record, f.out + ".json")
    with open(f.out + ".md", "w") as out:
        out.write("# Batch-norm re-estimation without fine-tuning\n\n" + markdown(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
