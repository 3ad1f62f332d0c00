"""Regenerates every benchmark result: `python -m benchmarks.run_all [--quick]`.

1. Accuracy vs bits (`benchmarks.accuracy_vs_bits`): float, int8
   post-training quantisation and LUT-Q variants (1-4 bits, pow2, pruning,
   per tensor and per channel) on the digits CNN, MNIST LeNet and CIFAR-10
   ResNet-8: Keras accuracy, TFLM accuracy of the export, flash bytes.
2. LUT-Q vs tfmot clustering (`benchmarks.tfmot_compare`), K = 4 and 16.
3. Train-step time ratios: `python -m benchmarks.train_speed` if it exists.
4. Plots: accuracy vs flash bytes with the Pareto front; a weight histogram
   with its dictionary.

Writes `results.md`, per suite a JSON of the rows and the exporter's
per-tensor reports (`<suite>_exports.txt`), and the PNGs to `--out_dir`
(default `benchmarks/results/`, `benchmarks/results/quick/` with `--quick`);
the .tflite files go to `--work_dir` (default `out/benchmarks/`).
A suite whose data is missing is skipped, with the reason printed and in
the markdown. Budget on 2 CPU cores: full ~60 min, `--quick` ~10 min.

    python -m benchmarks.run_all --quick
    python -m benchmarks.run_all --mnist=../shared/data/mnist.npz \
        --cifar10=../shared/data/cifar10_jpeg.tgz \
        --resnet8_h5=../shared/models/mlperf_tiny_resnet8.h5
"""

import datetime
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import suites as suites_lib  # noqa: E402

SUITE_NAMES = ("digits", "mnist", "cifar10")

_QUICK = flags.DEFINE_boolean(
    "quick", False,
    "~10 minute run: MNIST and CIFAR-10 on subsets with fewer variants, "
    "tfmot comparison on digits.")
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
_TFMOT = flags.DEFINE_boolean("tfmot", True,
                              "Run the tfmot clustering comparison.")
_COMPARE_PYTHON = flags.DEFINE_string(
    "compare_python", None,
    "Python with tf-keras + tfmot (default: $LUTQ_COMPARE_PYTHON).")
_TRAIN_SPEED = flags.DEFINE_boolean(
    "train_speed", True, "Run benchmarks.train_speed if it exists.")


