"""Regenerates every benchmark result: `python -m benchmarks.run_all [--quick]`.

1. Accuracy vs bits (`benchmarks.accuracy_vs_bits`): float, int8
   post-training quantisation and LUT-Q variants (1-4 bits, pow2, pruning,
   per tensor and per channel) on the digits CNN, MNIST LeNet and CIFAR-10
   ResNet-8: Keras accuracy, TFLM accuracy of the export, flash bytes.
2. Train-step time ratios: `python -m benchmarks.train_speed` if it exists
   (with `--tfmot`, tfmot clustering's too).
3. Plots: accuracy vs flash bytes with the Pareto front; a weight histogram
   with its dictionary.

Each part writes its JSON to `--out_dir` (default `benchmarks/results/`,
`benchmarks/results/quick/` with `--quick`): `<suite>.json` with the rows
(plus the exporter's per-tensor reports in `<suite>_exports.txt` and the
weight histogram `weights_<suite>.png`) and `train_speed.json`;
each JSON records its command, date and wall time. `results.md` and
`accuracy_vs_bytes.png` are then rebuilt from *every* JSON in `--out_dir`
(`benchmarks.report`): a run replaces only the parts it ran, so
`--suites=cifar10 --notrain_speed` updates just the CIFAR-10 rows
of the one table. `--report_only` rebuilds the report without running
anything. The .tflite files go to `--work_dir` (default `out/benchmarks/`).
A suite whose data is missing is skipped, with the reason printed and in
the markdown (its older JSON, if any, stays).

Each part's wall time is in `results.md` (its JSON's `"run"` record);
`--quick` is meant to stay near 10 min.

    python -m benchmarks.run_all --quick
    python -m benchmarks.run_all --mnist=../shared/data/mnist.npz \
        --cifar10=../shared/data/cifar10_jpeg.tgz \
        --resnet8_h5=../shared/models/mlperf_tiny_resnet8.h5
    python -m benchmarks.run_all --suites=cifar10 --notrain_speed
    python -m benchmarks.run_all --report_only
"""

import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks import suites as suites_lib  # noqa: E402

SUITE_NAMES = report.SUITE_NAMES

_QUICK = flags.DEFINE_boolean(
    "quick", False,
    "~10 minute run: MNIST and CIFAR-10 on subsets with fewer variants.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None,
    "Where results.md, the JSON files and the plots go (default: "
    "benchmarks/results/, or benchmarks/results/quick/ with --quick).")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", os.path.join(suites_lib.REPO_ROOT, "out", "benchmarks"),
    "Where the exported .tflite files go.")
_MNIST = flags.DEFINE_string(
    "mnist", suites_lib.default_path("data", "mnist.npz"),
    "mnist.npz; the MNIST suite is skipped without it.")
_CIFAR10 = flags.DEFINE_string(
    "cifar10", suites_lib.default_path("data", "cifar10_jpeg.tgz"),
    "CIFAR-10 (python batches, class folders or .tgz); the CIFAR-10 suite "
    "is skipped without it.")
_RESNET8_H5 = flags.DEFINE_string(
    "resnet8_h5", suites_lib.default_path("models", "mlperf_tiny_resnet8.h5"),
    "MLPerf Tiny pretrained ResNet-8 .h5; the CIFAR-10 suite is skipped "
    "without it.")
_SUITES = flags.DEFINE_list(
    "suites", list(SUITE_NAMES), "Accuracy-vs-bits suites to run.")
_VARIANTS = flags.DEFINE_list(
    "variants", None,
    f"Run only these variants in every suite: {', '.join(suites_lib.VARIANT_KEYS)}.")
_EPOCHS = flags.DEFINE_integer(
    "epochs", None, "Override every suite's fine-tuning epochs.")
_PRETRAIN_EPOCHS = flags.DEFINE_integer(
    "pretrain_epochs", None, "Override every suite's float pretraining epochs.")
_TFMOT = flags.DEFINE_boolean(
    "tfmot", True, "Time tfmot clustering's train step too (full runs of train_speed).")
_COMPARE_PYTHON = flags.DEFINE_string(
    "compare_python", None,
    "Python with tf-keras + tfmot (default: $LUTQ_COMPARE_PYTHON).")
_TRAIN_SPEED = flags.DEFINE_boolean(
    "train_speed", True, "Run benchmarks.train_speed if it exists.")
_REPORT_ONLY = flags.DEFINE_boolean(
    "report_only", False,
    "Run nothing: rebuild results.md and accuracy_vs_bytes.png from the "
    "JSON files in --out_dir.")


