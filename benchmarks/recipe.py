"""CIFAR-10 ResNet-8: the fine-tuning recipe, searched on validation data.

Every variant starts from the MLPerf Tiny .h5 and fine-tunes with Adam,
batch 64. The search runs on a validation split (the last 10 % of a fixed
shuffle of the training set; the model trains on the other 90 %), one epoch
per run, seed 0:

- each variant's peak learning rate, under cosine decay to 0;
- the schedule (constant, cosine, cosine with a 10 % linear warm-up), on
  float and 2-bit, each at its own best rate: the one with the best mean
  validation accuracy is used for all, if it beats cosine by more than a
  validation accuracy's standard error (else cosine, the default);
- how far each k-means step moves the dictionary (`dictionary_rate`), on
  4-bit and 2-bit at their best rates, for all LUT-Q rows.

The MLPerf model was trained on all 50,000 training images, so the
validation split is not unseen by the starting point: its accuracies run
~5 points above the test set's, and only their ranking is used.

The reported rows then train on all 50,000 training images for `--epochs`
epochs with the chosen rate and schedule, over `--seeds` seeds, and are
evaluated once on the test set (mean +- SE). The test set takes no part in
any choice.

    nice python -m benchmarks.recipe --cifar10=../shared/data/cifar10_jpeg.tgz \
        --resnet8_h5=../shared/models/mlperf_tiny_resnet8.h5

Each finished run is appended to `benchmarks/results/recipe.json` at once (a
rerun skips the runs already there) and the markdown table is rebuilt from
it: the part runs across sessions.
"""

import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks.record import load_record  # noqa: E402
from benchmarks.record import save_record  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# Headline rows, each in its best dictionary mode (per channel: see
# dictionary_modes.md).
VARIANTS = {
    "float": None,
    "lutq4": {"bits": 4, "per_channel": True},
    "lutq3": {"bits": 3, "per_channel": True},
    "lutq2": {"bits": 2, "per_channel": True},
    "pow2-4": {"bits": 4, "per_channel": True, "constraint": "pow2"},
    "lutq4-pruned50": {"bits": 4, "per_channel": True, "prune_rate": 0.5},
}
# Peak rates: the first four are always tried, and the search climbs the
# ladder while the largest rate tried is the best.
RATES = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
_FIRST_RATES = 4
SCHEDULES = ("cosine", "constant", "warmup")
SCHEDULE_VARIANTS = ("float", "lutq2")
# How far each training k-means step moves d towards the cluster means
# (`dictionary_rate`): chosen once for all LUT-Q rows, on the two ends.
DICTIONARY_RATES = (1.0, 0.1, 0.0)
DICTIONARY_RATE_VARIANTS = ("lutq4", "lutq2")
_BATCH = 64


def define_flags():
    flags.DEFINE_string("cifar10", None, "CIFAR-10 path (see experiments.datasets).")
    flags.DEFINE_string("resnet8_h5", None, "MLPerf Tiny ResNet-8 .h5.")
    flags.DEFINE_list("variants", list(VARIANTS), "Headline rows.")
    flags.DEFINE_integer("epochs", 5, "Epochs of the reported rows.")
    flags.DEFINE_integer("seeds", 3, "Seeds per reported row.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "recipe"),
                        "Output path without extension (.json and .md).")


