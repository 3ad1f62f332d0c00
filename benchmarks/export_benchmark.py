"""What a LUT-Q export costs and saves on TFLM: flash, RAM, latency, accuracy.

For the digits CNN (float-trained, then LUT-Q fine-tuned) and MLPerf Tiny's
ResNet-8 (the pretrained .h5, LUT-Q fine-tuned on the CIFAR-10 JPEG copy),
at 1, 2, 3 and 4 bits with per-tensor dictionaries, this exports each model
with `tflite_export` (full int8, bit-packed indices + value tables; ResNet-8
has batch norms folded into its convs, so its tables are per channel) and
measures:

- flash: the .tflite size, the same model without LUT compression (the int8
  baseline, `ExportResult.baseline_bytes`) and the float model as float32;
- the physical limit of the LUT format: the baseline with every compressed
  tensor replaced by ideally bit-packed indices plus its value tables,
  `baseline - sum(bytes before) + sum(ceil(N * bits / 8) + codes * tables)`
  (bits = the stored index width, codes = values per table <= K, 1 byte per
  int8 value), and how many bytes the real file spends over it (DECODE ops,
  ancillary/decoded tensors, their names and quantisation, alignment);
- RAM: the smallest TFLM arena of the compressed model and of its
  uncompressed twin (`ExportResult`), and the smallest main arena when the
  interpreter gets alternate decompression memory sized to the largest
  decoded kernel (`alt_decompression_memory_size`, see the notes);
- host latency on TFLM's Python interpreter, compressed vs uncompressed:
  median of `--latency_runs` invokes on one test input after warm-up
  (`set_input` before every invoke; only `invoke` is timed);
- test accuracy of the Keras model (stripped LUT-Q model, whole test set)
  and of the export on TFLM (a fixed random subset for ResNet-8).

Writes `export.md` and `export.json` to `--out_dir`, the .tflite files to
`--work_dir`. A model whose data or .h5 is missing is skipped with the
reason printed and in the markdown. Measured on 2 CPU cores shared with
another training run: full ~10 min, `--quick` (ResNet-8 on 5,000 train /
5,000 test images) ~4.5 min.

    python -m benchmarks.export_benchmark [--quick]
    python -m benchmarks.export_benchmark \
        --cifar10=../shared/data/cifar10_jpeg.tgz \
        --resnet8_h5=../shared/models/mlperf_tiny_resnet8.h5
"""

