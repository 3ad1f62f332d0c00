"""Fuzzes the whole pipeline with random tiny models (`fuzz_models`).

Each seed's case runs: `quantize_model`, compile + a few `fit` steps,
save / load (`.keras`), `strip_model`, and an int8 `tflite_export.export`
with TFLM verification (the exporter checks the compressed file bit-exact
against its uncompressed twin), with checks between the steps. Then the
newer features, each a stage of its own (`STAGES`; `--stages` picks them):

- "decode": an export under a random `max_decode_bytes`: the file is
  verified bit-exact, its arena re-measured equals the reported one, no
  decoded kernel exceeds the limit, and every split pays (a compressed
  group, savings above the extra ops' bytes); a limit below one output
  channel must be refused naming the least limit, which must then export;
- "callbacks": a fit under a random schedule (`KMeansWarmup`,
  `FreezeDictionaries`, `PruningRamp` when the case prunes), sometimes
  with a callback raising mid-fit and a user pause set before it: the
  error reaches the caller, the schedule's pauses end with the fit, and a
  following plain fit moves a dictionary or an assignment (none while a
  user pause holds, until it is resumed);
- "plan": `plan_budget`'s choices for the float model, a random budget
  between the smallest file and the int8 one (one below the smallest must
  be refused naming it); the plan survives `save` / `Plan.load`, and
  quantising with it and exporting with its `export_options()` gives
  file <= estimate <= budget, verified bit-exact.

Outcomes:

- "ok": every step ran and every check held;
- "refused": `quantize_model` refused the settings with a clear
  ValueError / TypeError (e.g. K larger than a table);
- "tflm_unsupported": export refused a graph that TFLM or the converter
  cannot run, with a clear `UnsupportedModelError`;
- "error": anything else, a bug.

A stage after the pipeline that is refused (or finds a graph TFLM cannot
run) does not stop the others: each stage's outcome is in the record's
`stages`, and the case's is its first "error", else its first non-ok.

    python -m benchmarks.fuzz --seeds=200 --start=0 [--stages=decode,plan]

prints the counts by outcome and each non-ok case, and writes them to
`benchmarks/results/fuzz.json` with the command and date, after every case
(`run.finished` is false until the end).

The cases run in child processes, each a fresh interpreter (`spawn`)
that runs at most `--cases_per_process` cases (default 20) and exits: a
process accumulates the XLA code of every case's k-means steps, about
1,200 memory maps a case, so past ~50 cases it would reach the kernel's
`vm.max_map_count` (65,530) and LLVM would abort it ("Cannot allocate
memory"). The parent hands a child one seed at a time and takes back its
record, so any number of seeds runs in one command. A child that dies
(killed, an LLVM abort, a segfault) loses no more than its case: that
case is recorded as an "error" at stage "worker", with the exit status or
signal and the last lines of the child's stderr, and the next seed runs
in a fresh child. `--cases_per_process=0` runs every case in this process
instead (for a debugger; a long sweep then dies as described).
"""

import collections
import datetime
import faulthandler
import functools
import json
import multiprocessing
import os
import re
import signal
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
# The stages after the pipeline, in the order they run ("skipped": nothing
# to test, e.g. no compressed kernel to split).
STAGES = ("decode", "callbacks", "plan")
STAGE_OUTCOMES = OUTCOMES + ("skipped",)
FIT_STEPS = 3
_BATCH = 8
# Cases a child process runs before a fresh one takes over (see the module
# doc: ~1,200 memory maps a case, 65,530 allowed).
CASES_PER_PROCESS = 20
# The lines of a dead child's stderr kept in its record.
STDERR_LINES = 40


class CheckFailed(AssertionError):
    """A step ran but its result is wrong (counted as "error")."""


