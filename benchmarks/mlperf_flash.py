"""Flash, arena and latency of LUT-Q exports of the MLPerf Tiny models.

For each model (.h5 from MLPerf Tiny): the converter's int8 file, the slim
int8 file, and LUT-Q at each bit width and dictionary mode (per tensor,
scaled, per channel), with the dictionaries fitted to the pretrained
weights by k-means (no training: this measures size, not accuracy). Each
file is verified bit-exact on TFLM against its uncompressed twin. Every
figure is set against MLPerf's own int8 file.

Calibration and verification inputs: 64 random inputs of the model's input
shape (uniform 0..255 for ResNet-8's images, standard normal otherwise).
Agreement with Keras on such inputs says little; accuracy is measured on
CIFAR-10 by the accuracy suites.

    python -m benchmarks.mlperf_flash --models_dir=../shared/models

Writes `benchmarks/results/mlperf_flash.json` and `.md`.
"""

import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

# name -> (.h5 file, MLPerf's int8 .tflite, input range)
MODELS = {
    "ResNet-8": ("mlperf_tiny_resnet8.h5", "pretrainedResnet_quant.tflite", "0..255"),
    "DS-CNN": ("mlperf_tiny_kws_ds_cnn.h5", "kws_ref_model.tflite", "normal"),
    "VWW": ("mlperf_tiny_vww_96.h5", "vww_96_int8.tflite", "normal"),
    "AD": ("mlperf_tiny_ad01.h5", "ad01_int8.tflite", "normal"),
    "StreamWW": ("mlperf_tiny_str_ww.h5", "str_ww_ref_model.tflite", "normal"),
}
MODES = {"tensor": {}, "scaled": {"channel_scales": True}, "channel": {"per_channel": True}}
# Targets of the flash issue: LUT-Q file over MLPerf's int8 file.
TARGETS = {("DS-CNN", 4): 0.40, ("DS-CNN", 2): 0.30, ("ResNet-8", 4): 0.50,
           ("ResNet-8", 2): 0.32, ("VWW", 4): 0.43, ("AD", 4): 0.55}
_SAMPLES = 64
_LATENCY_RUNS = 30
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def define_flags():
    flags.DEFINE_string("models_dir", "../shared/models",
                        "Folder with the MLPerf .h5 files and reference_int8/.")
    flags.DEFINE_list("models", list(MODELS), "Models to run.")
    flags.DEFINE_list("bits", ["4", "3", "2"], "Index bits.")
    flags.DEFINE_list("modes", list(MODES), "Dictionary modes.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "mlperf_flash"),
                        "Output path without extension (.json and .md).")