def learning_rate(peak, schedule, steps, keras=None):
    """A Keras learning rate: `peak` held, cosine-decayed, or warmed up.

    The one definition of the schedules: `tfmot_baseline.py` uses it with
    tf_keras.

    Args:
        peak: the peak learning rate.
        schedule: `"constant"` (`peak` throughout), `"cosine"` (cosine decay
            from `peak` to 0 over `steps`) or `"warmup"` (linear from 0 to
            `peak` over the first 10 % of the steps, at least one, then
            cosine decay to 0 over the rest).
        steps: training steps of the whole run.
        keras: the Keras module whose schedules to build: Keras 3 if None,
            `tf_keras` in the tfmot process.
    """
    if keras is None:
        import keras
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(peak, steps)
    warm = max(1, steps // 10)
    return keras.optimizers.schedules.CosineDecay(
        0.0, steps - warm, warmup_target=peak, warmup_steps=warm)


def _run(record, path, key, h5, variant, peak, schedule, epochs, train, evaluate, seed,
         dictionary_rate=1.0):
    """One fine-tuning run, skipped if `record` has it; returns its accuracy."""
    for run in record["runs"]:
        if run["key"] == key:
            return run["accuracy"]
    from experiments import models
    from experiments import pipeline

    model = models.load_pretrained_resnet8(h5)
    rate = learning_rate(peak, schedule, epochs * math.ceil(len(train[0]) / _BATCH))
    start = time.time()
    if VARIANTS[variant] is None:
        pipeline.train_float(model, train, epochs, _BATCH, rate, verbose=0, seed=seed)
    else:
        model, _ = pipeline.lutq_finetune(model, train, epochs, _BATCH, rate, verbose=0,
                                          seed=seed, dictionary_rate=dictionary_rate,
                                          **VARIANTS[variant])
    accuracy = pipeline.keras_accuracy(model, *evaluate)
    record["runs"].append({"key": key, "accuracy": accuracy,
                           "seconds": round(time.time() - start)})
    save_record(record, path)
    print(f"{key}: {accuracy:.4f}", flush=True)
    return accuracy


def search(record, path, f, search_train, validation):
    """Chooses each variant's peak rate, one schedule and one dictionary rate."""
    import numpy as np

    def run(variant, rate, schedule, dictionary_rate=1.0):
        key = f"search/{variant}/{schedule}/{rate:g}"
        if dictionary_rate != 1.0:
            key += f"/d{dictionary_rate:g}"
        return _run(record, path, key, f.resnet8_h5, variant, rate, schedule, 1,
                    search_train, validation, 0, dictionary_rate)

    def best_rate(variant, schedule):
        scores = {rate: run(variant, rate, schedule) for rate in RATES[:_FIRST_RATES]}
        for rate in RATES[_FIRST_RATES:]:
            if max(scores, key=scores.get) != max(scores):
                break
            scores[rate] = run(variant, rate, schedule)
        best = max(scores, key=scores.get)
        return best, scores[best]

    by_schedule = {
        schedule: np.mean([best_rate(v, schedule)[1]
                           for v in SCHEDULE_VARIANTS if v in f.variants])
        for schedule in SCHEDULES}
    # Another schedule replaces cosine only if it wins by more than the
    # noise of one validation accuracy (its SE, ~0.5 pp at 5,000 images).
    noise = 100 * np.sqrt(0.85 * 0.15 / len(validation[1]))
    best_schedule = max(SCHEDULES, key=by_schedule.get)
    gain = 100 * (by_schedule[best_schedule] - by_schedule["cosine"])
    record["schedule"] = best_schedule if gain > noise else "cosine"
    best = {v: best_rate(v, record["schedule"])[0] for v in f.variants}
    record["learning_rates"] = best
    by_dictionary_rate = {
        d: np.mean([run(v, best[v], record["schedule"], d)
                    for v in DICTIONARY_RATE_VARIANTS if v in f.variants])
        for d in DICTIONARY_RATES}
    record["dictionary_rate"] = max(DICTIONARY_RATES, key=by_dictionary_rate.get)
    save_record(record, path)


def markdown(record):
    import numpy as np

    runs = {r["key"]: r["accuracy"] for r in record["runs"]}
    epochs = record.get("epochs")
    rates = [r for r in RATES if any(k.split("/")[3:] == [f"{r:g}"] for k in runs)]
    lines = ["# CIFAR-10 ResNet-8: the fine-tuning recipe", "",
             f"`{record.get('command', '')}`", "",
             "Search: one epoch per run on 90 % of the training set, accuracy on the "
             "held-out 10 % (seed 0). Peak learning rate per variant:", "",
             "| variant | schedule | " + " | ".join(f"{r:g}" for r in rates) + " |",
             "| --- | --- |" + " ---: |" * len(rates)]
    for variant in VARIANTS:
        for schedule in SCHEDULES:
            cells = [runs.get(f"search/{variant}/{schedule}/{r:g}") for r in rates]
            if any(c is not None for c in cells):
                lines.append(f"| {variant} | {schedule} | " + " | ".join(
                    "" if c is None else f"{100 * c:.2f}%" for c in cells) + " |")
    if "schedule" in record:
        lines += ["", f"Chosen schedule: {record['schedule']}; peak rates: " + ", ".join(
            f"{v} {r:g}" for v, r in record["learning_rates"].items()) + "."]
    if "dictionary_rate" in record:
        lines += ["", "Dictionary rate (d <- d + rate (means - d) at each k-means step), "
                  "at each variant's chosen peak rate:", "",
                  "| variant | " + " | ".join(f"{d:g}" for d in DICTIONARY_RATES) + " |",
                  "| --- |" + " ---: |" * len(DICTIONARY_RATES)]
        for variant in DICTIONARY_RATE_VARIANTS:
            rate = record["learning_rates"].get(variant)
            key = f"search/{variant}/{record['schedule']}/{rate:g}"
            cells = [runs.get(key if d == 1.0 else f"{key}/d{d:g}") for d in DICTIONARY_RATES]
            lines.append(f"| {variant} | " + " | ".join(
                "" if c is None else f"{100 * c:.2f}%" for c in cells) + " |")
        lines += ["", f"Chosen dictionary rate: {record['dictionary_rate']:g}."]

    def stats(variant):
        values = [a for k, a in runs.items() if k.startswith(f"test/{variant}/e{epochs}/seed")]
        if not values:
            return None
        se = np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        return 100 * np.mean(values), 100 * se, len(values)

    lines += ["", f"Test accuracy after {epochs} epochs on all 50,000 training images "
              "(Keras), mean +- SE over seeds; gap to float:", "",
              "| variant | accuracy | gap to float |", "| --- | ---: | ---: |"]
    base = stats("float")
    for variant in VARIANTS:
        s = stats(variant)
        if s is None:
            continue
        gap = "" if base is None or variant == "float" else f"{s[0] - base[0]:+.2f} pp"
        lines.append(f"| {variant} | {s[0]:.2f} +- {s[1]:.2f} (n={s[2]}) | {gap} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)

    from experiments import datasets

    f = flags.FLAGS
    if not (f.cifar10 and f.resnet8_h5):
        raise app.UsageError("give --cifar10 and --resnet8_h5")
    unknown = set(f.variants) - set(VARIANTS)
    if unknown:
        raise app.UsageError(f"--variants: unknown {sorted(unknown)}; known {list(VARIANTS)}")
    path = f.out + ".json"
    record = load_record(path)
    record["command"] = "python -m benchmarks.recipe " + " ".join(sys.argv[1:])
    record["epochs"] = f.epochs
    (x, y), test = datasets.load_cifar10(f.cifar10)
    search(record, path, f, *datasets.validation_split(x, y))
    write_markdown(record, f.out)
    for seed in range(f.seeds):
        for variant in f.variants:
            _run(record, path, f"test/{variant}/e{f.epochs}/seed{seed}", f.resnet8_h5,
                 variant, record["learning_rates"][variant], record["schedule"],
                 f.epochs, (x, y), test, seed, record["dictionary_rate"])
            write_markdown(record, f.out)


def write_markdown(record, out):
    with open(out + ".md", "w") as f:
        f.write(markdown(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