import contextlib
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
MODEL_NAMES = ("digits", "resnet8")
BITS = (1, 2, 3, 4)

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a script, so that
    importing this module beside other benchmarks defines nothing)."""
    flags.DEFINE_boolean(
        "quick", False,
        "~5 minute run: fewer digits epochs, ResNet-8 on 5,000 train / 5,000 "
        "test images, fewer TFLM samples and latency runs.")
    flags.DEFINE_string(
        "cifar10", os.path.join(SHARED, "data", "cifar10_jpeg.tgz"),
        "CIFAR-10 (python batches, class folders or .tgz); ResNet-8 is skipped "
        "without it.")
    flags.DEFINE_string(
        "resnet8_h5", os.path.join(SHARED, "models", "mlperf_tiny_resnet8.h5"),
        "MLPerf Tiny pretrained ResNet-8 .h5; ResNet-8 is skipped without it.")
    flags.DEFINE_string(
        "out_dir", None,
        "Where export.md and export.json go (default: benchmarks/results/, or "
        "benchmarks/results/quick/ with --quick, so a quick run never "
        "overwrites the full one).")
    flags.DEFINE_string(
        "work_dir", os.path.join(REPO_ROOT, "out", "benchmarks", "export"),
        "Where the .tflite files go.")
    flags.DEFINE_list("models", list(MODEL_NAMES),
                                "Models to run: digits, resnet8.")
    flags.DEFINE_list("bits", [str(b) for b in BITS],
                              "LUT-Q index bits to run (K = 2**bits).")
    flags.DEFINE_integer(
        "epochs", None, "Override the LUT-Q fine-tuning epochs of every model.")
    flags.DEFINE_integer(
        "float_epochs", None, "Override the digits CNN's float training epochs.")
    flags.DEFINE_integer(
        "latency_runs", None,
        "Timed invokes per model (default 200, 50 with --quick).")


# Untimed invokes before the timed ones.
WARMUP_RUNS = 10
# Arena head-room over the measured minimum, as in tflite_export.evaluate.
ARENA_MARGIN = 4096
# TFLM aligns buffers to 16 bytes.
GRANULE = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """One model and its training budget.

    Attributes:
        name: `"digits"` or `"resnet8"`.
        title: heading in the markdown.
        float_epochs: float training from scratch (digits); 0 for the .h5.
        epochs: LUT-Q fine-tuning epochs per bit setting.
        batch_size: batch size of all training.
        float_learning_rate, learning_rate: Adam learning rates.
        limit: use this many train and test images (None: all).
        tflm_samples: run TFLM on this many test images (None: all).
        latency_runs: timed invokes per model.
    """

    name: str
    title: str
    float_epochs: int
    epochs: int
    batch_size: int
    float_learning_rate: float
    learning_rate: float
    limit: object
    tflm_samples: object
    latency_runs: int

    def describe(self, num_train, num_test):
        start = (f"{self.float_epochs} float epochs from scratch (Adam lr "
                 f"{self.float_learning_rate})" if self.name == "digits"
                 else "the pretrained MLPerf Tiny .h5 (no float fine-tuning)")
        tflm = (f"TFLM on a fixed random subset of {self.tflm_samples} test "
                "images" if self.tflm_samples and self.tflm_samples < num_test
                else "TFLM on the whole test set")
        return (f"{num_train} train / {num_test} test images. Float model: "
                f"{start}. LUT-Q: per-tensor dictionaries, {self.epochs} "
                f"epoch(s) of fine-tuning per bit setting from the float "
                f"model, Adam lr {self.learning_rate}, batch "
                f"{self.batch_size}. Keras accuracy on the whole test set, "
                f"{tflm}. Latency: median of {self.latency_runs} invokes.")


def make_configs(quick, epochs=None, float_epochs=None, latency_runs=None):
    """`{name: Config}` of a full or `--quick` run (with flag overrides)."""
    runs = latency_runs or (50 if quick else 200)
    configs = {
        "digits": Config(
            "digits", "scikit-learn digits, digits_cnn", float_epochs=30,
            epochs=3 if quick else 10, batch_size=32,
            float_learning_rate=1e-3, learning_rate=5e-4, limit=None,
            tflm_samples=None, latency_runs=runs),
        "resnet8": Config(
            "resnet8", "CIFAR-10 (JPEG copy), MLPerf Tiny ResNet-8",
            float_epochs=0, epochs=1, batch_size=64, float_learning_rate=0.0,
            learning_rate=3e-4, limit=5000 if quick else None,
            tflm_samples=200 if quick else 1000, latency_runs=runs),
    }
    for name, config in configs.items():
        changes = {}
        if epochs is not None:
            changes["epochs"] = epochs
        if float_epochs is not None and name == "digits":
            changes["float_epochs"] = float_epochs
        configs[name] = dataclasses.replace(config, **changes)
    return configs


@dataclasses.dataclass
class Row:
    """One export of one model (float32, or LUT-Q at some bits).

    Byte counts are of the .tflite flatbuffer; arenas are the smallest TFLM
    tensor arenas; latencies are milliseconds per invoke on the host.
    `int8_*` fields describe the uncompressed int8 twin of a LUT-Q export
    (None for the float32 row); `alt_*` the run with alternate
    decompression memory.
    """

    variant: str
    bits: object
    keras_accuracy: float
    tflm_accuracy: float
    tflm_samples: int
    keras_accuracy_tflm_samples: float
    flash_bytes: int
    arena_bytes: int
    latency_ms: float
    train_seconds: float = 0.0
    int8_bytes: object = None
    float32_bytes: object = None
    limit_bytes: object = None
    index_bytes: object = None
    table_bytes: object = None
    int8_arena_bytes: object = None
    int8_latency_ms: object = None
    alt_main_arena_bytes: object = None
    alt_memory_bytes: object = None
    weight_quantization: str = ""
    tensors: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def over_limit(self):
        if self.limit_bytes is None:
            return None
        return self.flash_bytes - self.limit_bytes


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def physical_limit(result):
    """`(limit, index_bytes, table_bytes)` of an int8 export.

    The limit is the exporter's information limit
    (`ExportResult.anatomy`): packed indices, value-table entries, weights
    left uncompressed, 4 B per bias and per weight channel scale.
    """
    if result.quantize != "int8":
        raise ValueError("the physical limit is defined for int8 exports; "
                         f"got quantize={result.quantize!r}.")
    anatomy = result.anatomy
    return anatomy.information_limit, anatomy.packed_indices, anatomy.value_tables


def _interpreter(model_bytes, arena_size, alt_memory=0):
    from tflite_export import tflm

    _, runtime, _ = tflm.require()
    return runtime.Interpreter.from_bytes(
        bytes(model_bytes), arena_size=int(arena_size),
        alt_decompression_memory_size=int(alt_memory))


def _run_once(interpreter, x):
    """Sets the (quantised) input and invokes; returns the raw output."""
    from tflite_export import verify

    details = interpreter.get_input_details(0)
    shape = tuple(details["shape"])
    # The exporter's own input quantisation, so the input is what it verified.
    interpreter.set_input(verify._quantize(x.reshape(shape), details), 0)
    interpreter.invoke()
    return np.array(interpreter.get_output(0), copy=True)


def latency_ms(model_bytes, x, arena_bytes, runs):
    """Median milliseconds of one TFLM invoke of `model_bytes` on input `x`.

    `set_input` runs before every invoke (TFLM keeps no input between
    invokes) but only `invoke` is timed; `WARMUP_RUNS` untimed invokes
    come first.
    """
    from tflite_export import verify

    interpreter = _interpreter(model_bytes, arena_bytes + ARENA_MARGIN)
    details = interpreter.get_input_details(0)
    data = verify._quantize(x.reshape(tuple(details["shape"])), details)
    times = []
    for i in range(WARMUP_RUNS + runs):
        interpreter.set_input(data, 0)
        start = time.perf_counter()
        interpreter.invoke()
        if i >= WARMUP_RUNS:
            times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def uncompressed_twin(model, result, calibration):
    """The int8 flatbuffer `export` compressed: re-converted, size-checked.

    `tflite_export.export` does not return its uncompressed baseline, so it
    is converted again with the same converter settings (the weight
    quantisation `export` chose, the same calibration data).

    Raises:
        RuntimeError: the re-conversion differs in size from
            `result.baseline_bytes` (the converter was not deterministic).
    """
    import lutq_tf
    from tflite_export import convert

    plain = lutq_tf.strip_model(model) if lutq_tf.is_quantized(model) else model
    twin = convert.convert(plain, result.quantize, calibration,
                           io_dtype=result.io_dtype,
                           weight_quantization=result.weight_quantization)
    if len(twin) != result.baseline_bytes:
        raise RuntimeError(
            f"re-converting the uncompressed twin of {result.path} gave "
            f"{len(twin)} bytes, but export reported a "
            f"{result.baseline_bytes}-byte baseline; the latency comparison "
            "would not be of the same model.")
    return twin


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 (where TFLM's C++ code logs) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def alt_memory_arena(model_bytes, x, result):
    """Smallest main arena with alternate decompression memory, and its size.

    The alternate memory is the largest decoded kernel (16-byte aligned):
    TFLM restarts it at the same address for every DECODE, while without
    it the arena planner places each DECODE output in the arena. The main
    arena is searched between the uncompressed model's arena and the
    compressed model's (both known to be safe sizes, so no probe can crash
    TFLM's allocator); the output must equal the run without alternate
    memory.

    Returns:
        `(main_arena_bytes, alt_memory_bytes)`, or `(None, alt)` when the
        model does not run with that alternate memory.
    """
    compressed = result.compressed_tensors
    if not compressed:
        return None, None
    alt = -(-max(t.bytes_before for t in compressed) // GRANULE) * GRANULE
    expected = _run_once(_interpreter(model_bytes, result.arena_bytes
                                      + ARENA_MARGIN), x)

    def runs(size):
        try:
            with _native_stderr_silenced():  # TFLM prints each failure
                output = _run_once(_interpreter(model_bytes, size, alt), x)
        except RuntimeError:
            return False
        return np.array_equal(output, expected)

    lo, hi = result.baseline_arena_bytes, result.arena_bytes + ARENA_MARGIN
    if runs(lo):
        return lo, alt
    if not runs(hi):
        return None, alt
    while hi - lo > GRANULE:
        mid = (lo + hi) // 2 // GRANULE * GRANULE
        if mid <= lo:
            break
        if runs(mid):
            hi = mid
        else:
            lo = mid
    return hi, alt


# ---------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------


def load_data(config, cifar10):
    from examples import datasets

    if config.name == "digits":
        return datasets.load_digits()
    return datasets.load_cifar10(cifar10, limit=config.limit)


def float_model(config, train, resnet8_h5):
    """The float model every bit setting starts from, and its train seconds."""
    from examples import models
    from examples import pipeline

    if config.name == "resnet8":
        return models.load_pretrained_resnet8(resnet8_h5), 0.0
    model = models.digits_cnn()
    seconds = pipeline.train_float(model, train, config.float_epochs,
                                   config.batch_size,
                                   config.float_learning_rate, verbose=0)
    return model, seconds


def _row(result_row, latency, **fields):
    """A `Row` from a `pipeline.ResultRow` and extra measurements."""
    return Row(
        variant=result_row.variant,
        bits=result_row.bits,
        keras_accuracy=result_row.keras_accuracy,
        tflm_accuracy=result_row.tflm_accuracy,
        tflm_samples=result_row.tflm_samples,
        keras_accuracy_tflm_samples=result_row.keras_accuracy_tflm_samples,
        flash_bytes=result_row.flash_bytes,
        arena_bytes=result_row.arena_bytes,
        latency_ms=latency,
        train_seconds=result_row.train_seconds,
        weight_quantization=result_row.result.weight_quantization,
        **fields,
    )


def run_model(config, bits_list, work_dir, cifar10=None, resnet8_h5=None):
    """Float32 export and one LUT-Q export per bit setting of one model.

    Returns:
        A dict: `config`, `rows` (float32 first), `num_train`, `num_test`,
        `start_accuracy` (of the float model), `seconds`.
    """
    from examples import pipeline

    begin = time.perf_counter()
    directory = os.path.join(work_dir, config.name)
    os.makedirs(directory, exist_ok=True)
    pipeline.log(f"[{config.name}] loading data")
    train, test = load_data(config, cifar10)
    calibration = train[0][:pipeline.CALIBRATION_SAMPLES]
    # One fixed test input for every latency measurement.
    x_latency = test[0][0]
    model, float_seconds = float_model(config, train, resnet8_h5)
    start_accuracy = pipeline.keras_accuracy(model, *test)
    pipeline.log(f"[{config.name}] {len(train[0])} train / {len(test[0])} "
                 f"test; float model {100 * start_accuracy:.2f}%")

    pipeline.log(f"[{config.name}] float32 export")
    base = pipeline.evaluate_export(
        model, os.path.join(directory, "float32.tflite"), "float32",
        calibration, test, "float32", config.tflm_samples,
        train_seconds=float_seconds)
    with open(base.result.path, "rb") as f:
        float_bytes = f.read()
    rows = [_row(base, latency_ms(float_bytes, x_latency, base.arena_bytes,
                                  config.latency_runs))]
    _log_row(config, rows[-1])

    for bits in bits_list:
        label = pipeline.variant_label(bits)
        pipeline.log(f"[{config.name}] {label}: fine-tuning "
                     f"{config.epochs} epoch(s)")
        lutq, seconds = pipeline.lutq_finetune(
            model, train, config.epochs, config.batch_size,
            config.learning_rate, verbose=0, bits=bits)
        pipeline.log(f"[{config.name}] {label}: export, TFLM accuracy")
        exported = pipeline.evaluate_export(
            lutq, os.path.join(directory, f"lutq{bits}.tflite"), label,
            calibration, test, "int8", config.tflm_samples,
            train_seconds=seconds, bits=bits)
        result = exported.result
        with open(result.path, "rb") as f:
            compressed = f.read()
        pipeline.log(f"[{config.name}] {label}: latency, alternate "
                     "decompression memory")
        twin = uncompressed_twin(lutq, result, calibration)
        limit, index_bytes, table_bytes = physical_limit(result)
        alt_main, alt = alt_memory_arena(compressed, x_latency, result)
        notes = [f"{t.layer}: {t.note}" for t in result.tensors if t.note]
        if alt is not None and alt_main is None:
            notes.append(f"does not run with {alt} bytes of alternate "
                         "decompression memory")
        rows.append(_row(
            exported,
            latency_ms(compressed, x_latency, result.arena_bytes,
                       config.latency_runs),
            int8_bytes=result.baseline_bytes,
            float32_bytes=base.flash_bytes,
            limit_bytes=limit, index_bytes=index_bytes,
            table_bytes=table_bytes,
            int8_arena_bytes=result.baseline_arena_bytes,
            int8_latency_ms=latency_ms(twin, x_latency,
                                       result.baseline_arena_bytes,
                                       config.latency_runs),
            alt_main_arena_bytes=alt_main, alt_memory_bytes=alt,
            tensors=[dataclasses.asdict(t) for t in result.tensors],
            notes=notes))
        _log_row(config, rows[-1])
    return dict(config=config, rows=rows, num_train=len(train[0]),
                num_test=len(test[0]), start_accuracy=start_accuracy,
                seconds=time.perf_counter() - begin)


def _log_row(config, row):
    from examples import pipeline

    text = (f"[{config.name}]   {row.variant}: Keras "
            f"{pipeline.format_percent(row.keras_accuracy)}, TFLM "
            f"{pipeline.format_percent(row.tflm_accuracy)}, "
            f"{row.flash_bytes:,} bytes, arena {row.arena_bytes:,}, "
            f"{row.latency_ms:.2f} ms")
    if row.int8_bytes is not None:
        text += (f"; int8 {row.int8_bytes:,} bytes, limit "
                 f"{row.limit_bytes:,}, arena {row.int8_arena_bytes:,}, "
                 f"{row.int8_latency_ms:.2f} ms")
    pipeline.log(text)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _bytes(value):
    return "-" if value is None else f"{int(value):,}"


def _percent(value):
    return "-" if value is None else f"{100 * value:.2f}%"


def _ms(value):
    return "-" if value is None else f"{value:.2f}"


def _over(row):
    if row.limit_bytes is None:
        return "-"
    return f"+{row.over_limit:,} ({100 * row.over_limit / row.limit_bytes:.1f}%)"


def _alt(row):
    if row.alt_memory_bytes is None:
        return "-"
    if row.alt_main_arena_bytes is None:
        return f"fails + {row.alt_memory_bytes:,}"
    return f"{row.alt_main_arena_bytes:,} + {row.alt_memory_bytes:,}"


# (header, Row -> cell). The markdown's column set; the test checks it.
COLUMNS = (
    ("variant", lambda r: r.variant),
    ("Keras acc", lambda r: _percent(r.keras_accuracy)),
    ("Keras acc (TFLM n)", lambda r: _percent(r.keras_accuracy_tflm_samples)),
    ("TFLM acc", lambda r: _percent(r.tflm_accuracy)),
    ("TFLM n", lambda r: str(r.tflm_samples)),
    ("flash bytes", lambda r: _bytes(r.flash_bytes)),
    ("int8 bytes", lambda r: _bytes(r.int8_bytes)),
    ("float32 bytes", lambda r: _bytes(r.float32_bytes or r.flash_bytes)),
    ("limit bytes", lambda r: _bytes(r.limit_bytes)),
    ("over limit", _over),
    ("vs int8", lambda r: "-" if r.int8_bytes is None
     else f"{r.int8_bytes / r.flash_bytes:.2f}x"),
    ("arena", lambda r: _bytes(r.arena_bytes)),
    ("int8 arena", lambda r: _bytes(r.int8_arena_bytes)),
    ("arena + alt memory", _alt),
    ("ms/inference", lambda r: _ms(r.latency_ms)),
    ("int8 ms/inference", lambda r: _ms(r.int8_latency_ms)),
    ("train s", lambda r: f"{r.train_seconds:.0f}"),
)


def markdown_table(rows):
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row) for _, cell in COLUMNS)
                     + " |")
    return "\n".join(lines)


_LEGEND = """\
Columns: *Keras acc* the Keras model (LUT-Q: stripped, kernels = d[A]) on
the whole test set; *Keras acc (TFLM n)* the same on the *TFLM n* images
TFLM ran; *TFLM acc* the .tflite on TFLite Micro. *flash bytes* the .tflite
file; *int8 bytes* the same model exported without LUT compression
(`ExportResult.baseline_bytes`); *float32 bytes* the float model exported
as float32. *limit bytes* the int8 file with every compressed kernel stored
as ideally bit-packed indices plus its value tables, `int8 bytes - sum(bytes
before) + sum(ceil(N * bits / 8) + codes * tables)` (bits = stored index
width, codes = values per table, 1 byte each); *over limit* what the real
file spends beyond it (DECODE ops, ancillary and decoded tensors with names
and quantisation, 16-byte DCM headers, alignment). *arena* / *int8 arena*
the smallest TFLM tensor arena of the compressed model / its uncompressed
twin; *arena + alt memory* the smallest main arena when the interpreter also
gets `alt_decompression_memory_size` = the largest decoded kernel (second
number). *ms/inference* median host time of one `invoke` in TFLM's Python
interpreter (reference kernels; relative numbers only, and noisy on shared
cores: each pair is measured back to back), compressed / int8 twin. *train s* float training (float32 row) or LUT-Q fine-tuning seconds.
"""

_ARENA_NOTE = """\
Why the compressed arena is larger: TFLM decodes each compressed kernel
with a DECODE op inserted right before its consumer, and the decoded kernel
is an ordinary arena tensor whose lifetime is that one consumer (tflite-micro
`compression/decode_insert.py`, `insert_decode_operators`: "DECODE outputs
are tensors with a lifetime limited to the very next operator"). The planner
reuses that memory, so the arena grows by at most about the *largest*
decoded kernel (plus a few hundred bytes of DECODE state), not by all of
them; less where the decoded kernel fits beside smaller activations. The
Python `Interpreter` (`from_bytes` / `from_file`) takes
`alt_decompression_memory_size`: "If non-zero, DECODE
operators will use this memory instead of the main arena for decompressed
tensor outputs"; that memory restarts at the same address for every DECODE.
The *arena + alt memory* column shows the effect: the main arena drops to
about the int8 one, but the alternate buffer must hold the largest decoded
kernel, so total RAM is not lower; it only moves the decoded kernel into a
separate memory region.
"""


def write_report(results, skipped, out_dir, quick, seconds):
    """Writes `export.md` and `export.json`; returns the markdown's path."""
    from benchmarks import report

    os.makedirs(out_dir, exist_ok=True)
    command = "python -m benchmarks.export_benchmark" + (
        " --quick" if quick else "")
    lines = [
        "# LUT-Q export: flash, physical limit, arena, latency, accuracy",
        "",
        report.generated_line(command, seconds),
        "",
        _LEGEND,
    ]
    for result in results:
        config = result["config"]
        lines += [
            f"## {config.title}", "",
            config.describe(result["num_train"], result["num_test"])
            + f" Float model before LUT-Q: "
            f"{100 * result['start_accuracy']:.2f}% test accuracy. "
            f"Time {result['seconds'] / 60:.1f} min.",
            "",
            markdown_table(result["rows"]),
            "",
        ]
        modes = sorted({t["table_mode"].split("(")[0]
                        for r in result["rows"] for t in r.tensors
                        if t["compressed"]})
        if modes:
            lines += [f"LUT tables: {', '.join(modes)} (converter weight "
                      f"quantisation: "
                      f"{result['rows'][-1].weight_quantization}).", ""]
        notes = [f"{r.variant}: {n}" for r in result["rows"] for n in r.notes]
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in skipped.items()]
        lines.append("")
    lines += ["## Arena of compressed models", "", _ARENA_NOTE]
    path = os.path.join(out_dir, "export.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    payload = {
        "command": command,
        "seconds": seconds,
        "skipped": skipped,
        "models": [
            {
                "name": r["config"].name,
                "config": dataclasses.asdict(r["config"]),
                "num_train": r["num_train"],
                "num_test": r["num_test"],
                "start_accuracy": r["start_accuracy"],
                "seconds": r["seconds"],
                "rows": [dict(dataclasses.asdict(row),
                              over_limit=row.over_limit)
                         for row in r["rows"]],
            }
            for r in results
        ],
    }
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(payload, f, indent=1)
    return path


