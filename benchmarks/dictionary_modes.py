"""CIFAR-10 ResNet-8: per-tensor, scaled and per-channel dictionaries.

One recipe for every row: Adam, batch 64, one epoch of fine-tuning from the
MLPerf Tiny .h5 at a constant learning rate. The rate is chosen on a
validation split (the last 10 % of a fixed shuffle of the training set):
float and LUT-Q 4-bit scaled are fine-tuned on the other 90 % at each
candidate rate, and the rate with the best mean validation accuracy is
used for every row. The test set is only used for the reported rows,
trained on all 50,000 training images, over 3 seeds (mean +- SE).

    python -m benchmarks.dictionary_modes --cifar10=../shared/data/cifar10_jpeg.tgz \
        --resnet8_h5=../shared/models/mlperf_tiny_resnet8.h5

Each finished run is appended to `benchmarks/results/dictionary_modes.json`
at once (a rerun skips the runs already there), and the markdown table is
rebuilt from it: the part can run across sessions.
"""

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
MODES = {"tensor": {}, "scaled": {"channel_scales": True}, "channel": {"per_channel": True}}
RATES = (3e-4, 1e-4, 3e-5)
SEARCH_VARIANTS = (("float", None, None), ("lutq", 4, "scaled"))
_BATCH = 64


def define_flags():
    flags.DEFINE_string("cifar10", None, "CIFAR-10 path (see experiments.datasets).")
    flags.DEFINE_string("resnet8_h5", None, "MLPerf Tiny ResNet-8 .h5.")
    flags.DEFINE_list("bits", ["4", "3", "2"], "Index bits.")
    flags.DEFINE_list("modes", list(MODES), "Dictionary modes.")
    flags.DEFINE_integer("seeds", 3, "Seeds per reported row.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "dictionary_modes"),
                        "Output path without extension (.json and .md).")
    flags.DEFINE_bool("fit_only", False,
                      "Only the k-means fit of the pretrained weights, no "
                      "training (deterministic; written to <out>_fit.json).")


def _run(key, record, path, train, evaluate, h5, bits, mode, rate, seed):
    """One fine-tuning run, skipped if `record` has it; returns its accuracy."""
    for run in record["runs"]:
        if run["key"] == key and run["rate"] == rate:
            return run["accuracy"]
    # A run at another rate (the choice moved) is replaced.
    record["runs"] = [run for run in record["runs"] if run["key"] != key]
    from experiments import models
    from experiments import pipeline

    model = models.load_pretrained_resnet8(h5)
    start = time.time()
    if bits is None:
        pipeline.train_float(model, train, 1, _BATCH, rate, verbose=0, seed=seed)
    else:
        model, _ = pipeline.lutq_finetune(model, train, 1, _BATCH, rate, verbose=0,
                                          seed=seed, bits=bits, **MODES[mode])
    accuracy = pipeline.keras_accuracy(model, *evaluate)
    record["runs"].append({"key": key, "rate": rate, "accuracy": accuracy,
                           "seconds": round(time.time() - start)})
    save_record(record, path)
    print(f"{key}: {accuracy:.4f}", flush=True)
    return accuracy


def fit_only(f):
    """Test accuracy of the k-means fit alone, per mode and bit width."""
    from experiments import datasets
    from experiments import models
    from experiments import pipeline
    import lutq_tf

    _, test = datasets.load_cifar10(f.cifar10)
    model = models.load_pretrained_resnet8(f.resnet8_h5)
    rows = {"float": pipeline.keras_accuracy(model, *test)}
    for bits in [int(b) for b in f.bits]:
        for mode in f.modes:
            q = lutq_tf.quantize_model(model, bits=bits, **MODES[mode])
            rows[f"lutq{bits}/{mode}"] = pipeline.keras_accuracy(q, *test)
            print(f"fit lutq{bits}/{mode}: {rows[f'lutq{bits}/{mode}']:.4f}", flush=True)
    save_record({"command": "python -m benchmarks.dictionary_modes " + " ".join(sys.argv[1:]),
           "accuracy": rows}, f.out + "_fit.json")


