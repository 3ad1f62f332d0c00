"""The steps every example and benchmark shares, as small functions.

    float training -> LUT-Q fine-tuning -> Keras accuracy
        -> export to TFLM (+ verification) -> TFLM accuracy -> results table

An example's `main` is its data and float model, then
`finetune_export_report` (flags: `examples.cli`). By hand:

    model = models.digits_cnn()
    train_float(model, (x_train, y_train), epochs=20)
    lutq, seconds = lutq_finetune(model, (x_train, y_train), epochs=10,
                                  bits=2)
    row = evaluate_export(lutq, "out/lutq.tflite", "LUT-Q 2-bit", x_train,
                          (x_test, y_test))
    print(format_table([row]))

Models are classifiers with a softmax output and integer labels.
"""

import dataclasses
import os
import sys
import time

import keras
import numpy as np

import lutq_tf
from lutq_tf.text import grid
from lutq_tf.text import markdown
import tflite_export

# Calibration samples for int8 conversion (the converter uses at most 1000).
CALIBRATION_SAMPLES = 500

_START = time.perf_counter()


def log(message):
    """Prints a progress line prefixed with the seconds since start-up."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def compile_classifier(model, learning_rate=1e-3):
    """Compiles a softmax classifier with Adam and sparse cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train_float(model, train, epochs, batch_size=32, learning_rate=1e-3,
                verbose=2, seed=0, callbacks=None):
    """Trains (or fine-tunes) a Keras classifier in place.

    Float models train as usual; a LUT-Q model's `fit` also runs its
    k-means steps (`lutq_finetune` uses this).

    Args:
        model: a Keras classifier with a softmax output (recompiled here).
        train: `(x, y)`, images `(N, ...)` float32 and int labels `(N,)`.
        epochs: epochs to train; 0 does nothing.
        batch_size, learning_rate: Adam settings (the model is recompiled).
        verbose: Keras `fit` verbosity (2: one line per epoch).
        seed: seed of the shuffling (the same for every variant).
        callbacks: optional Keras callbacks for `fit`.

    Returns:
        Wall-clock seconds spent in `fit`.
    """
    if epochs <= 0:
        return 0.0
    compile_classifier(model, learning_rate)
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    model.fit(train[0], train[1], batch_size=batch_size, epochs=epochs,
              verbose=verbose, callbacks=callbacks)
    return time.perf_counter() - start


def lutq_finetune(float_model, train, epochs, batch_size=32,
                  learning_rate=1e-3, verbose=2, seed=0, callbacks=None,
                  **quantize_options):
    """LUT-Q fine-tuning of a (pretrained) float model.

    Args:
        float_model: a Sequential/Functional Keras model; not modified.
        train: `(x, y)` training data.
        epochs: epochs of LUT-Q training (0: only the initial k-means).
        batch_size, learning_rate, verbose, seed, callbacks: as in
            `train_float`.
        **quantize_options: passed to `lutq_tf.quantize_model` (`bits`,
            `constraint`, `prune_rate`, `per_channel`, ...). One more option:
            `prune_allocation="erk"` spreads `prune_rate` over the layers
            by `lutq_tf.erk_prune_overrides` (default "uniform": every layer at
            `prune_rate`).

    Returns:
        `(lutq_model, seconds)`: the trained LUT-Q model and the seconds
        spent in `fit`.
    """
    erk = quantize_options.pop("prune_allocation", "uniform") == "erk"
    if erk and "overrides" in quantize_options:
        raise ValueError("lutq_finetune: prune_allocation='erk' writes the overrides; "
                         "pass one or the other.")
    if erk:
        quantize_options["overrides"] = lutq_tf.erk_prune_overrides(
            float_model, quantize_options["prune_rate"])
    keras.utils.set_random_seed(seed)  # k-means initialisation draws
    lutq_model = lutq_tf.quantize_model(float_model, **quantize_options)
    seconds = train_float(lutq_model, train, epochs, batch_size,
                          learning_rate, verbose, seed, callbacks)
    return lutq_model, seconds


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def keras_accuracy(model, x, y, batch_size=256):
    """Top-1 accuracy of a Keras classifier (compiled or not)."""
    scores = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y)))


def subset(data, size, seed=0):
    """A fixed random subset of `(x, y)` (the whole of it if `size` is None).

    Test sets can be ordered by class, so a prefix would not do.
    """
    x, y = data
    if size is None or size >= len(x):
        return x, y
    index = np.sort(np.random.default_rng(seed).permutation(len(x))[:size])
    return x[index], y[index]


