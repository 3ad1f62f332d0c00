"""Accuracy vs bits: every variant of a suite, trained, exported, run on TFLM.

For one `benchmarks.suites.Suite`: get the start model (float training from
scratch, or the pretrained .h5), then for each variant fine-tune a copy of
it for the suite's epochs (float, or LUT-Q with the variant's options),
export it (float32, or full int8 with LUT-compressed kernels) and measure
the Keras test accuracy, the TFLM test accuracy and the .tflite size.

Run it through `python -m benchmarks.run_all` (which writes the markdown).
"""

import dataclasses
import json
import os
import time

import keras

from experiments import datasets
from experiments import models
from experiments import pipeline


@dataclasses.dataclass
class SuiteResult:
    """What `run_suite` measured.

    Attributes:
        suite: the `Suite`.
        rows: one `pipeline.ResultRow` per variant (failed variants have
            `keras_accuracy` None and the error in `notes`).
        start_accuracy: test accuracy of the start model before fine-tuning.
        start_seconds: float pretraining time of the start model.
        num_train, num_test: data set sizes used.
        seconds: wall time of the whole suite.
        histogram: path of the weight-histogram plot, or None.
        histogram_data: `(weights, dictionary, variant label)` of the
            plotted layer.
    """

    suite: object
    rows: list
    start_accuracy: float
    start_seconds: float
    num_train: int
    num_test: int
    seconds: float
    histogram: object = None
    histogram_data: object = None


def load_data(suite):
    """`(train, test)` of a suite."""
    if suite.name == "digits":
        return datasets.load_digits()
    if suite.name == "mnist":
        return datasets.load_mnist(suite.data, limit=suite.limit)
    if suite.name == "cifar10":
        return datasets.load_cifar10(suite.data, limit=suite.limit)
    raise ValueError(f"unknown suite {suite.name!r}")


def start_model(suite, train):
    """The float model every variant starts from, and its training seconds."""
    if suite.pretrained:
        return models.load_pretrained_resnet8(suite.pretrained), 0.0
    model = {"digits_cnn": models.digits_cnn, "lenet": models.lenet,
             "resnet8": models.resnet8}[suite.model]()
    seconds = pipeline.train_float(
        model, train, suite.pretrain_epochs, suite.batch_size,
        suite.pretrain_learning_rate, verbose=0)
    return model, seconds


def copy_model(model):
    """An independent float copy (same architecture and weights)."""
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def run_suite(suite, work_dir, verbose=0):
    """Runs every variant of `suite`.

    Args:
        suite: a `benchmarks.suites.Suite` whose data exists.
        work_dir: where the .tflite files go (`<work_dir>/<suite>/`).
        verbose: Keras `fit` verbosity.

    Returns:
        A `SuiteResult`.
    """
    begin = time.perf_counter()
    directory = os.path.join(work_dir, suite.name)
    os.makedirs(directory, exist_ok=True)
    pipeline.log(f"[{suite.name}] loading data")
    train, test = load_data(suite)
    pipeline.log(f"[{suite.name}] {len(train[0])} train / {len(test[0])} "
                 f"test; start model: {suite.describe()}")
    start, start_seconds = start_model(suite, train)
    start_accuracy = pipeline.keras_accuracy(start, *test)
    pipeline.log(f"[{suite.name}] start model: "
                 f"{100 * start_accuracy:.2f}% test accuracy")

    result = SuiteResult(suite, [], start_accuracy, start_seconds,
                         len(train[0]), len(test[0]), 0.0)
    float_model, float_seconds = None, 0.0
    lutq_keys = [v.key for v in suite.variants if v.options is not None]
    # The histogram shows the preferred variant, else the first LUT-Q one.
    histogram_key = (suite.histogram_variant
                     if suite.histogram_variant in lutq_keys
                     else (lutq_keys or [None])[0])
    for variant in suite.variants:
        pipeline.log(f"[{suite.name}] {variant.label}")
        path = os.path.join(directory, variant.key + ".tflite")
        try:
            if variant.options is None:
                if float_model is None:  # the int8 row quantises it too
                    float_model = copy_model(start)
                    float_seconds = pipeline.train_float(
                        float_model, train, suite.epochs, suite.batch_size,
                        suite.fine_tuning_rate(len(train[0])), verbose=verbose)
                row = pipeline.evaluate_export(
                    float_model, path, variant.label, train[0], test,
                    variant.export, suite.tflm_samples,
                    train_seconds=float_seconds)
            else:
                lutq_model, seconds = pipeline.lutq_finetune(
                    start, train, suite.epochs, suite.batch_size,
                    suite.fine_tuning_rate(len(train[0])), verbose=verbose, **variant.options)
                row = pipeline.evaluate_export(
                    lutq_model, path, variant.label, train[0], test,
                    variant.export, suite.tflm_samples, train_seconds=seconds,
                    bits=variant.options["bits"],
                    per_channel=variant.options["per_channel"])
                if variant.key == histogram_key:
                    result.histogram_data = _layer_weights(
                        lutq_model, suite.histogram_layer) + (variant.label,)
        except Exception as error:  # one broken variant must not end the run
            pipeline.log(f"[{suite.name}] {variant.label} FAILED: "
                         f"{type(error).__name__}: {error}")
            row = pipeline.ResultRow(
                variant=variant.label, keras_accuracy=None,
                export=variant.export,
                notes=f"failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200]}")
        result.rows.append(row)
        pipeline.log(f"[{suite.name}]   Keras "
                     f"{pipeline.format_percent(row.keras_accuracy)}, TFLM "
                     f"{pipeline.format_percent(row.tflm_accuracy)}, "
                     f"{pipeline.format_bytes(row.flash_bytes)} bytes")
    result.seconds = time.perf_counter() - begin
    return result


def _layer_weights(lutq_model, layer_name):
    """`(W, d)`: float weights and dictionary of one LUT-Q layer's kernel."""
    layer = lutq_model.get_layer(layer_name)
    dictionary, _, _ = layer.quantized_tensors["kernel"]
    return layer.layer.kernel.numpy().ravel(), dictionary


def save_json(result, path, run=None):
    """Writes a suite's rows (without the export objects) as JSON.

    `run`: the `benchmarks.report.run_record` of the run (command, date,
    environment, wall seconds).
    """
    rows = [{field.name: getattr(row, field.name)
             for field in dataclasses.fields(row) if field.name != "result"}
            for row in result.rows]
    with open(path, "w") as f:
        json.dump({
            "suite": result.suite.name,
            "title": result.suite.title,
            "description": result.suite.describe(),
            "start_accuracy": result.start_accuracy,
            "start_seconds": result.start_seconds,
            "num_train": result.num_train,
            "num_test": result.num_test,
            "seconds": result.seconds,
            "run": run or {},
            "rows": rows,
        }, f, indent=2)


def save_export_reports(result, path):
    """Writes the exporter's report (per-tensor K, bits, bytes) per variant."""
    with open(path, "w") as f:
        for row in result.rows:
            f.write(f"=== {result.suite.name}: {row.variant}\n")
            f.write((row.result.table() if row.result is not None
                     else row.notes) + "\n\n")
