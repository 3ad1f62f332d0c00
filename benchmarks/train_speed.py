"""Train-step time of LUT-Q over plain float training.

Same model, data and optimiser; the variants' epochs are interleaved
(round-robin) so that background load hits them alike; a run's figure is
the median over epochs of the mean step time within an epoch (the first
epoch, which compiles, is dropped). Ratios also differ between processes
(by up to +-0.1 here, more than between epochs), so `--repeats` runs the
whole measurement in that many fresh processes and reports the median ratio
with its range. The k-means step runs after every optimizer step unless
`kmeans_every` says otherwise.

What a user's `fit` pays per step is the CPU ms/step; the report gives
float's, LUT-Q's extra ms/step, and beside it the compiled k-means step
timed alone (`LUTQWrapper.kmeans_step` on every layer, one call per step)
and one XLA pass over the same weights (read W, write a copy): the floor of
each of the k-means step's two passes (assignment and cluster sums, then
Q = d[A] with the new dictionary, which needs every sum first). `GOALS`
are the train-step ratios asked for; the report says which are met.

Models: an MLP 784-512-512-10 (every weight used once per example: the
LUT-Q step's O(N) work is as large as the matmuls) and a small CNN on 28x28
inputs (every weight reused hundreds of times).

With `--tfmot` (the default when `LUTQ_COMPARE_PYTHON` names a venv with
tf-keras and tfmot), tfmot weight clustering is timed on the same
architectures at the same K, batch and optimiser, against tf_keras float
training in its own process (`benchmarks/tfmot_runner.py`).

    python -m benchmarks.train_speed            # full, 5 processes: ~12 min on 2 cores
    python -m benchmarks.train_speed --tfmot    # + tfmot: ~3 min more
    python -m benchmarks.train_speed --quick    # one process: ~1 min

Writes benchmarks/results/train_speed.{md,json}.
"""