@dataclasses.dataclass
class ResultRow:
    """One model variant: its accuracies and its size on the device.

    Attributes:
        variant: label, e.g. `"LUT-Q 4-bit / tensor"`.
        keras_accuracy: test accuracy of the Keras model (whole test set).
        tflm_accuracy: accuracy of the exported model on TFLM, on
            `tflm_samples` test samples (None when not exported).
        tflm_samples: how many test samples TFLM ran.
        keras_accuracy_tflm_samples: the Keras model's accuracy on the
            same samples as TFLM (equals `keras_accuracy` on the whole set).
        test_samples: size of the whole test set.
        flash_bytes: size of the .tflite file.
        baseline_bytes: the same model exported without LUT compression
            (the converter's file).
        slim_baseline_bytes: the same, slimmed as the written file is.
        arena_bytes: smallest TFLM arena that runs it.
        information_limit: the file's information limit (`anatomy`).
        decode_buffer_bytes: its largest decoded kernel (in the arena).
        export: `"float32"` or `"int8"`.
        train_seconds: seconds of training for this variant.
        bits: index bits per weight (None for float/int8 baselines).
        per_channel: dictionary per output channel.
        notes: remarks.
        result: the `tflite_export.ExportResult` (not shown in tables).
    """

    variant: str
    keras_accuracy: float
    tflm_accuracy: object = None
    tflm_samples: int = 0
    keras_accuracy_tflm_samples: object = None
    test_samples: int = 0
    flash_bytes: object = None
    baseline_bytes: object = None
    slim_baseline_bytes: object = None
    arena_bytes: object = None
    information_limit: object = None
    decode_buffer_bytes: object = None
    export: str = ""
    train_seconds: float = 0.0
    bits: object = None
    per_channel: bool = False
    notes: str = ""
    result: object = dataclasses.field(default=None, repr=False)


# The examples' LUT-Q export: the compressed file whatever it costs, judged on
# a Cortex-M4 with CMSIS-NN kernels (the report's verdict says whether it
# pays there; `decode="auto"` would write int8 where it does not).
DEVICE_EXPORT = {"target": "cortex-m4-cmsis-nn", "decode": "always"}