def markdown(record, fit=None):
    import numpy as np

    runs = {r["key"]: r["accuracy"] for r in record["runs"]}
    lines = ["# CIFAR-10 ResNet-8: dictionary modes", "",
             f"`{record.get('command', '')}`. One epoch from the MLPerf .h5, Adam, "
             f"batch {_BATCH}; learning rate chosen on a 10 % validation split "
             "of the training set (float and LUT-Q 4-bit scaled; mean "
             "validation accuracy):", "",
             "| learning rate | " + " | ".join(f"{v[0]}{v[1] or ''} {v[2] or ''}".strip()
                                              for v in SEARCH_VARIANTS) + " |",
             "| ---: |" + " ---: |" * len(SEARCH_VARIANTS)]
    for rate in RATES:
        cells = [runs.get(f"search/{v[0]}{v[1] or ''}/{v[2]}/{rate}") for v in SEARCH_VARIANTS]
        lines.append(f"| {rate:g} | " + " | ".join(
            "" if c is None else f"{100 * c:.2f}%" for c in cells) + " |")
    rate = record.get("learning_rate")
    lines += ["", f"Chosen: {rate}. Test accuracy (Keras), mean +- SE over seeds:", "",
              "| variant | per tensor | scaled | per channel |", "| --- | ---: | ---: | ---: |"]

    def cell(prefix):
        values = [a for k, a in runs.items() if k.startswith(prefix + "/seed")]
        if not values:
            return ""
        mean = 100 * np.mean(values)
        se = (100 * np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1
              else float("nan"))
        return f"{mean:.2f} +- {se:.2f} (n={len(values)})"

    lines.append(f"| float | {cell('test/float')} | | |")
    for bits in (4, 3, 2):
        lines.append(f"| LUT-Q {bits}-bit | " + " | ".join(
            cell(f"test/lutq{bits}/{mode}") for mode in MODES) + " |")
    if fit:
        acc = fit["accuracy"]
        lines += ["", f"k-means fit of the pretrained weights alone, no training "
                  f"(`{fit['command']}`); float {100 * acc['float']:.2f}%:", "",
                  "| variant | per tensor | scaled | per channel |", "| --- | ---: | ---: | ---: |"]
        for bits in (4, 3, 2):
            lines.append(f"| LUT-Q {bits}-bit | " + " | ".join(
                f"{100 * acc[f'lutq{bits}/{m}']:.2f}%" if f"lutq{bits}/{m}" in acc else ""
                for m in MODES) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import numpy as np

    from experiments import datasets

    f = flags.FLAGS
    if not (f.cifar10 and f.resnet8_h5):
        raise app.UsageError("give --cifar10 and --resnet8_h5")
    if f.fit_only:
        fit_only(f)
        return
    path = f.out + ".json"
    record = load_record(path)
    record["command"] = "python -m benchmarks.dictionary_modes " + " ".join(sys.argv[1:])
    (x, y), test = datasets.load_cifar10(f.cifar10)
    search_train, validation = datasets.validation_split(x, y)
    scores = {}
    for rate in RATES:
        for name, bits, mode in SEARCH_VARIANTS:
            key = f"search/{name}{bits or ''}/{mode}/{rate}"
            scores.setdefault(rate, []).append(
                _run(key, record, path, search_train, validation, f.resnet8_h5,
                     bits, mode, rate, 0))
    rate = max(RATES, key=lambda r: np.mean(scores[r]))
    record["learning_rate"] = rate
    save_record(record, path)
    for seed in range(f.seeds):
        _run(f"test/float/seed{seed}", record, path, (x, y), test, f.resnet8_h5,
             None, None, rate, seed)
        for bits in [int(b) for b in f.bits]:
            for mode in f.modes:
                _run(f"test/lutq{bits}/{mode}/seed{seed}", record, path, (x, y), test,
                     f.resnet8_h5, bits, mode, rate, seed)
        write_markdown(record, f.out)


def write_markdown(record, out):
    fit = load_record(out + "_fit.json") if os.path.exists(out + "_fit.json") else None
    text = markdown(record, fit)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