def inputs(model, kind, rng):
    """`_SAMPLES` random inputs of `model`'s input shape, as float32.

    Args:
        model: A Keras model with one input.
        kind: The input range `MODELS` gives: `"0..255"` (uniform pixels),
            else standard normal.
        rng: A NumPy `Generator`.
    """
    import numpy as np

    shape = (_SAMPLES,) + tuple(model.inputs[0].shape[1:])
    if kind == "0..255":
        return rng.uniform(0, 255, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def _latency_ms(path, arena):
    """Median TFLM host latency of one invoke, in ms, and CPU ms."""
    import numpy as np
    from tflite_micro import runtime

    with open(path, "rb") as f:
        interpreter = runtime.Interpreter.from_bytes(f.read(), arena_size=arena + 4096)
    details = interpreter.get_input_details(0)
    x = np.zeros(details["shape"], details["dtype"])
    wall, cpu = [], []
    for _ in range(_LATENCY_RUNS):
        interpreter.set_input(x, 0)
        w, c = time.perf_counter(), time.process_time()
        interpreter.invoke()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def _arena_parts(path, arena):
    """TFLM's own split of the arena: (head, tail) bytes.

    The head holds the planned tensors (activations, decoded kernels); the
    tail the persistent structures (tensors, nodes, kernel state). TFLM
    prints them from C, so stdout is captured at the descriptor.
    """
    import numpy as np
    from tflite_micro import runtime

    interpreter = runtime.Interpreter.from_file(path, arena_size=arena + 4096)
    details = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
    interpreter.invoke()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            interpreter.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read()
    head = int(re.search(r"allocation head (\d+)", text).group(1))
    tail = int(re.search(r"allocation tail (\d+)", text).group(1))
    return head, tail


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    bits: int
    mode: str
    bytes: int
    mlperf_bytes: int
    slim_int8_bytes: int
    information_limit: int
    arena: int
    decode_buffer: int
    arena_head: int
    arena_tail: int
    latency_ms: float
    cpu_ms: float
    bit_exact: bool
    shared_tensors: int
    compressed_tensors: int
    parts: dict


def _row(name, variant, bits, mode, result, mlperf, slim_int8):
    compressed = result.compressed_tensors
    wall, cpu = _latency_ms(result.path, result.arena_bytes)
    head, tail = _arena_parts(result.path, result.arena_bytes)
    return Row(
        model=name, variant=variant, bits=bits, mode=mode,
        bytes=result.size_bytes, mlperf_bytes=mlperf, slim_int8_bytes=slim_int8,
        information_limit=int(result.anatomy.information_limit),
        arena=int(result.arena_bytes),
        decode_buffer=int(max((t.bytes_before for t in compressed), default=0)),
        arena_head=head, arena_tail=tail,
        latency_ms=wall, cpu_ms=cpu,
        bit_exact=bool(result.verification and result.verification.bit_exact),
        shared_tensors=sum(t.table_mode.startswith("shared") for t in compressed),
        compressed_tensors=len(compressed),
        parts={name: int(count) for name, count in result.anatomy.row()},
    )


def run_model(name, models_dir, bits_list, modes, work):
    import numpy as np

    import lutq_tf
    import tflite_export

    h5, reference, kind = MODELS[name]
    model = lutq_tf.load_model(os.path.join(models_dir, h5))
    mlperf = os.path.getsize(os.path.join(models_dir, "reference_int8", reference))
    data = inputs(model, kind, np.random.default_rng(0))
    rows = []
    # The converter's int8 file and its slim twin: no LUT kernels.
    plain = tflite_export.export(model, os.path.join(work, "int8.tflite"),
                                 representative_data=data, slim=False)
    rows.append(_row(name, "int8 (converter)", 8, "-", plain, mlperf, 0))
    slim = tflite_export.export(model, os.path.join(work, "slim.tflite"),
                                representative_data=data)
    slim_bytes = slim.size_bytes
    rows[0].slim_int8_bytes = slim_bytes
    rows.append(_row(name, "int8 slim", 8, "-", slim, mlperf, slim_bytes))
    for bits in bits_list:
        for mode in modes:
            # Per channel, layers whose channels hold fewer than K weights
            # (3x3 depthwise) get one dictionary per tensor (quantize_model).
            q = lutq_tf.quantize_model(model, bits=bits, **MODES[mode])
            path = os.path.join(work, f"lutq{bits}_{mode}.tflite")
            # Random inputs make top-1 agreement a coin toss on near ties:
            # keep the shared tables for size (bit-exactness still checked).
            result = tflite_export.export(q, path, representative_data=data,
                                          shared_tables=True)
            rows.append(_row(name, f"LUT-Q {bits}-bit / {mode}", bits, mode,
                             result, mlperf, slim_bytes))
            print(f"{name} {bits}-bit {mode}: {result.size_bytes} B "
                  f"({result.size_bytes / mlperf:.3f}x MLPerf)", flush=True)
    return rows


def _growth(row, slim_rows, part):
    base = slim_rows.get(row.model)
    if base is None or not row.compressed_tensors:
        return ""
    grown = getattr(row, "arena_" + part) - getattr(base, "arena_" + part)
    if part == "head":
        return f"{grown:,}" + ("" if grown <= row.decode_buffer else " (over)")
    return f"{grown:,} ({grown / row.compressed_tensors:.0f})"


def markdown(rows, command, seconds):
    lines = [
        "# MLPerf Tiny models: flash, arena and latency of LUT-Q exports",
        "",
        f"`{command}` ({seconds / 60:.1f} min). Dictionaries fitted to the "
        "pretrained weights (k-means, no training); calibration and "
        f"verification on {_SAMPLES} random inputs of the right shape. "
        "Per channel: layers with fewer weights per channel than K (3x3 "
        "depthwise) keep one dictionary per tensor. *x MLPerf*: file over MLPerf's int8 "
        ".tflite; *x slim*: over the "
        "project's slim int8 file (LUT-Q's own gain). *limit*: packed "
        "indices + table entries + uncompressed weights + 4 B per bias and "
        "per channel scale. *decode buf*: the largest decoded kernel. "
        "*head +* and *tail +*: growth of TFLM's two arena parts over the slim int8 "
        "file (`print_allocations`): the head holds planned tensors, so it grows by "
        "at most the decode buffer; the tail holds persistent structures and grows "
        "by TFLM's own state of each DECODE op (its node, two tensors, the decode "
        "state), shown per op. Latency: TFLM's reference kernels on this "
        "host (median of 30 invokes, wall / CPU).",
        "",
        "| model | variant | bytes | x MLPerf | target | x slim | limit | file / limit "
        "| arena | decode buf | head + | tail + (per op) | ms (cpu) | bit-exact "
        "| shared / compressed |",
        "| --- | --- |" + " ---: |" * 12 + " --- | ---: |",
    ]
    slim_rows = {r.model: r for r in rows if r.variant == "int8 slim"}
    for r in rows:
        target = TARGETS.get((r.model, r.bits)) if r.mode in ("tensor", "scaled") else None
        mark = ""
        if target:
            met = r.bytes / r.mlperf_bytes <= target
            mark = f"<= {target:.2f}x " + ("met" if met else "MISSED")
        slim = f"{r.bytes / r.slim_int8_bytes:.2f}x" if r.slim_int8_bytes else ""
        lines.append(
            f"| {r.model} | {r.variant} | {r.bytes:,} | {r.bytes / r.mlperf_bytes:.3f}x "
            f"| {mark} | {slim} | {r.information_limit:,} "
            f"| {r.bytes / max(r.information_limit, 1):.2f}x | {r.arena:,} "
            f"| {r.decode_buffer:,} | {_growth(r, slim_rows, 'head')} "
            f"| {_growth(r, slim_rows, 'tail')} | {r.latency_ms:.2f} ({r.cpu_ms:.2f}) "
            f"| {'yes' if r.bit_exact else 'NO'} | {r.shared_tensors} / {r.compressed_tensors} |"
        )
    lines += ["", "MLPerf's int8 files: " + ", ".join(
        f"{m} {next(r.mlperf_bytes for r in rows if r.model == m):,} B"
        for m in dict.fromkeys(r.model for r in rows)), ""]
    lines += ["Bytes by part of each file:", "",
              "| model | variant | " + " | ".join(rows[0].parts) + " |",
              "| --- | --- |" + " ---: |" * len(rows[0].parts)]
    for r in rows:
        lines.append(f"| {r.model} | {r.variant} | "
                     + " | ".join(f"{v:,}" for v in r.parts.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    command = "python -m benchmarks.mlperf_flash " + " ".join(sys.argv[1:])
    start = time.time()
    rows = []
    for name in f.models:
        if name not in MODELS:
            raise app.UsageError(f"--models: unknown model {name!r}; known: {list(MODELS)}")
        with tempfile.TemporaryDirectory() as work:
            rows += run_model(name, f.models_dir, [int(b) for b in f.bits], f.modes, work)
        # Written after each model, so a failure later keeps what is done.
        _write(f.out, rows, command, time.time() - start)
    print(markdown(rows, command, time.time() - start))


def _write(out, rows, command, seconds):
    record = {"command": command, "date": time.strftime("%Y-%m-%d"),
              "seconds": round(seconds), "rows": [dataclasses.asdict(r) for r in rows]}
    for path, text in ((out + ".json", json.dumps(record, indent=1)),
                       (out + ".md", markdown(rows, command, seconds))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
