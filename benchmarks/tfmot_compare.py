"""LUT-Q against tfmot weight clustering: accuracy and train-step time.

Both start from the same float weights (a Keras 3 model trained
`pretrain_epochs` in float, saved with `save_initial_weights`), cluster
every Conv2D/Dense kernel into K values per tensor, and fine-tune for the
same epochs on the same data with Adam at the same learning rate and batch
size. tfmot runs in its own process (tf_keras; `benchmarks.tfmot_runner`);
LUT-Q runs here. Train-step time: per-epoch wall time over steps, median
over epochs, the first epoch dropped when there are several (it holds the
tracing), measured the same way on both sides.
"""

import dataclasses
import json
import os
import time

import keras

from benchmarks import tfmot_runner
from benchmarks import timing
from experiments import datasets
from experiments import models
from experiments import pipeline


@dataclasses.dataclass
class CompareRow:
    """One K of the comparison.

    Attributes:
        num_values: K.
        lutq_accuracy: LUT-Q test accuracy after fine-tuning (stripped).
        lutq_ms_per_step: LUT-Q train-step time (Keras 3).
        tfmot_accuracy: tfmot test accuracy after fine-tuning and
            `strip_clustering`, or None when tfmot could not run.
        tfmot_ms_per_step: tfmot clustering train-step time (tf_keras).
        tfmot_float_ms_per_step: tf_keras float train-step time, same model.
        tfmot_before_finetune: tfmot accuracy right after clustering.
    """

    num_values: int
    lutq_accuracy: float
    lutq_ms_per_step: float
    tfmot_accuracy: object = None
    tfmot_ms_per_step: object = None
    tfmot_float_ms_per_step: object = None
    tfmot_before_finetune: object = None


@dataclasses.dataclass
class Comparison:
    """The whole comparison; `skipped` says why tfmot did not run."""

    model: str
    data: str
    epochs: int
    batch_size: int
    learning_rate: float
    start_accuracy: float
    rows: list
    skipped: str = ""
    seconds: float = 0.0


def run_comparison(model_name, data, num_values=(4, 16), epochs=2,
                   pretrain_epochs=2, batch_size=32, learning_rate=1e-3,
                   work_dir="out/benchmarks", python=None):
    """Runs LUT-Q and tfmot clustering for each K.

    Args:
        model_name: `"digits_cnn"` or `"lenet"`.
        data: `"digits"` or the path of `mnist.npz`.
        num_values: the K values.
        epochs: fine-tuning epochs (both sides).
        pretrain_epochs: float training of the shared start weights.
        batch_size, learning_rate: Adam settings (both sides).
        work_dir: where the start weights are saved.
        python: interpreter with tfmot (default: `LUTQ_COMPARE_PYTHON`).

    Returns:
        A `Comparison`. If tfmot fails (e.g. not installed), its columns
        are None and `skipped` holds the reason.
    """
    begin = time.perf_counter()
    if data == "digits":
        train, test = datasets.load_digits()
    else:
        train, test = datasets.load_mnist(data)
    build = {"digits_cnn": models.digits_cnn, "lenet": models.lenet}[model_name]
    keras.utils.set_random_seed(0)
    start = build()
    pipeline.log(f"[tfmot] float pretraining of the shared start weights, "
                 f"{pretrain_epochs} epoch(s)")
    pipeline.train_float(start, train, pretrain_epochs, batch_size,
                         learning_rate, verbose=0)
    start_accuracy = pipeline.keras_accuracy(start, *test)
    os.makedirs(work_dir, exist_ok=True)
    weights = tfmot_runner.save_initial_weights(
        start, os.path.join(work_dir, f"tfmot_start_{model_name}.npz"))
    steps = -(-len(train[0]) // batch_size)

    comparison = Comparison(model_name, "digits" if data == "digits" else
                            "mnist", epochs, batch_size, learning_rate,
                            start_accuracy, [])
    for k in num_values:
        pipeline.log(f"[tfmot] LUT-Q K={k}, {epochs} epoch(s)")
        timer = timing.epoch_timer(keras)
        lutq_model, _ = pipeline.lutq_finetune(
            start, train, epochs, batch_size, learning_rate, verbose=0,
            callbacks=[timer], num_values=k)
        row = CompareRow(
            k, pipeline.keras_accuracy(lutq_model, *test),
            timing.ms_per_step(timer.seconds, steps)[0])
        if not comparison.skipped:
            pipeline.log(f"[tfmot] tfmot clustering K={k} (own process)")
            try:
                tfmot = tfmot_runner.run_tfmot_baseline(
                    model=model_name, num_clusters=k, epochs=epochs,
                    batch_size=batch_size, data=data, weights_in=weights,
                    learning_rate=learning_rate, python=python)
                row.tfmot_accuracy = tfmot["test_accuracy"]
                row.tfmot_ms_per_step = tfmot["ms_per_step"]
                row.tfmot_float_ms_per_step = tfmot["float_ms_per_step"]
                row.tfmot_before_finetune = tfmot[
                    "clustered_test_accuracy_before_finetune"]
            except (RuntimeError, OSError) as error:
                comparison.skipped = str(error).splitlines()[0]
                pipeline.log(f"[tfmot] skipped: {comparison.skipped}")
        comparison.rows.append(row)
    comparison.seconds = time.perf_counter() - begin
    return comparison


def save_json(comparison, path, run=None):
    """Writes the comparison as JSON (`run`: command, date, wall seconds)."""
    with open(path, "w") as f:
        json.dump(dict(dataclasses.asdict(comparison), run=run or {}), f,
                  indent=2)


def markdown(comparison):
    """The comparison as a markdown table (and the skip reason)."""
    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    lines = [
        "| K | LUT-Q acc | tfmot acc | tfmot acc before fine-tuning | "
        "LUT-Q ms/step | tfmot ms/step | tf_keras float ms/step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in comparison.rows:
        cells = [str(r.num_values)]
        cells += [cell(a, "{:.2%}") for a in (
            r.lutq_accuracy, r.tfmot_accuracy, r.tfmot_before_finetune)]
        cells += [cell(t, "{:.1f}") for t in (
            r.lutq_ms_per_step, r.tfmot_ms_per_step,
            r.tfmot_float_ms_per_step)]
        lines.append("| " + " | ".join(cells) + " |")
    if comparison.skipped:
        lines.append("")
        lines.append(f"tfmot was skipped: {comparison.skipped}")
    return "\n".join(lines)