def run_case(seed, workdir, avoid_refusals=None, stages=STAGES):
    """Runs the case of `seed` through the pipeline, then `stages`.

    `avoid_refusals` (see `fuzz_models.draw`) defaults to True except for
    every 10th seed (9, 19, ...), which draws without overrides so that
    some cases are refused. `stages`: names from `STAGES`, run in that
    order after the pipeline (if it ends "ok").

    Returns:
        A dict: seed, outcome, stage (where it ended), message, seconds,
        case (its description), stages (`{stage: {outcome, message,
        seconds, ...}}` of `stages`).
    """
    import keras
    import numpy as np

    from benchmarks import fuzz_models
    import lutq_tf
    import tflite_export

    if avoid_refusals is None:
        avoid_refusals = seed % 10 != 9
    start = time.perf_counter()
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}: known {STAGES}")
    record = {"seed": seed, "outcome": "ok", "stage": "done", "message": "",
              "stage_seconds": {}, "stages": {}}
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
        q.fit(case.x[:FIT_STEPS * _BATCH], case.y[:FIT_STEPS * _BATCH],
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
        record["pipeline_outcome"] = "ok"
        context = {"case": case, "quantized": q, "stripped": stripped,
                   "result": result, "workdir": workdir}
        for name in STAGES:
            if name in stages:
                stage = name
                record["stages"][name] = _run_stage(name, seed, context)
        _summarise(record)
    except Exception as error:  # noqa: BLE001 (a fuzzer records everything)
        record.update(outcome="error", stage=stage,
                      message=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=8))
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)
        # The outcome of the pipeline before the stages (the case's may be
        # a stage's).
        record.setdefault("pipeline_outcome", record["outcome"])
    return record


def _run_stage(name, seed, context):
    """Runs stage `name`; returns its record (outcome, message, seconds...)."""
    import numpy as np

    import tflite_export

    # Each stage draws from its own stream: adding one leaves the others'.
    rng = np.random.default_rng([seed, STAGES.index(name)])
    entry = {"outcome": "ok", "message": ""}
    start = time.perf_counter()
    try:
        _STAGE_FUNCTIONS[name](rng, context, entry)
    except _Refused as refusal:
        entry.update(outcome="refused", message=str(refusal))
    except tflite_export.UnsupportedModelError as error:
        entry.update(outcome="tflm_unsupported", message=str(error))
    except Exception as error:  # noqa: BLE001 (a fuzzer records everything)
        entry.update(outcome="error", message=f"{type(error).__name__}: {error}",
                     traceback=traceback.format_exc(limit=8))
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _summarise(record):
    """The case's outcome from its stages': the first error, else non-ok."""
    for wanted in ("error", "refused", "tflm_unsupported"):
        for name, entry in record["stages"].items():
            if entry["outcome"] == wanted:
                record.update(outcome=wanted, stage=name,
                              message=entry["message"])
                if "traceback" in entry:
                    record["traceback"] = entry["traceback"]
                return


class _Refused(Exception):
    """A stage's input was refused with a clear error (not a bug)."""


