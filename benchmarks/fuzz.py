"""Fuzzes the whole pipeline with random tiny models (`fuzz_models`).

Each seed's case runs: `quantize_model`, compile + a few `fit` steps,
save / load (`.keras`), `strip_model`, and an int8 `tflite_export.export`
with TFLM verification (the exporter checks the compressed file bit-exact
against its uncompressed twin), with checks between the steps. Outcomes:

- "ok": every step ran and every check held;
- "refused": `quantize_model` refused the settings with a clear
  ValueError / TypeError (e.g. K larger than a table);
- "tflm_unsupported": export refused a graph that TFLM or the converter
  cannot run, with a clear `UnsupportedModelError`;
- "error": anything else, a bug.

    python -m benchmarks.fuzz --seeds=200 --start=0

prints the counts by outcome and each non-ok case, and writes them to
`benchmarks/results/fuzz.json` with the command and date.
"""

import collections
import datetime
import functools
import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
OUTCOMES = ("ok", "tflm_unsupported", "refused", "error")
_FIT_STEPS = 3
_BATCH = 8


class CheckFailed(AssertionError):
    """A step ran but its result is wrong (counted as "error")."""


def run_case(seed, workdir, avoid_refusals=None):
    """Runs the case of `seed` through the pipeline.

    `avoid_refusals` (see `fuzz_models.draw`) defaults to True except for
    every 10th seed (9, 19, ...), which draws without overrides so that
    some cases are refused.

    Returns:
        A dict: seed, outcome, stage (where it ended), message, seconds,
        case (its description).
    """
    import keras
    import numpy as np

    from benchmarks import fuzz_models
    import lutq_tf
    import tflite_export

    if avoid_refusals is None:
        avoid_refusals = seed % 10 != 9
    start = time.perf_counter()
    record = {"seed": seed, "outcome": "ok", "stage": "done", "message": "",
              "stage_seconds": {}}
    clock = [start]

    def lap(name):
        now = time.perf_counter()
        record["stage_seconds"][stage] = round(now - clock[0], 2)
        clock[0] = now
        return name

    stage = "draw"
    try:
        case = fuzz_models.draw(seed, avoid_refusals=avoid_refusals)
        record["case"] = case.describe()
        stage = lap("quantize")
        try:
            q = lutq_tf.quantize_model(case.model, **case.options)
        except (ValueError, TypeError) as error:
            record.update(outcome="refused", stage=stage, message=str(error))
            return record
        stage = lap("fit")
        q.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  jit_compile=case.jit_compile)
        q.fit(case.x[:_FIT_STEPS * _BATCH], case.y[:_FIT_STEPS * _BATCH],
              batch_size=_BATCH, epochs=1, verbose=0, shuffle=False)
        expected = q.predict(case.x, verbose=0)
        _check(np.all(np.isfinite(expected)), "non-finite predictions")

        stage = lap("save/load")
        path = os.path.join(workdir, f"fuzz_{seed}.keras")
        q.save(path)
        loaded = keras.models.load_model(path)
        _check_same(loaded.predict(case.x, verbose=0), expected,
                    "the loaded model predicts differently", exact=True)

        stage = lap("strip")
        stripped = lutq_tf.strip_model(loaded)
        _check_same(stripped.predict(case.x, verbose=0), expected,
                    "the stripped model predicts differently")
        _check_tables(q, stripped)

        stage = lap("export")
        try:
            result = tflite_export.export(
                stripped, os.path.join(workdir, f"fuzz_{seed}.tflite"),
                representative_data=case.x)
        except tflite_export.UnsupportedModelError as error:
            record.update(outcome="tflm_unsupported", stage=stage,
                          message=str(error))
            return record
        _check(result.verification is not None
               and result.verification.bit_exact,
               "TFLM outputs not bit-exact with the uncompressed twin")
        _check(os.path.getsize(result.path) == result.size_bytes,
               "file size differs from the report")
        lap("done")
    except Exception as error:  # noqa: BLE001 (a fuzzer records everything)
        record.update(outcome="error", stage=stage,
                      message=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=8))
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _check(condition, message):
    if not condition:
        raise CheckFailed(message)


def _check_same(got, expected, message, exact=False):
    import numpy as np

    if exact:
        ok = np.array_equal(got, expected)
    else:
        # strip_model promises the same predictions; its graph has no
        # custom gradient or d[A] lookup, so allow float round-off.
        ok = np.allclose(got, expected, rtol=1e-5, atol=1e-5)
    if not ok:
        raise CheckFailed(
            f"{message}: max |diff| {np.abs(got - expected).max():.3g}")


def _check_tables(quantized, stripped):
    """Each stripped LUT kernel holds at most K values per table."""
    import numpy as np

    import lutq_tf

    for row in lutq_tf.summary(quantized, print_fn=None):
        wrapper = quantized.get_layer(row.layer)
        for state in wrapper.tensor_states:
            spec = state.spec
            if spec.attribute != row.tensor:
                continue
            w = np.asarray(getattr(stripped.get_layer(row.layer),
                                   spec.attribute).numpy())
            axes = [w.ndim + a for a in spec.channel_axes]
            others = [a for a in range(w.ndim) if a not in axes]
            tables = np.transpose(w, others + axes).reshape(
                -1, int(np.prod([w.shape[a] for a in axes])))
            if not wrapper.quantizer.per_channel:
                if wrapper.quantizer.channel_scales:
                    continue  # one table up to a per-channel scale
                tables = tables.reshape(-1, 1)
            most = max(len(np.unique(tables[:, c]))
                       for c in range(tables.shape[1]))
            _check(most <= row.num_values,
                   f"'{row.layer}' {row.tensor}: {most} values in a table, "
                   f"K={row.num_values}")


def run(seeds, workdir=None, report=functools.partial(print, flush=True),
        deadline=None):
    """Runs `seeds`, until `deadline` (a `time.time()`); returns records."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            if deadline is not None and time.time() > deadline:
                report(f"time budget spent: stopped before seed {seed}")
                break
            record = run_case(seed, workdir or tmp)
            records.append(record)
            report(f"{record['outcome']:17s} {record['seconds']:6.1f} s  "
                   f"{record.get('case', seed)}")
            if record["outcome"] != "ok":
                report(f"    at {record['stage']}: {record['message'][:300]}")
    return records


def counts(records):
    tally = collections.Counter(r["outcome"] for r in records)
    return {outcome: tally.get(outcome, 0) for outcome in OUTCOMES}


def define_flags():
    flags.DEFINE_integer("seeds", 100, "Number of seeds to run.")
    flags.DEFINE_integer("start", 0, "First seed.")
    flags.DEFINE_float("max_minutes", None,
                       "Stop starting new seeds after this many minutes.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "fuzz.json"),
                        "JSON file for the counts and the non-ok cases.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    begin = time.time()
    deadline = (begin + 60 * FLAGS.max_minutes if FLAGS.max_minutes
                else None)
    records = run(range(FLAGS.start, FLAGS.start + FLAGS.seeds),
                  deadline=deadline)
    tally = counts(records)
    print("counts:", tally)
    result = {
        "run": {
            "command": "python -m benchmarks.fuzz " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(time.time() - begin, 1),
        },
        "seeds": [FLAGS.start, FLAGS.start + len(records)],  # [first, end)
        "counts": tally,
        "not_ok": [r for r in records if r["outcome"] != "ok"],
        "seconds": {str(r["seed"]): r["seconds"] for r in records},
    }
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