def missing_inputs(name, cifar10, resnet8_h5):
    """Why a model cannot run (a missing file), or None."""
    if name != "resnet8":
        return None
    for what, flag, path in (("CIFAR-10 data", "--cifar10", cifar10),
                             ("ResNet-8 .h5", "--resnet8_h5", resnet8_h5)):
        if not path:
            return f"no {what} given ({flag})"
        if not os.path.exists(path):
            return f"{what} not found: {path} ({flag})"
    return None


def check_args(model_names, bits, epochs=None, float_epochs=None,
               latency_runs=None):
    """Raises ValueError (naming the flag) on bad arguments."""
    unknown = sorted(set(model_names) - set(MODEL_NAMES))
    if unknown or not model_names:
        raise ValueError(f"--models: unknown or no model(s) {unknown}; choose "
                         f"from {', '.join(MODEL_NAMES)}.")
    if not bits or any(not 1 <= int(b) <= 7 for b in bits):
        raise ValueError(f"--bits must be integers in 1..7 (TFLM index "
                         f"widths), got {list(bits)}.")
    for flag, value, lowest in (("--epochs", epochs, 0),
                                ("--float_epochs", float_epochs, 0),
                                ("--latency_runs", latency_runs, 1)):
        if value is not None and value < lowest:
            raise ValueError(f"{flag} must be >= {lowest}, got {value}.")