def _stage_decode(rng, context, entry):
    """An export under a random `max_decode_bytes` (see the module doc)."""
    import numpy as np

    import tflite_export
    from tflite_export.pipeline import arena
    from tflite_export.ram import ram_budget

    largest = context["result"].decode_buffer_bytes
    if not largest:
        entry.update(outcome="skipped", message="no compressed kernel")
        return
    # Log-uniform from an eighth of the largest decoded kernel to all of it
    # (nothing to split): below one output channel is refused, some kernels
    # split, some stay int8.
    limit = int(np.exp(rng.uniform(np.log(max(largest // 8, 1)),
                                   np.log(largest) + 0.05)))
    entry["max_decode_bytes"] = limit
    case, stripped = context["case"], context["stripped"]
    path = os.path.join(context["workdir"], f"fuzz_{case.seed}_decode.tflite")

    def export(limit):
        return tflite_export.export(stripped, path, representative_data=case.x,
                                    max_decode_bytes=limit)

    refusal = None
    try:
        result = export(limit)
    except ValueError as error:
        message = str(error)
        least = re.search(r"give max_decode_bytes >= (\d+)", message)
        _check(least is not None and "below what one output channel" in message,
               f"max_decode_bytes={limit} refused unclearly: {message}")
        _check(not os.path.exists(path), "a refused export wrote its file")
        # The least limit the refusal names must export.
        refusal, limit = message, int(least.group(1))
        entry["least_max_decode_bytes"] = limit
        result = export(limit)
    _check(result.verification is not None and result.verification.bit_exact,
           f"max_decode_bytes={limit}: TFLM outputs not bit-exact with the "
           "split uncompressed twin")
    ram = result.ram
    with open(path, "rb") as f:
        written = f.read()
    _check(len(written) == result.size_bytes == ram.size_bytes,
           f"file {len(written)} B, reported {result.size_bytes} / {ram.size_bytes} B")
    measured = arena.find_arena_size(written, 1, "fuzzed split model")
    _check(measured == result.arena_bytes == ram.arena_bytes,
           f"arena re-measured {measured} B, reported {result.arena_bytes} / "
           f"{ram.arena_bytes} B")
    _check(result.decode_buffer_bytes <= limit,
           f"decode buffer {result.decode_buffer_bytes} B > max_decode_bytes={limit}")
    entry["choices"] = dict(collections.Counter(c.choice for c in ram.choices))
    for choice in ram.choices:
        parts = [t for t in result.tensors
                 if t.layer.startswith(f"{choice.layer}_part")]
        where = f"max_decode_bytes={limit}: '{choice.layer}' ({choice.choice})"
        if choice.choice == "compress":
            _check(choice.decoded_bytes <= limit and choice.groups == 1
                   and not parts, f"{where}: {choice}")
        elif choice.choice == "int8":
            _check(choice.decoded_bytes > limit and not parts and not any(
                t.compressed for t in result.tensors if t.layer == choice.layer),
                f"{where}: {choice}")
        else:
            _check(choice.choice == "split" and choice.decoded_bytes > limit
                   and choice.groups >= 2 and choice.group_bytes <= limit,
                   f"{where}: {choice}")
            names = {t.layer for t in parts}
            _check(len(names) == choice.groups,
                   f"{where}: {choice.groups} groups, {len(names)} in the file")
            # A split is made only if it pays: its compressed groups save
            # more than the extra ops cost.
            saved = sum(t.bytes_before - t.bytes_after for t in parts if t.compressed)
            cost = ram_budget.GROUP_FILE_BYTES * (choice.groups - 1)
            _check(saved > cost, f"{where}: the split saves {saved} B, its "
                                 f"{choice.groups - 1} extra groups cost ~{cost} B")
    if refusal is not None:
        raise _Refused(refusal)


class _FuzzError(RuntimeError):
    """What the callbacks stage's raising callback raises."""


def _raising_callback(epoch, batch, when):
    """A callback raising `_FuzzError` at batch `batch` of epoch `epoch`."""
    import keras

    class Raise(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.epoch = e

        def _maybe(self, b, moment):
            if (self.epoch, b, moment) == (epoch, batch, when):
                raise _FuzzError(f"raised at epoch {epoch} batch {batch} {when}")

        def on_train_batch_begin(self, b, logs=None):
            self._maybe(b, "begin")

        def on_train_batch_end(self, b, logs=None):
            self._maybe(b, "end")

    return Raise()


def _kmeans_state(layers):
    """`{(layer, tensor): (d, A)}` copies."""
    return {(layer.name, name): (d.copy(), a.copy())
            for layer in layers
            for name, (d, a, _) in layer.quantized_tensors.items()}


def _plain_fit_moves(model, layers, x, y):
    """Fits `FIT_STEPS` steps; True if any dictionary or assignment moved."""
    import numpy as np

    before = _kmeans_state(layers)
    model.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0, shuffle=False)
    after = _kmeans_state(layers)
    return any(not np.array_equal(u, v)
               for key in before for u, v in zip(before[key], after[key]))


def draw_schedule(rng, prunes):
    """The callbacks stage's draw: a dict of its schedule's settings.

    epochs (1-2 of `FIT_STEPS` steps); warmup (`KMeansWarmup` steps, or
    0); freeze (`FreezeDictionaries` epochs, or 0); ramp (`PruningRamp`
    (steps, frequency) if `prunes`, or None); raise_at ((epoch, batch,
    "begin" or "end") of the batch whose callback raises, or None);
    user_pause (a pause set before the fit).
    """
    epochs = int(rng.integers(1, 3))
    warmup = (int(rng.integers(1, FIT_STEPS * epochs + 2))
              if rng.random() < 0.6 else 0)
    freeze = int(rng.integers(1, epochs + 1)) if rng.random() < 0.5 else 0
    ramp = ((int(rng.integers(1, 8)), int(rng.integers(1, 4)))
            if prunes and rng.random() < 0.7 else None)
    raise_at = ((int(rng.integers(0, epochs)), int(rng.integers(0, FIT_STEPS)),
                 str(rng.choice(["begin", "end"])))
                if rng.random() < 0.5 else None)
    return {"epochs": epochs, "warmup": warmup, "freeze": freeze, "ramp": ramp,
            "raise_at": raise_at, "user_pause": bool(rng.random() < 0.25)}


def describe_schedule(draw):
    """`draw_schedule`'s draw as a list of words."""
    words = ["user pause"] if draw["user_pause"] else []
    if draw["warmup"]:
        words.append(f"KMeansWarmup({draw['warmup']})")
    if draw["freeze"]:
        words.append(f"FreezeDictionaries({draw['freeze']})")
    if draw["ramp"]:
        words.append("PruningRamp({}, frequency={})".format(*draw["ramp"]))
    if draw["raise_at"]:
        words.append("raise at epoch {} batch {} {}".format(*draw["raise_at"]))
    return words + [f"epochs={draw['epochs']}"]


def _stage_callbacks(rng, context, entry):
    """A fit under a random schedule, maybe raising (see the module doc)."""
    import lutq_tf
    from lutq_tf import callbacks

    case, model = context["case"], context["quantized"]
    layers = lutq_tf.lutq_layers(model)
    if not layers:
        entry.update(outcome="skipped", message="no LUT-Q layer")
        return
    draw = draw_schedule(
        rng, prunes=any(layer.quantizer.prune_rate > 0 for layer in layers))
    epochs, raise_at, user = draw["epochs"], draw["raise_at"], draw["user_pause"]
    schedule = []
    if draw["warmup"]:
        schedule.append(callbacks.KMeansWarmup(draw["warmup"]))
    if draw["freeze"]:
        schedule.append(callbacks.FreezeDictionaries(draw["freeze"]))
    if draw["ramp"]:
        steps, frequency = draw["ramp"]
        schedule.append(callbacks.PruningRamp(steps, frequency=frequency))
    if raise_at:
        schedule.append(_raising_callback(*raise_at))
    entry["schedule"] = describe_schedule(draw)
    x, y = case.x[:FIT_STEPS * _BATCH], case.y[:FIT_STEPS * _BATCH]
    if user:
        for layer in layers:
            layer.pause_kmeans("fuzz user")
    raised = None
    try:
        model.fit(x, y, batch_size=_BATCH, epochs=epochs, verbose=0,
                  shuffle=False, callbacks=schedule)
    except _FuzzError as error:
        raised = error
    _check((raised is None) == (raise_at is None),
           f"{entry['schedule']}: fit raised {raised!r}")
    how = "raised" if raised else "returned"
    expected = {"fuzz user"} if user else set()
    for layer in layers:
        _check(set(layer.kmeans_pauses) == expected,
               f"{entry['schedule']}: after the fit {how}, '{layer.name}' is "
               f"paused by {set(layer.kmeans_pauses)}, expected {expected}")
    if user:
        _check(not _plain_fit_moves(model, layers, x, y),
               f"{entry['schedule']}: k-means steps ran while a user pause held")
        for layer in layers:
            layer.resume_kmeans("fuzz user")
    _check(_plain_fit_moves(model, layers, x, y),
           f"{entry['schedule']}: after the fit {how}, a plain fit of "
           f"{FIT_STEPS} steps moved no dictionary or assignment")


def draw_plan_options(rng):
    """`plan_budget`'s `bits` and `modes`: its defaults, or random subsets.

    Beyond the defaults (1-4 bits, per tensor and per channel), 5-7 bits
    and channel-scaled dictionaries are estimated on the safe side: the
    file must still be at most the estimate.
    """
    import numpy as np

    from tflite_export.planning import plan_costs
    from tflite_export.planning import planner

    if rng.random() < 0.4:
        return {"bits": list(planner.DEFAULT_BITS),
                "modes": list(planner.DEFAULT_MODES)}
    bits = rng.choice(np.arange(1, plan_costs.MAX_BITS + 1),
                      size=int(rng.integers(1, 4)), replace=False)
    modes = set(rng.choice(plan_costs.MODES, size=int(rng.integers(1, 4)),
                           replace=False))
    return {"bits": sorted(int(b) for b in bits),
            "modes": [m for m in plan_costs.MODES if m in modes]}


def _stage_plan(rng, context, entry):
    """A plan for a random budget, applied (see the module doc)."""
    import keras

    import lutq_tf
    import tflite_export
    from tflite_export.planning import planner

    case, workdir = context["case"], context["workdir"]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    options = draw_plan_options(rng)
    entry.update(options)
    # What `plan_budget` does, measured once for several budgets; two
    # batches for the Fisher estimate (of random data) keep it quick.
    try:
        offers = planner.choices(case.model, case.x, labels=case.y, loss=loss,
                                 max_batches=2, **options)
    except (ValueError, TypeError) as error:
        raise _Refused(f"plan_budget: {error}") from error
    low, high = offers.min_bytes, offers.byte_model.int8_bytes
    budget = int(rng.integers(low, high + 1))
    entry.update(budget_bytes=budget, min_bytes=low, int8_bytes=high)
    try:
        offers.plan(low - 1)
    except ValueError as error:
        _check(f"{low:,} bytes" in str(error),
               f"a budget below the smallest file, refused without naming "
               f"{low:,}: {error}")
    else:
        raise CheckFailed(f"budget {low - 1} B below the smallest file {low} B "
                          "was planned")
    plan = offers.plan(budget)
    _check((plan.budget_bytes, plan.min_bytes, plan.int8_bytes)
           == (budget, low, high), f"plan for {budget} B: {plan.table()}")
    _check(plan.estimate_bytes <= budget,
           f"estimate {plan.estimate_bytes} B > budget {budget} B")
    path = os.path.join(workdir, f"fuzz_{case.seed}_plan.json")
    plan.save(path)
    _check(tflite_export.Plan.load(path) == plan,
           "the plan loaded from its file differs from the saved one")
    entry["compressed_layers"] = sum(r.mode != "int8" for r in plan.layers)
    quantized = lutq_tf.quantize_model(case.model, **plan)
    result = tflite_export.export(
        quantized, os.path.join(workdir, f"fuzz_{case.seed}_plan.tflite"),
        representative_data=case.x, **plan.export_options())
    _check(result.verification is not None and result.verification.bit_exact,
           "planned export: TFLM outputs not bit-exact with the uncompressed twin")
    size = os.path.getsize(result.path)
    entry.update(estimate_bytes=plan.estimate_bytes, file_bytes=size)
    _check(size <= plan.estimate_bytes <= plan.budget_bytes,
           f"file {size} B, estimate {plan.estimate_bytes} B, budget "
           f"{plan.budget_bytes} B")


_STAGE_FUNCTIONS = {"decode": _stage_decode, "callbacks": _stage_callbacks,
                    "plan": _stage_plan}


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
        deadline=None, stages=STAGES, each=None,
        cases_per_process=CASES_PER_PROCESS, case=None):
    """Runs `seeds` (with `stages`), until `deadline` (a `time.time()`).

    Each case runs in a child process that runs at most `cases_per_process`
    cases (0: every case in this process); a child that dies gives its case
    an "error" record (stage "worker") and the next seed a fresh child.
    `each(records)` is called after every case (e.g. to write them).
    `case(seed, workdir, stages=...)` runs a case, `run_case` by default
    (another must be picklable by reference: a module-level function).

    Returns:
        The records (`run_case`), in seed order.
    """
    case = case or run_case
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        if cases_per_process > 0:
            runner = _Workers(workdir or tmp, stages, cases_per_process, case,
                              logdir=tmp)
        else:
            runner = functools.partial(_run_here, case, workdir or tmp, stages)
        try:
            for seed in seeds:
                if deadline is not None and time.time() > deadline:
                    report(f"time budget spent: stopped before seed {seed}")
                    break
                record = runner(seed)
                records.append(record)
                _report(record, report)
                if each is not None:
                    each(records)
        finally:
            if isinstance(runner, _Workers):
                runner.close()
    return records


def _run_here(case, workdir, stages, seed):
    return case(seed, workdir, stages=stages)


def _report(record, report):
    report(f"{record['outcome']:17s} {record['seconds']:6.1f} s  "
           f"{record.get('case', record['seed'])}")
    for name, entry in record.get("stages", {}).items():
        report(f"    {name}: {entry['outcome']} ({entry['seconds']} s)"
               + (f": {entry['message'][:200]}" if entry["message"] else ""))
    if record["outcome"] != "ok":
        report(f"    at {record['stage']}: {record['message'][:300]}")
        for line in record.get("stderr", [])[-5:]:
            report(f"    | {line[:200]}")


def _worker(conn, workdir, stages, case, stderr_path):
    """A child's loop: runs the seeds it receives until it receives None."""
    # The child's stderr (Python's and native code's, e.g. an LLVM abort)
    # goes to a file the parent reads if the child dies.
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()  # a segfault's or abort's Python stack
    logging.set_verbosity(logging.WARNING)
    while True:
        seed = conn.recv()
        if seed is None:
            break
        conn.send(case(seed, workdir, stages=stages))
    conn.close()


class _Workers:
    """Child processes running one case at a time, each at most `per_process`.

    Called with a seed, returns its record: the child's, or an "error" if
    the child died running it.
    """

    def __init__(self, workdir, stages, per_process, case, logdir):
        self._context = multiprocessing.get_context("spawn")
        self._args = (workdir, tuple(stages), case)
        self._per_process = per_process
        self._logdir = logdir
        self._process = self._conn = self._stderr = None
        self._done = self._started = 0

    def _start(self):
        self._started += 1
        self._stderr = os.path.join(self._logdir,
                                    f"worker_{self._started}.stderr")
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_worker, args=(child, *self._args, self._stderr),
            daemon=True, name=f"fuzz-worker-{self._started}")
        self._process.start()
        child.close()  # so that recv() sees the child's death as EOF
        self._conn, self._done = parent, 0

    def __call__(self, seed):
        if self._process is None:
            self._start()
        start = time.perf_counter()
        try:
            self._conn.send(seed)
            record = self._conn.recv()
        except (EOFError, OSError):
            return self._died(seed, time.perf_counter() - start)
        self._done += 1
        if self._done >= self._per_process:
            self.close()
        return record

    def _died(self, seed, seconds):
        process = self._process
        process.join(timeout=30)
        if process.is_alive():  # the pipe broke but the child lives on
            process.kill()
            process.join()
        code = process.exitcode
        if code is not None and code < 0:
            try:
                status = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                status = f"killed by signal {-code}"
        else:
            status = f"exit status {code}"
        try:
            with open(self._stderr, errors="replace") as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError:
            lines = []
        # faulthandler's "Fatal Python error: ..." and the stacks it dumps
        # after it: kept apart, so that the tail shows what came before
        # (e.g. "LLVM ERROR: ...").
        fatal = next((i for i, line in enumerate(lines)
                      if line.startswith("Fatal Python error")), len(lines))
        tail, stack = lines[:fatal + 1][-STDERR_LINES:], lines[fatal + 1:]
        self._conn.close()
        self._process = self._conn = None
        message = (f"the worker process running seed {seed} died ({status}) "
                   f"after {self._done} case(s) of its own")
        telling = [line for line in lines[:fatal]
                   if re.search(r"error|abort|memory|killed", line, re.I)]
        if telling or tail:
            message += f"; its stderr: {(telling or tail)[-1].strip()}"
        extra = {"stack": stack[:STDERR_LINES]} if stack else {}
        return {"seed": seed, "outcome": "error", "stage": "worker",
                "message": message, "exit_status": status, "stderr": tail,
                **extra, "stage_seconds": {}, "stages": {},
                "pipeline_outcome": "error", "seconds": round(seconds, 2)}

    def close(self):
        """Ends the current child (after its case), if any."""
        if self._process is None:
            return
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(timeout=120)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._process = self._conn = None