from concurrent import futures
import json
import multiprocessing
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import record  # noqa: E402
from benchmarks import timing  # noqa: E402
from experiments import models  # noqa: E402
import lutq_tf  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a script, so that
    importing this module beside other benchmarks defines nothing)."""
    flags.DEFINE_bool("quick", False, "Fewer epochs and variants.")
    flags.DEFINE_integer("batch_size", 64, "Batch size.")
    flags.DEFINE_integer("steps", 128, "Optimizer steps per epoch.")
    flags.DEFINE_integer("epochs", 4,
                         "Timed epochs per variant (plus one warm-up).")
    flags.DEFINE_integer("repeats", 5,
                         "Fresh processes, each timing every variant; the "
                         "report gives the median ratio and its range. "
                         "--quick: 1.")
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
    flags.DEFINE_list("models", ["mlp", "cnn"], "Models to time: mlp, cnn.")
    flags.DEFINE_bool("tfmot", "LUTQ_COMPARE_PYTHON" in os.environ,
                      "Also time tfmot clustering (in its own tf_keras "
                      "process, $LUTQ_COMPARE_PYTHON) at K = 4, 16, 256. "
                      "Default: on if LUTQ_COMPARE_PYTHON is set.")
    flags.DEFINE_integer("tfmot_epochs", 4,
                         "Epochs of each tfmot and tf_keras float run (the "
                         "first, which compiles, is dropped).")
    flags.DEFINE_string(
        "out_dir", os.path.join(os.path.dirname(__file__), "results"),
        "Output directory.")


def small_cnn():
    """Conv-heavy CNN, 28x28x1 -> 10: 32-64-64 3x3 convs, global pooling."""
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu",
                            name="conv1")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same",
                            activation="relu", name="conv2")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same",
                            activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc")(x))


MODELS = {
    "mlp": (lambda: models.mlp(classifier_activation=None), (784,)),
    "cnn": (small_cnn, (28, 28, 1)),
}
# The same architectures in benchmarks/tfmot_baseline.py.
TFMOT_MODELS = {"mlp": "mlp", "cnn": "speed_cnn"}
TFMOT_K = (4, 16, 256)
# Largest CPU ratio to float per (model, variant), issue 24 ("train-step
# overhead"); the report marks each as met or not.
GOALS = {("mlp", "LUT-Q K=16"): 1.3, ("mlp", "LUT-Q K=256"): 1.5,
         ("cnn", "LUT-Q K=16"): 1.1, ("cnn", "LUT-Q K=256"): 1.1}
# Calls per k-means-step and weight-pass timing (after 3 warm-up calls).
_STEP_CALLS = 50


def _variants(quick):
    variants = [("float", None)]
    for k in (4, 16, 256):
        variants.append((f"LUT-Q K={k}", {"num_values": k}))
    if not quick:
        for every in (4, 16):
            variants.append((f"LUT-Q K=256, k-means every {every}",
                             {"num_values": 256, "kmeans_every": every}))
        # conv1's channels hold 9 weights, fewer than K: it stays float.
        variants.append(("LUT-Q K=16 per channel",
                         {"num_values": 16, "per_channel": True,
                          "min_weights": 1000}))
    return variants


def cpu_ms_per_call(function, calls=_STEP_CALLS):
    """Process CPU ms per call of `function()` after 3 warm-up calls."""
    for _ in range(3):
        function()
    start = time.process_time()
    for _ in range(calls):
        function()
    return 1000 * (time.process_time() - start) / calls


def kmeans_step_ms(model):
    """CPU ms of one compiled k-means step on every LUT-Q layer of `model`."""
    layers = lutq_tf.lutq_layers(model)
    step = tf.function(lambda: [layer.kmeans_step() for layer in layers])
    # Eager calls on CPU return once the function has run.
    return cpu_ms_per_call(step)


def weight_pass_ms(model):
    """CPU ms of one XLA pass over the kernels of `model`'s Dense and Conv
    layers: read each, write a scaled copy (a floor per pass over W)."""
    kernels = [layer.kernel for layer in lutq_tf.all_layers(model)
               if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]
    copy = tf.function(lambda: [1.5 * k for k in kernels], jit_compile=True)
    return cpu_ms_per_call(copy)


def measure(model_name, variants, epochs, steps, batch_size, jit_compile):
    """Times each variant's `fit`, epochs interleaved.

    Returns:
        `{variant: (median wall ms/step, median CPU ms/step, CPU ms of the
        k-means step alone or None for float, CPU ms of one weight pass)}`.
    """
    build, input_shape = MODELS[model_name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch_size, *input_shape)).astype("float32")
    y = rng.integers(0, 10, len(x))
    keras.utils.set_random_seed(0)
    base = build()
    runs = []
    for name, options in variants:
        model = base if options is None else lutq_tf.quantize_model(
            base, **options)
        if options is None:
            model = keras.models.clone_model(base)
            model.set_weights(base.get_weights())
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile)
        runs.append((name, model, timing.epoch_timer(keras)))
    for _ in range(epochs + 1):  # round-robin; epoch 0 compiles
        for name, model, timer in runs:
            model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0,
                      shuffle=False, callbacks=[timer])
    weight_pass = weight_pass_ms(base)
    return {
        name: (1000 * float(np.median(timer.seconds[1:])) / steps,
               1000 * float(np.median(timer.cpu_seconds[1:])) / steps,
               kmeans_step_ms(model) if lutq_tf.lutq_layers(model) else None,
               weight_pass)
        for name, model, timer in runs
    }


def measure_repeated(model_name, variants, epochs, steps, batch_size,
                     jit_compile, repeats):
    """`measure` in `repeats` fresh processes (in this one if 1).

    Returns:
        `{variant: {"wall": [ms/step per repeat], "cpu": [...],
        "kmeans": [k-means step CPU ms or None, ...], "pass": [...]}}`.
    """
    args = (model_name, variants, epochs, steps, batch_size, jit_compile)
    if repeats == 1:
        runs = [measure(*args)]
    else:
        # One process per repeat: what differs between processes (memory
        # layout, thread placement) is part of what a user sees.
        runs = []
        for _ in range(repeats):
            with futures.ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs.append(pool.submit(measure, *args).result())
    keys = ("wall", "cpu", "kmeans", "pass")
    return {name: {key: [run[name][i] for run in runs]
                   for i, key in enumerate(keys)}
            for name, _ in variants}


def summarize(timings):
    """Per variant: median wall and CPU ms/step, and the ratios to float.

    A repeat's ratio divides by that repeat's float time; the figures are
    medians over repeats, with the range of the wall-time ratio.

    Args:
        timings: `measure_repeated`'s result; must hold a "float" variant.

    Returns:
        `{variant: {"wall", "cpu", "ratio", "ratio_min", "ratio_max",
        "cpu_ratio", "extra_cpu"}}` (+ `"kmeans"`, `"pass"`: median CPU
        ms of the k-means step alone and of one weight pass, when timed).
    """
    wall0 = np.array(timings["float"]["wall"])
    cpu0 = np.array(timings["float"]["cpu"])
    summary = {}
    for name, t in timings.items():
        ratios = np.array(t["wall"]) / wall0
        summary[name] = {
            "wall": float(np.median(t["wall"])),
            "cpu": float(np.median(t["cpu"])),
            "ratio": float(np.median(ratios)),
            "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()),
            "cpu_ratio": float(np.median(np.array(t["cpu"]) / cpu0)),
            "extra_cpu": float(np.median(np.array(t["cpu"]) - cpu0)),
        }
        for key in ("kmeans", "pass"):
            figures = [v for v in t.get(key, []) if v is not None]
            if figures:
                summary[name][key] = float(np.median(figures))
    return summary


def measure_tfmot(model_name, batch_size, epochs, ks=TFMOT_K):
    """tfmot clustering vs tf_keras float, in the baseline's own process.

    Returns:
        `{K: {"tfmot": ms/step, "float": ms/step}}`, or a string saying why
        it did not run.
    """
    from benchmarks import tfmot_runner

    timings = {}
    for k in ks:
        try:
            result = tfmot_runner.run_tfmot_baseline(
                model=TFMOT_MODELS[model_name], num_clusters=k, epochs=epochs,
                batch_size=batch_size, data="synthetic")
        except RuntimeError as e:
            return f"not run: {str(e).splitlines()[0]}"
        timings[k] = {"tfmot": result["ms_per_step"],
                      "float": result["float_ms_per_step"]}
    return timings


def _command(config):
    return "python -m benchmarks.train_speed" + "".join(
        f" --{flag}" for flag in ("quick", "jit_compile", "tfmot")
        if config.get(flag))


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo), or the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _figure(t, key):
    return f"{t[key]:.2f}" if key in t else ""


def goal_lines(results):
    """One line per `GOALS` entry timed in `results`: met or not, and why."""
    lines = []
    for (model_name, variant), goal in GOALS.items():
        t = results.get(model_name, {}).get(variant)
        if t is None:
            continue
        if t["cpu_ratio"] <= goal:
            lines.append(f"- {model_name}, {variant}: {t['cpu_ratio']:.2f}x "
                         f"CPU, goal <= {goal}x: met.")
            continue
        float_cpu = results[model_name]["float"]["cpu"]
        line = (f"- {model_name}, {variant}: {t['cpu_ratio']:.2f}x CPU, goal "
                f"<= {goal}x: **not met**. It allows "
                f"{(goal - 1) * float_cpu:.2f} extra ms/step over float's "
                f"{float_cpu:.2f}; LUT-Q adds {t['extra_cpu']:.2f}")
        if "kmeans" in t:
            line += f", and its k-means step alone costs {t['kmeans']:.2f} ms"
        if "pass" in t:
            line += (f". That step makes two passes over W (assignment and "
                     f"cluster sums, then Q = d[A] with the new dictionary, "
                     f"which needs every sum first); one XLA pass over these "
                     f"weights (read W, write a copy) costs {t['pass']:.2f} "
                     f"ms here, so two cost {2 * t['pass']:.2f} ms before "
                     f"any search or sum")
        lines.append(line + ".")
    return lines


def previous_tfmot(path):
    """`(tfmot figures, their run record)` kept in the results file at
    `path`, or `({}, None)`: a run without `--tfmot` keeps them."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}, None
    tfmot = old.get("tfmot_ms_per_step") or {}
    if not tfmot:
        return {}, None
    # JSON keys are strings: K back to int.
    tfmot = {model: t if isinstance(t, str) else {int(k): v for k, v in t.items()}
             for model, t in tfmot.items()}
    return tfmot, old.get("tfmot_run") or old.get("run")