def run_benchmark(out_dir, work_dir, quick=False, model_names=MODEL_NAMES,
                  bits=BITS, cifar10=None, resnet8_h5=None, epochs=None,
                  float_epochs=None, latency_runs=None):
    """Runs the benchmark and writes `export.md` / `export.json`.

    Args: as the flags of the same names.

    Returns:
        The path of `export.md`.
    """
    from examples import pipeline

    check_args(model_names, bits, epochs, float_epochs, latency_runs)
    begin = time.perf_counter()
    configs = make_configs(quick, epochs, float_epochs, latency_runs)
    results, skipped = [], {}
    for name in model_names:
        reason = missing_inputs(name, cifar10, resnet8_h5)
        if reason:
            pipeline.log(f"[{name}] skipped: {reason}")
            skipped[name] = reason
            continue
        results.append(run_model(configs[name], [int(b) for b in bits],
                                 work_dir, cifar10, resnet8_h5))
    path = write_report(results, skipped, out_dir, quick,
                        time.perf_counter() - begin)
    pipeline.log(f"wrote {path} and export.json")
    return path


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # TF/absl chatter drowns the output
    try:
        bits = [int(b) for b in FLAGS.bits]
    except ValueError as e:
        raise app.UsageError(f"--bits takes integers: {e}") from e
    try:
        check_args(FLAGS.models, bits, FLAGS.epochs, FLAGS.float_epochs,
                   FLAGS.latency_runs)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    out_dir = FLAGS.out_dir or os.path.join(
        REPO_ROOT, "benchmarks", "results", *(["quick"] if FLAGS.quick else []))
    path = run_benchmark(
        out_dir, FLAGS.work_dir, quick=FLAGS.quick,
        model_names=FLAGS.models, bits=bits, cifar10=FLAGS.cifar10,
        resnet8_h5=FLAGS.resnet8_h5, epochs=FLAGS.epochs,
        float_epochs=FLAGS.float_epochs, latency_runs=FLAGS.latency_runs)
    with open(path) as f:
        print(f.read())


if __name__ == "__main__":
    define_flags()
    app.run(main)