def counts(records):
    tally = collections.Counter(r["outcome"] for r in records)
    return {outcome: tally.get(outcome, 0) for outcome in OUTCOMES}


def stage_counts(records):
    """`{stage: {outcome: count}}` over the records that ran each stage."""
    tally = collections.defaultdict(collections.Counter)
    for record in records:
        for name, entry in record.get("stages", {}).items():
            tally[name][entry["outcome"]] += 1
    return {name: {outcome: tally[name].get(outcome, 0)
                   for outcome in STAGE_OUTCOMES}
            for name in STAGES if name in tally}


def define_flags():
    flags.DEFINE_integer("seeds", 100, "Number of seeds to run.")
    flags.DEFINE_integer("start", 0, "First seed.")
    flags.DEFINE_float("max_minutes", None,
                       "Stop starting new seeds after this many minutes.")
    flags.DEFINE_list("stages", list(STAGES),
                      "Stages to run after the pipeline, from " + ", ".join(STAGES)
                      + " (empty: the pipeline only).")
    flags.DEFINE_integer("cases_per_process", CASES_PER_PROCESS,
                         "Cases each child process runs before a fresh one "
                         "takes over (0: every case in this process, which "
                         "past ~50 cases runs out of memory maps).")
    flags.DEFINE_string("out", os.path.join(RESULTS, "fuzz.json"),
                        "JSON file for the counts and the non-ok cases.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    begin = time.time()
    deadline = (begin + 60 * FLAGS.max_minutes if FLAGS.max_minutes
                else None)
    command = "python -m benchmarks.fuzz " + " ".join(sys.argv[1:])

    def write(records, done=False):
        result = {
            "run": {
                "command": command,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "wall_s": round(time.time() - begin, 1),
                # False while running: the process stopped (or died) early.
                "finished": done,
            },
            "seeds": [FLAGS.start, FLAGS.start + len(records)],  # [first, end)
            "counts": counts(records),
            "stage_counts": stage_counts(records),
            "not_ok": [r for r in records if r["outcome"] != "ok"],
            # What each stage drew and found, for every case that ran it.
            "stages": {str(r["seed"]): r["stages"] for r in records if r["stages"]},
            "seconds": {str(r["seed"]): r["seconds"] for r in records},
        }
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        return result

    records = run(range(FLAGS.start, FLAGS.start + FLAGS.seeds),
                  deadline=deadline, stages=tuple(FLAGS.stages), each=write,
                  cases_per_process=FLAGS.cases_per_process)
    result = write(records, done=True)
    print("counts:", result["counts"])
    print("by stage:", result["stage_counts"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