def markdown(results, config, tfmot=None, tfmot_run=None):
    """The report; `results` maps model -> `summarize` output; `tfmot_run`
    is the run record of `tfmot` when an earlier run measured it."""
    repeats = config["repeats"]
    lines = [
        "# Train-step time: LUT-Q vs float",
        "",
        f"`{_command(config)}` on {config['machine']}, TF {config['tf']}, Keras "
        f"{config['keras']}, batch {config['batch_size']}, "
        f"{config['steps']} steps/epoch, median of {config['epochs']} epochs "
        f"in each of {repeats} process{'es' if repeats > 1 else ''}, "
        f"jit_compile={config['jit_compile']}. Ratio: median over the "
        "processes of each one's LUT-Q / float time.",
        "",
        "| model | variant | wall ms/step | ratio | ratio range | CPU ratio "
        "| CPU ms/step | extra CPU ms/step | k-means step alone, CPU ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model_name, summary in results.items():
        for name, t in summary.items():
            lines.append(
                f"| {model_name} | {name} | {t['wall']:.2f} | "
                f"{t['ratio']:.2f}x | {t['ratio_min']:.2f}-"
                f"{t['ratio_max']:.2f}x | {t['cpu_ratio']:.2f}x | "
                f"{t['cpu']:.2f} | {t['extra_cpu']:.2f} | "
                f"{_figure(t, 'kmeans')} |")
    goals = goal_lines(results)
    if goals:
        lines += ["", "## Goals (CPU ratio)", "", *goals]
    if tfmot:
        lines += [
            "",
            "## tfmot weight clustering on the same models",
            "",
            "tfmot (tf_keras 2, its own process) against tf_keras float "
            "training in that process: same architecture, K, batch and "
            "Adam; synthetic 28x28 data, 32 steps/epoch, median of "
            f"{config['tfmot_epochs'] - 1} epochs after the first"
            + (f" (from `{tfmot_run['command']}` on {tfmot_run['date']})."
               if tfmot_run else "."),
            "",
            "| model | K | LUT-Q / float | tfmot ms/step | tf_keras float "
            "ms/step | tfmot / float |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for model_name, timings in tfmot.items():
            if isinstance(timings, str):
                lines.append(f"| {model_name} | | | {timings} | | |")
                continue
            for k, t in timings.items():
                lutq = results[model_name].get(f"LUT-Q K={k}")
                lutq = f"{lutq['ratio']:.2f}x" if lutq else ""
                lines.append(f"| {model_name} | {k} | {lutq} | "
                             f"{t['tfmot']:.1f} | {t['float']:.1f} | "
                             f"{t['tfmot'] / t['float']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from benchmarks import report

    start = time.perf_counter()
    epochs = 3 if FLAGS.quick else FLAGS.epochs
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    if repeats < 1:
        raise app.UsageError(f"--repeats must be >= 1, got {repeats}.")
    config = {
        "quick": FLAGS.quick, "batch_size": FLAGS.batch_size,
        "steps": FLAGS.steps, "epochs": epochs, "repeats": repeats,
        "jit_compile": FLAGS.jit_compile,
        "machine": f"{os.cpu_count()} cores of {cpu_model()}",
        "tf": tf.__version__, "keras": keras.__version__,
        "tfmot": FLAGS.tfmot, "tfmot_epochs": FLAGS.tfmot_epochs,
    }
    timings, results = {}, {}
    for model_name in FLAGS.models:
        print(f"timing {model_name} ({repeats} processes) ...", flush=True)
        timings[model_name] = measure_repeated(
            model_name, _variants(FLAGS.quick), epochs, FLAGS.steps,
            FLAGS.batch_size, FLAGS.jit_compile, repeats)
        results[model_name] = summarize(timings[model_name])
        for name, t in results[model_name].items():
            print(f"  {name:40s} {t['wall']:7.2f} ms/step {t['ratio']:5.2f}x "
                  f"({t['ratio_min']:.2f}-{t['ratio_max']:.2f}x)  CPU "
                  f"{t['cpu_ratio']:5.2f}x, +{t['extra_cpu']:.2f} ms/step, "
                  f"k-means step {_figure(t, 'kmeans')} ms", flush=True)
    tfmot = {}
    if FLAGS.tfmot:
        for model_name in FLAGS.models:
            print(f"timing tfmot on {model_name} ...", flush=True)
            tfmot[model_name] = measure_tfmot(
                model_name, FLAGS.batch_size, FLAGS.tfmot_epochs,
                TFMOT_K[:2] if FLAGS.quick else TFMOT_K)
            print(f"  {tfmot[model_name]}", flush=True)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    suffix = "_xla" if FLAGS.jit_compile else ""
    path = os.path.join(FLAGS.out_dir, f"train_speed{suffix}.json")
    run = report.run_record(_command(config), time.perf_counter() - start,
                            FLAGS.quick)
    tfmot_run = run
    if not tfmot:
        tfmot, tfmot_run = previous_tfmot(path)
    record.write_text(
        json.dumps({"config": config, "summary": results,
                    "ms_per_step": timings, "tfmot_ms_per_step": tfmot,
                    "tfmot_run": tfmot_run, "run": run}, indent=2), path)
    text = markdown(results, config, tfmot,
                    None if tfmot_run is run else tfmot_run)
    record.write_text(text, os.path.join(FLAGS.out_dir,
                                         f"train_speed{suffix}.md"))
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