def _train_speed(quick, out_dir):
    """Runs `benchmarks.train_speed` in its own process; returns markdown.

    Its report goes to `out_dir` too, so a --quick run doesn't overwrite
    the full run's `train_speed.md`.
    """
    script = os.path.join(suites_lib.REPO_ROOT, "benchmarks", "train_speed.py")
    if not os.path.exists(script):
        return "Not run: `benchmarks/train_speed.py` does not exist yet."
    command = [sys.executable, "-m", "benchmarks.train_speed",
               f"--out_dir={os.path.abspath(out_dir)}"]
    command += ["--quick"] if quick else []
    from examples.pipeline import log
    log(f"[train_speed] {' '.join(command[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=suites_lib.REPO_ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shown = f"`python -m benchmarks.train_speed{' --quick' if quick else ''}`"
    if proc.returncode != 0:
        return (f"{shown} **failed (exit {proc.returncode})** after "
                f"{seconds:.0f} s:\n\n```\n{proc.stderr.strip()[-2000:]}\n```")
    if os.path.exists(os.path.join(out_dir, "train_speed.md")):
        return (f"{shown} ({seconds:.0f} s): see "
                "[train_speed.md](train_speed.md).")
    return f"{shown} ({seconds:.0f} s):\n\n```\n{proc.stdout.strip()[-4000:]}\n```"


def run_benchmarks(out_dir, work_dir, quick=False, suite_names=SUITE_NAMES,
                   mnist=None, cifar10=None, resnet8_h5=None,
                   variant_keys=None, epochs=None, pretrain_epochs=None,
                   tfmot=True, compare_python=None, train_speed=True,
                   command=None):
    """Runs the benchmarks and writes `results.md` + plots to `out_dir`.

    Args: as the flags of the same names; `command` is the command line
    shown in the markdown (default: `python -m benchmarks.run_all`).

    Returns:
        The path of `results.md`.
    """
    from benchmarks import accuracy_vs_bits
    from benchmarks import plots
    from benchmarks import tfmot_compare
    from examples import pipeline

    unknown = sorted(set(suite_names) - set(SUITE_NAMES))
    if unknown:
        raise ValueError(f"--suites: unknown suite(s) {unknown}; choose from "
                         f"{', '.join(SUITE_NAMES)}.")
    begin = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    suites = suites_lib.make_suites(quick, mnist, cifar10, resnet8_h5,
                                    variant_keys, epochs, pretrain_epochs)

    results = []
    skipped = {name: "not run: not in --suites" for name in SUITE_NAMES
               if name not in suite_names}
    for name in suite_names:
        suite = suites[name]
        reason = suite.missing_data()
        if reason:
            skipped[name] = reason
            pipeline.log(f"[{name}] skipped: {reason}")
            continue
        result = accuracy_vs_bits.run_suite(suite, work_dir)
        accuracy_vs_bits.save_json(result, os.path.join(out_dir, f"{name}.json"))
        accuracy_vs_bits.save_export_reports(
            result, os.path.join(out_dir, f"{name}_exports.txt"))
        print(pipeline.format_table(result.rows), flush=True)
        if result.histogram_data is not None:
            weights, dictionary, label = result.histogram_data
            result.histogram = plots.weight_histogram(
                weights, dictionary,
                os.path.join(out_dir, f"weights_{name}.png"),
                f"{suite.title}: layer '{suite.histogram_layer}', {label}")
        results.append(result)

    plot = None
    if results:
        plot = plots.accuracy_vs_bytes(
            [(r.suite.title, r.rows) for r in results],
            os.path.join(out_dir, "accuracy_vs_bytes.png"))

    comparison = None
    if tfmot:
        if not quick and mnist and os.path.exists(mnist):
            model, data, k_epochs, k_pretrain = "lenet", mnist, 1, 2
        else:
            model, data, k_epochs, k_pretrain = "digits_cnn", "digits", 3, 20
            if not quick:
                skipped["tfmot on MNIST"] = (
                    "mnist.npz missing (--mnist): compared on digits instead")
        if epochs is not None:
            k_epochs = epochs
        if pretrain_epochs is not None:
            k_pretrain = pretrain_epochs
        comparison = tfmot_compare.run_comparison(
            model, data, epochs=k_epochs, pretrain_epochs=k_pretrain,
            work_dir=work_dir, python=compare_python)
        print(tfmot_compare.markdown(comparison), flush=True)

    speed = (_train_speed(quick, out_dir) if train_speed
             else "Not run (--notrain_speed).")
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write(_markdown(command, quick, results, skipped, plot, comparison,
                          speed, time.perf_counter() - begin, tfmot_compare))
    pipeline.log(f"wrote {path} ({(time.perf_counter() - begin) / 60:.1f} min)")
    return path


def _markdown(command, quick, results, skipped, plot, comparison, speed,
              seconds, tfmot_compare):
    import keras
    import tensorflow as tf

    from examples import pipeline

    command = command or (
        "python -m benchmarks.run_all" + (" --quick" if quick else ""))
    out = [
        "# LUT-Q benchmark results",
        "",
        f"Generated by `{command}` on {datetime.date.today()} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}) in {seconds / 60:.1f} minutes.",
        "",
        "## 1. Accuracy vs bits",
        "",
        "Every variant starts from the same float model and is fine-tuned "
        "for the same epochs with the same optimiser (the *float* row too, "
        "so it is the fair reference). *Keras acc*: the Keras model on the "
        "whole test set (LUT-Q: the stripped model, kernels = d[A]). *TFLM "
        "acc*: the exported .tflite run on TFLite Micro on *TFLM n* test "
        "images (a fixed random subset when smaller than the test set). "
        "*flash bytes*: the .tflite file; *vs uncompressed*: the same model "
        "without LUT compression; *arena bytes*: the smallest TFLM arena "
        "(decoded LUT kernels live there). LUT-Q rows are exported as full "
        "int8 with bit-packed index tensors + value tables. One seed per "
        "variant: differences within about two standard errors, "
        "sqrt(acc (1 - acc) / n), are noise (at 99 % on 10,000 images: "
        "0.1 points; at 98 % on digits' 450: 0.7 points).",
        "",
    ]
    for r in results:
        out += [
            f"### {r.suite.title}",
            "",
            f"{r.suite.describe()}. {r.num_train} train / {r.num_test} test "
            f"images. Start model: {100 * r.start_accuracy:.2f}% test "
            f"accuracy. Suite time {r.seconds / 60:.1f} min.",
            "",
            pipeline.markdown_table(r.rows),
            "",
        ]
        failed = [row for row in r.rows if row.notes]
        for row in failed:
            out.append(f"- {row.variant}: {row.notes}")
        if failed:
            out.append("")
    if skipped:
        out += ["Skipped:", ""]
        out += [f"- **{name}**: {reason}" for name, reason in skipped.items()]
        out.append("")
    out += ["## 2. LUT-Q vs tfmot weight clustering", ""]
    if comparison is None:
        out += ["Not run (--notfmot).", ""]
    else:
        out += [
            f"{comparison.model} on {comparison.data}: both start from the "
            f"same float weights ({100 * comparison.start_accuracy:.2f}% test "
            f"accuracy), K values per kernel (per tensor, every Conv2D/Dense "
            f"kernel), {comparison.epochs} epoch(s) of fine-tuning, Adam lr "
            f"{comparison.learning_rate}, batch {comparison.batch_size}. "
            "ms/step: median over epochs (first epoch dropped when there "
            "are several); tfmot runs in tf_keras in its own process.",
            "",
            tfmot_compare.markdown(comparison),
            "",
        ]
    out += ["## 3. Train-step time ratios", "", speed, ""]
    out += ["## 4. Plots", ""]
    if plot:
        out += [f"![accuracy vs flash bytes]({os.path.basename(plot)})", "",
                "Red: the Pareto front (no variant is both smaller and more "
                "accurate on TFLM).", ""]
    for r in results:
        if r.histogram:
            out += [f"![weights]({os.path.basename(r.histogram)})", ""]
    return "\n".join(out) + "\n"


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
        run_benchmarks(
            out_dir, _WORK_DIR.value, _QUICK.value, _SUITES.value,
            _MNIST.value, _CIFAR10.value, _RESNET8_H5.value, variant_keys,
            _EPOCHS.value, _PRETRAIN_EPOCHS.value, _TFMOT.value,
            _COMPARE_PYTHON.value, _TRAIN_SPEED.value,
            command=" ".join(["python -m benchmarks.run_all", *sys.argv[1:]]))
    except ValueError as error:
        if str(error).startswith("--"):
            raise app.UsageError(str(error)) from error
        raise


if __name__ == "__main__":
    app.run(main)