def export_model(model, path, calibration, quantize="int8", c_array=None, **options):
    """Exports to TFLM with `tflite_export.export` and verifies it.

    Args:
        model: LUT-Q or plain Keras model.
        path: the .tflite file to write (its directory is created).
        calibration: float32 training inputs; the first
            `CALIBRATION_SAMPLES` calibrate int8 and verify.
        quantize: `"int8"` or `"float32"`.
        c_array: optional `.cc` path to also write the model as a C array.
        **options: further `tflite_export.export` options (`target`, ...).

    Returns:
        The `tflite_export.ExportResult`.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return tflite_export.export(
        model, path,
        representative_data=np.asarray(calibration[:CALIBRATION_SAMPLES]),
        quantize=quantize,
        c_array=c_array,
        **options,
    )


def evaluate_export(model, path, variant, calibration, test, quantize="int8",
                    tflm_samples=None, c_array=None, export_options=None, **row_fields):
    """Exports a model, runs the export on TFLM and returns its `ResultRow`.

    Args:
        model: the Keras model to export (LUT-Q or plain).
        path: where to write the .tflite file.
        variant: label of the row.
        calibration: float32 training inputs (calibration, verification).
        test: `(x_test, y_test)`.
        quantize: `"int8"` or `"float32"` export.
        tflm_samples: run TFLM on this many test samples (a fixed random
            subset); None runs all of them.
        c_array: optional `.cc` path for the model as a C array.
        export_options: further `tflite_export.export` options, or None.
        **row_fields: further `ResultRow` fields (`train_seconds`, `bits`,
            `per_channel`, ...).

    Returns:
        A `ResultRow`.
    """
    plain = lutq_tf.strip_model(model) if lutq_tf.is_quantized(model) else model
    accuracy = keras_accuracy(plain, *test)
    result = export_model(model, path, calibration, quantize, c_array,
                          **(export_options or {}))
    x_tflm, y_tflm = subset(test, tflm_samples)
    tflm = tflite_export.tflm_accuracy(result.path, x_tflm, y_tflm,
                                   result.arena_bytes)
    keras_same = (accuracy if len(x_tflm) == len(test[0])
                  else keras_accuracy(plain, x_tflm, y_tflm))
    return ResultRow(
        variant=variant,
        keras_accuracy=accuracy,
        tflm_accuracy=tflm,
        tflm_samples=len(x_tflm),
        keras_accuracy_tflm_samples=keras_same,
        test_samples=len(test[0]),
        flash_bytes=result.size_bytes,
        baseline_bytes=result.baseline_bytes,
        slim_baseline_bytes=result.slim_baseline_bytes,
        arena_bytes=result.arena_bytes,
        information_limit=int(result.anatomy.information_limit),
        decode_buffer_bytes=result.decode_buffer_bytes,
        export=quantize,
        result=result,
        **row_fields,
    )


def variant_label(bits, constraint="none", prune_rate=0.0, per_channel=False):
    """A short name of a LUT-Q configuration, e.g. "LUT-Q 4-bit pow2 / tensor"."""
    parts = [f"LUT-Q {bits}-bit"]
    if constraint not in (None, "none"):
        parts.append(str(constraint))
    if prune_rate:
        parts.append(f"{100 * prune_rate:.0f}% pruned")
    return " ".join(parts) + (" / channel" if per_channel else " / tensor")


def compare_exports(float_model, lutq_model, out_dir, calibration, test,
                    label, tflm_samples=None, float_seconds=0.0,
                    lutq_seconds=0.0, **lutq_fields):
    """The three rows of an example: float32, int8 post-training, LUT-Q.

    Exports the float model as float32 and as int8 (post-training
    quantisation) and the LUT-Q model as LUT-compressed int8 (with a C
    array, judged on a device: `DEVICE_EXPORT`), runs all three on TFLM and
    prints the LUT-Q export report.

    Args:
        float_model: the trained float Keras model.
        lutq_model: its LUT-Q fine-tuned version.
        out_dir: directory for `float32.tflite`, `int8.tflite`,
            `lutq.tflite` and `lutq_model_data.cc/.h`.
        calibration: float32 training inputs.
        test: `(x_test, y_test)`.
        label: variant name of the LUT-Q row.
        tflm_samples: TFLM runs on this many test samples (None: all).
        float_seconds: training time of the float model.
        lutq_seconds: LUT-Q fine-tuning time (the row shows float + LUT-Q).
        **lutq_fields: further `ResultRow` fields of the LUT-Q row.

    Returns:
        `[float32_row, int8_row, lutq_row]`.
    """
    log("exporting the float model as float32 and running it on TFLM")
    rows = [evaluate_export(
        float_model, os.path.join(out_dir, "float32.tflite"), "float",
        calibration, test, "float32", tflm_samples,
        train_seconds=float_seconds)]
    log("exporting the float model as int8 (post-training quantisation)")
    rows.append(evaluate_export(
        float_model, os.path.join(out_dir, "int8.tflite"),
        "float + int8 post-training", calibration, test, "int8",
        tflm_samples, train_seconds=float_seconds))
    log("exporting the LUT-Q model (int8, LUT-compressed), verifying it on "
        "TFLM")
    rows.append(evaluate_export(
        lutq_model, os.path.join(out_dir, "lutq.tflite"), label + " + int8",
        calibration, test, "int8", tflm_samples,
        c_array=os.path.join(out_dir, "lutq_model_data.cc"), export_options=DEVICE_EXPORT,
        train_seconds=float_seconds + lutq_seconds, **lutq_fields))
    print(rows[-1].result.table())
    return rows


def report(rows, out_dir):
    """Prints the results table and a size summary; writes `results.md`.

    Args:
        rows: `[float32_row, int8_row, lutq_row]` from `compare_exports`.
        out_dir: where `results.md` goes.
    """
    samples = rows[-1].tflm_samples
    log(f"results (Keras accuracy on the whole test set, TFLM accuracy on "
        f"{samples} test images; flash = .tflite size; 'uncompressed' = "
        "the converter's file without LUT compression, 'slim uncompressed' "
        "= that file without what TFLM never reads)")
    print(format_table(rows))
    float_row, int8_row, lutq_row = rows
    print(f"\nLUT-Q model: {lutq_row.flash_bytes:,} bytes, "
          f"{int8_row.flash_bytes / lutq_row.flash_bytes:.2f}x smaller than "
          f"int8 and {float_row.flash_bytes / lutq_row.flash_bytes:.2f}x "
          f"smaller than float32; TFLM arena {lutq_row.arena_bytes:,} bytes "
          f"(int8: {int8_row.arena_bytes:,}; decoded kernels live in the "
          "arena).")
    seconds = time.perf_counter() - _started
    command = "python -m " + os.path.splitext(
        os.path.relpath(sys.argv[0]))[0].replace(os.sep, ".")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"`{' '.join([command] + sys.argv[1:])}`: "
                f"{time.strftime('%Y-%m-%d')}, {seconds:.0f} s in all.\n\n"
                + markdown_table(rows) + "\n")
    log(f"done in {seconds:.0f} s; files in {out_dir}/")


_started = time.perf_counter()


def start_example(out_dir, seed):
    """Creates `out_dir`, seeds Keras (Python, NumPy and TF generators) and
    starts the clock `report` reads."""
    global _started
    _started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(seed)


def finetune_export_report(float_model, train, test, out_dir, options,
                           epochs, batch_size, learning_rate, seed,
                           float_seconds, message, lutq_start=None,
                           tflm_samples=None):
    """Steps 3/5 to 5/5 of an example, after its data and float model.

    3/5 LUT-Q fine-tuning (and `lutq_tf.summary`), 4/5 the three exports
    (float32, int8 post-training, LUT-Q int8 + C array), each verified and
    run on TFLM (`compare_exports`), 5/5 the table and `results.md`
    (`report`).

    Args:
        float_model: the trained float model (exported as float32 and int8).
        train, test: `(x, y)` data.
        out_dir: where the files go.
        options: `lutq_tf.quantize_model` options (`bits`, `constraint`,
            `prune_rate`, `per_channel`); they name the LUT-Q row.
        epochs, batch_size, learning_rate, seed: LUT-Q fine-tuning.
        float_seconds: training time of the float model.
        message: the 3/5 progress line after "3/5 ".
        lutq_start: the model LUT-Q starts from. Default `float_model`
            (the LUT-Q row's time is then float + LUT-Q); another model,
            e.g. a second copy of a pretrained one, counts only its own.
        tflm_samples: TFLM runs on this many test images (None: all).

    Returns:
        `[float32_row, int8_row, lutq_row]`.
    """
    log(f"3/5 {message}")
    lutq_model, lutq_seconds = lutq_finetune(
        float_model if lutq_start is None else lutq_start, train, epochs,
        batch_size, learning_rate, seed=seed, **options)
    lutq_tf.summary(lutq_model)

    log("4/5 exports: float32, int8 post-training, LUT-Q int8; each "
        "verified and run on TFLM")
    rows = compare_exports(
        float_model, lutq_model, out_dir, train[0], test,
        variant_label(**options), tflm_samples=tflm_samples,
        float_seconds=float_seconds,
        lutq_seconds=lutq_seconds if lutq_start is None else 0.0,
        bits=options["bits"], per_channel=options["per_channel"])
    if lutq_start is not None:
        rows[-1].train_seconds = lutq_seconds
    log("5/5 results")
    report(rows, out_dir)
    return rows


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

# (header, ResultRow -> cell text)
COLUMNS = (
    ("variant", lambda r: r.variant),
    ("export", lambda r: r.export or "-"),
    ("Keras acc", lambda r: format_percent(r.keras_accuracy)),
    ("TFLM acc", lambda r: format_percent(r.tflm_accuracy)),
    ("TFLM n", lambda r: str(r.tflm_samples) if r.tflm_samples else "-"),
    ("flash bytes", lambda r: format_bytes(r.flash_bytes)),
    ("uncompressed", lambda r: format_bytes(r.baseline_bytes)),
    ("slim uncompressed", lambda r: format_bytes(r.slim_baseline_bytes)),
    ("limit", lambda r: format_bytes(r.information_limit)),
    ("arena bytes", lambda r: format_bytes(r.arena_bytes)),
    ("decode buf", lambda r: format_bytes(r.decode_buffer_bytes)),
    ("train s", lambda r: f"{r.train_seconds:.0f}" if r.train_seconds else "-"),
)


def format_percent(value):
    """0.9876 -> "98.76%"; None -> "-"."""
    return "-" if value is None else f"{100 * value:.2f}%"


def format_bytes(value):
    """12345 -> "12,345"; None -> "-"."""
    return "-" if value is None else f"{int(value):,}"


# Shown only when TFLM ran on a subset of the test set: Keras on that subset.
SUBSET_COLUMN = ("Keras acc, TFLM n",
                 lambda r: format_percent(r.keras_accuracy_tflm_samples))


def _cells(rows):
    columns = list(COLUMNS)
    if any(r.tflm_samples and r.tflm_samples < r.test_samples for r in rows):
        columns.insert(4, SUBSET_COLUMN)
    header = [name for name, _ in columns]
    return header, [[cell(r) for _, cell in columns] for r in rows]


def format_table(rows):
    """`ResultRow`s as a fixed-width text table (one line per row)."""
    return grid(*_cells(rows))


def markdown_table(rows):
    """`ResultRow`s as a GitHub markdown table."""
    return markdown(*_cells(rows))


def pareto_front(points):
    """Indices of the points no other point beats on both size and accuracy.

    Args:
        points: sequence of `(bytes, accuracy)`; smaller bytes and higher
            accuracy are better.

    Returns:
        The indices of the Pareto-optimal points, by increasing bytes. Of
        identical points only the first is kept.
    """
    order = sorted(range(len(points)),
                   key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