def _train_speed(quick, out_dir, command, tfmot=False, compare_python=None):
    """Runs `benchmarks.train_speed` in its own process.

    With `tfmot` (full runs only), it also times tfmot clustering on the
    same models (with `compare_python`, else $LUTQ_COMPARE_PYTHON).

    Its report goes to `out_dir` too, so a --quick run doesn't overwrite
    the full run's `train_speed.md`; its wall time goes into the `"run"`
    record of its `train_speed.json`.

    Returns:
        A note on the run for the markdown when it did not produce
        `train_speed.md` (failure or missing script), else None.
    """
    from experiments.pipeline import log

    script = os.path.join(suites_lib.REPO_ROOT, "benchmarks", "train_speed.py")
    if not os.path.exists(script):
        return "Not run: `benchmarks/train_speed.py` does not exist yet."
    argv = [sys.executable, "-m", "benchmarks.train_speed",
            f"--out_dir={os.path.abspath(out_dir)}"]
    argv += ["--quick"] if quick else []
    # tfmot's timing adds ~4 min: full runs only (--quick stays in 10 min).
    argv += ["--tfmot"] if tfmot and not quick else ["--notfmot"]
    env = dict(os.environ)
    if compare_python:
        env["LUTQ_COMPARE_PYTHON"] = compare_python
    log(f"[train_speed] {' '.join(argv[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=suites_lib.REPO_ROOT,
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    shown = (f"`python -m benchmarks.train_speed{' --quick' if quick else ''}"
             f"{' --tfmot' if tfmot and not quick else ''}`")
    if proc.returncode != 0:
        return (f"{shown} **failed (exit {proc.returncode})** after "
                f"{seconds:.0f} s (results below, if any, are older):"
                f"\n\n```\n{proc.stderr.strip()[-2000:]}\n```")
    json_path = os.path.join(out_dir, report.TRAIN_SPEED_JSON)
    if os.path.exists(json_path):
        report.add_run_record(json_path,
                              report.run_record(command, seconds, quick))
    if os.path.exists(os.path.join(out_dir, "train_speed.md")):
        return None
    return f"{shown} ({seconds:.0f} s):\n\n```\n{proc.stdout.strip()[-4000:]}\n```"


def run_benchmarks(out_dir, work_dir, quick=False, suite_names=SUITE_NAMES,
                   mnist=None, cifar10=None, resnet8_h5=None,
                   variant_keys=None, epochs=None, pretrain_epochs=None,
                   tfmot=True, compare_python=None, train_speed=True,
                   command=None):
    """Runs the benchmarks and writes `results.md` + plots to `out_dir`.

    The parts run now replace their own JSON files in `out_dir`; the
    report is then built from every JSON there (`benchmarks.report`), so
    the results of earlier runs of other parts are kept.

    Args: as the flags of the same names; `command` is the command line
    shown in the markdown (default: `python -m benchmarks.run_all`).

    Returns:
        The path of `results.md`.
    """
    from benchmarks import accuracy_vs_bits
    from benchmarks import plots
    from experiments import pipeline

    unknown = sorted(set(suite_names) - set(SUITE_NAMES))
    if unknown:
        raise ValueError(f"--suites: unknown suite(s) {unknown}; choose from "
                         f"{', '.join(SUITE_NAMES)}.")
    command = command or (
        "python -m benchmarks.run_all" + (" --quick" if quick else ""))
    begin = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    suites = suites_lib.make_suites(quick, mnist, cifar10, resnet8_h5,
                                    variant_keys, epochs, pretrain_epochs)

    skipped = {}
    for name in suite_names:
        suite = suites[name]
        reason = suite.missing_data()
        if reason:
            skipped[name] = reason
            pipeline.log(f"[{name}] skipped: {reason}")
            continue
        result = accuracy_vs_bits.run_suite(suite, work_dir)
        accuracy_vs_bits.save_json(
            result, os.path.join(out_dir, f"{name}.json"),
            run=report.run_record(command, result.seconds, quick))
        accuracy_vs_bits.save_export_reports(
            result, os.path.join(out_dir, f"{name}_exports.txt"))
        print(pipeline.format_table(result.rows), flush=True)
        histogram = os.path.join(out_dir, f"weights_{name}.png")
        if result.histogram_data is not None:
            weights, dictionary, label = result.histogram_data
            result.histogram = plots.weight_histogram(
                weights, dictionary, histogram,
                f"{suite.title}: layer '{suite.histogram_layer}', {label}")
        elif os.path.exists(histogram):
            os.remove(histogram)  # an older run's layer, not this one's

    speed = (_train_speed(quick, out_dir, command, tfmot, compare_python)
             if train_speed else None)
    path = report.write_report(
        out_dir, command, skipped,
        train_speed_note=speed or (
            None if train_speed else
            "Not rerun by this command (--notrain_speed); the latest run:"))
    pipeline.log(f"wrote {path} ({(time.perf_counter() - begin) / 60:.1f} min)")
    return path


def report_only(out_dir, command=None):
    """Rebuilds `results.md` and the plot from the JSONs; runs nothing.

    Raises:
        ValueError: `out_dir` holds no results JSON, or a malformed one.
    """

    names = [f"{name}.json" for name in SUITE_NAMES]
    names += [report.TRAIN_SPEED_JSON]
    if not os.path.isdir(out_dir) or not any(
            os.path.exists(os.path.join(out_dir, n)) for n in names):
        raise ValueError(
            f"--report_only: no results JSON ({', '.join(names)}) in "
            f"{out_dir!r}; run the benchmarks first or pass --out_dir.")
    return report.write_report(
        out_dir, command or "python -m benchmarks.run_all --report_only")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # TF/absl chatter drowns the output
    try:
        variant_keys = _VARIANTS.value
        if variant_keys is not None:
            suites_lib.select_variants(variant_keys)  # fail fast on typos
        out_dir = _OUT_DIR.value or os.path.join(
            suites_lib.REPO_ROOT, "benchmarks", "results",
            *(["quick"] if _QUICK.value else []))
        command = " ".join(["python -m benchmarks.run_all", *sys.argv[1:]])
        if _REPORT_ONLY.value:
            try:
                print(report_only(out_dir, command))
            except ValueError as error:  # a missing or malformed JSON
                raise app.UsageError(str(error)) from error
            return
        run_benchmarks(
            out_dir, _WORK_DIR.value, _QUICK.value, _SUITES.value,
            _MNIST.value, _CIFAR10.value, _RESNET8_H5.value, variant_keys,
            _EPOCHS.value, _PRETRAIN_EPOCHS.value, _TFMOT.value,
            _COMPARE_PYTHON.value, _TRAIN_SPEED.value,
            command=command)
    except ValueError as error:
        if str(error).startswith("--"):
            raise app.UsageError(str(error)) from error
        raise


if __name__ == "__main__":
    app.run(main)
