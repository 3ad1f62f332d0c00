"""Where the k-means step's time goes, on the MLP's weights.

The LUT-Q train step's extra cost over float is its k-means step
(`benchmarks/train_speed.md`). This times that step's parts, each compiled
with XLA on its own, on the three kernels of the MLP 784-512-512-10 (one
dictionary per tensor, 670k weights), beside two floors and the
formulations tried instead:

- the step as trained (`kmeans.kmeans_step`, fused) and its parts:
  assignment (`nearest_assignment`), cluster sums (`cluster_sums`) and
  Q = d[A] (`lookup`);
- floors: one pass over the weights that reads W and writes a copy, and
  one that reads W into a sum. The step needs two passes: Q = d[A] uses the
  new dictionary, which needs every cluster sum first;
- alternatives: cluster sums as K masked reductions (no scatter), and Q as
  a chain of selects on the old midpoints (no gather).

Each part is one XLA function over the three kernels, called once per
step as the train step calls the k-means step (one call per kernel would
add each call's dispatch, ~0.2 ms, three times). A function that reads one
weight per kernel gives the dispatch floor. Process CPU ms per step,
median of `--repeats` interleaved rounds of `--calls` calls each.

    python -m benchmarks.kmeans_profile     # ~2 min

Writes benchmarks/results/kmeans_profile.{json,md}.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import record  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import train_speed  # noqa: E402
from lutq_tf import constraints  # noqa: E402
from lutq_tf import kmeans  # noqa: E402

FLAGS = flags.FLAGS
SHAPES = ((784, 512), (512, 512), (512, 10))
KS = (16, 256)


def define_flags():
    flags.DEFINE_integer("calls", 100, "Calls per round.")
    flags.DEFINE_integer("repeats", 5, "Interleaved rounds.")
    flags.DEFINE_string(
        "out_dir", os.path.join(os.path.dirname(__file__), "results"),
        "Output directory.")


def masked_sums(x, assignment, num_values):
    """Cluster sums and counts as K masked reductions: `[K, 1]` each."""
    values = tf.reshape(x, [1, -1])
    member = tf.equal(tf.reshape(assignment, [1, -1]),
                      tf.range(num_values)[:, None])
    sums = tf.reduce_sum(tf.where(member, values, 0.0), axis=1)
    counts = tf.reduce_sum(tf.cast(member, tf.float32), axis=1)
    return sums[:, None], counts[:, None]


def select_lookup(x, old, new):
    """Q = new[A] by selects on `old`'s midpoints (A never read)."""
    midpoints = kmeans.materialize(0.5 * (old[1:, 0] + old[:-1, 0]))
    entries = kmeans.materialize(new[:, 0])
    q = tf.fill(tf.shape(x), entries[0])
    for j in range(midpoints.shape[0]):
        q = tf.where(x > midpoints[j], entries[j + 1], q)
    return q


def functions(num_values):
    """`{name: (function, inputs)}` of what is timed, per K."""
    free = constraints.get("none")
    full = ("the k-means step as trained",
            lambda x, d, a: kmeans.kmeans_step(x, d, free, 0))
    parts = {
        "step": full,
        "assignment": ("assignment (nearest entry)",
                       lambda x, d, a: kmeans.nearest_assignment(x, d)),
        "sums": ("cluster sums (scatter-add)",
                 lambda x, d, a: kmeans.cluster_sums(x, a, num_values)),
        "lookup": ("Q = d[A] (gather)", lambda x, d, a: kmeans.lookup(d, a)),
        "dispatch": ("floor: the call alone (reads one weight)",
                     lambda x, d, a: x[0, 0] + 1.0),
        "pass": ("floor: read W, write a copy", lambda x, d, a: 1.5 * x),
        "reduce": ("floor: read W into a sum",
                   lambda x, d, a: tf.reduce_sum(x)),
        "masked_sums": ("tried: cluster sums as K masked reductions",
                        lambda x, d, a: masked_sums(x, a, num_values)),
    }
    if num_values <= 16:
        parts["select_lookup"] = ("tried: Q by selects on the midpoints",
                                  lambda x, d, a: select_lookup(x, d, d))
    # One function over every kernel, as one train step calls it.
    return {key: (label, tf.function(
        lambda inputs, f=f: [f(*i) for i in inputs], jit_compile=True))
        for key, (label, f) in parts.items()}


def measure(num_values, calls, repeats):
    """`{key: (label, median CPU ms per step over the three kernels)}`."""
    rng = np.random.default_rng(0)
    inputs = []
    for rows, cols in SHAPES:
        x = tf.constant(rng.normal(0, 0.05, (rows * cols, 1)), tf.float32)
        d = tf.sort(tf.constant(rng.normal(0, 0.05, (num_values, 1)),
                                tf.float32), axis=0)
        inputs.append((x, d, kmeans.nearest_assignment(x, d)))
    timed = functions(num_values)
    rounds = {key: [] for key in timed}
    for _ in range(repeats):
        for key, (_, f) in timed.items():
            rounds[key].append(train_speed.cpu_ms_per_call(
                lambda f=f: f(inputs), calls))
    return {key: (label, float(np.median(rounds[key])))
            for key, (label, _) in timed.items()}


def markdown(results, config):
    lines = [
        "# The k-means step's parts (MLP 784-512-512-10, per tensor)",
        "",
        f"`{config['command']}` on {config['machine']}, TF {config['tf']}: "
        "process CPU ms per step over the three kernels (670k weights), "
        "each part one XLA call over the three; median of "
        f"{config['repeats']} interleaved rounds of {config['calls']} calls.",
        "",
        "| what | " + " | ".join(f"K={k}" for k in results) + " |",
        "| --- |" + " ---: |" * len(results),
    ]
    keys = list(next(iter(results.values())))
    for key in keys:
        label = next(r[key][0] for r in results.values() if key in r)
        cells = [f"{r[key][1]:.2f}" if key in r else "" for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    start = time.perf_counter()
    command = "python -m benchmarks.kmeans_profile"
    config = {"command": command, "calls": FLAGS.calls,
              "repeats": FLAGS.repeats, "tf": tf.__version__,
              "machine": f"{os.cpu_count()} cores of {train_speed.cpu_model()}"}
    results = {}
    for k in KS:
        results[k] = measure(k, FLAGS.calls, FLAGS.repeats)
        for key, (label, ms) in results[k].items():
            print(f"K={k:4d} {label:45s} {ms:6.2f} ms", flush=True)
    run = report.run_record(command, time.perf_counter() - start, False)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    record.write_text(
        json.dumps({"config": config, "ms": {str(k): {key: ms for key, (_, ms)
                                                      in r.items()}
                                             for k, r in results.items()},
                    "run": run}, indent=2),
        os.path.join(FLAGS.out_dir, "kmeans_profile.json"))
    text = markdown(results, config)
    record.write_text(text, os.path.join(FLAGS.out_dir, "kmeans_profile.md"))
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
