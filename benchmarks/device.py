"""The exports judged on a microcontroller: firmware flash, arena, decode time.

For the quickstart digits CNN (2-bit) and the five MLPerf Tiny models (4-bit,
one dictionary per tensor), with dictionaries fitted to the weights by
k-means (no training: size and cost do not depend on it), each model is
exported three ways with a device profile (`tflite_export.target`):

- `int8`: the slim int8 file, the route every figure is set against;
- `LUT (forced)`: `decode="always"`: the LUT file whatever it costs;
- `default`: `decode="auto"`: what `export(..., target=...)` writes, the LUT
  file only where it shrinks the firmware.

Figures are estimates from the profile's measured costs, not a device run:
firmware flash change against the int8 route (file change plus the code the
file links), arena for the profile's kernel set (an upper bound for a
32-bit Cortex-M build: `device.arena`) beside the host wheel's, decode
instructions per inference and their share of the int8 model's MAC
instructions.

    python -m benchmarks.device --models_dir=PATH

`PATH` holds the MLPerf Tiny `.h5` files (mlcommons/tiny,
`benchmark/training/*/trained_models/`); models that are absent are skipped.
Writes `benchmarks/results/device.json` and `.md`.
"""

import dataclasses
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks.record import save_record  # noqa: E402
from benchmarks.record import write_text  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# name -> (.h5 file or None for the bundled digits CNN, input kind, bits)
MODELS = {
    "quickstart": (None, "normal", 2),
    "ResNet-8": ("mlperf_tiny_resnet8.h5", "0..255", 4),
    "DS-CNN": ("mlperf_tiny_kws_ds_cnn.h5", "normal", 4),
    "VWW": ("mlperf_tiny_vww_96.h5", "normal", 4),
    "AD": ("mlperf_tiny_ad01.h5", "normal", 4),
    "StreamWW": ("mlperf_tiny_str_ww.h5", "normal", 4),
}
_SAMPLES = 32


def define_flags():
    flags.DEFINE_string("models_dir", "../shared/models", "Folder with the MLPerf .h5 files.")
    flags.DEFINE_list("models", list(MODELS), "Models to run.")
    flags.DEFINE_string("target", "cortex-m4-cmsis-nn", "Device profile.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "device"),
                        "Output path without extension (.json and .md).")


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    bits: int
    file_bytes: int
    int8_file_bytes: int
    flash_change: int
    code_added: dict
    arena_bytes: int
    int8_arena_bytes: int
    host_arena_bytes: int
    decode_ops: int
    decode_instructions: float
    decode_share: float
    paths: dict
    bit_exact: bool
    verdict: str


def _model(name, models_dir):
    from experiments import models
    import lutq_tf

    h5 = MODELS[name][0]
    if h5 is None:
        return models.digits_cnn()
    path = os.path.join(models_dir, h5)
    return lutq_tf.load_model(path) if os.path.exists(path) else None


def _inputs(model, kind, rng):
    import numpy as np

    shape = (_SAMPLES,) + tuple(model.inputs[0].shape[1:])
    if kind == "0..255":
        return rng.uniform(0, 255, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def _row(name, variant, bits, result, int8):
    report = result.device
    paths = {}
    for d in report.decoded:
        paths[d.path] = paths.get(d.path, 0) + 1
    return Row(
        model=name, variant=variant, bits=bits,
        file_bytes=result.size_bytes, int8_file_bytes=int8.size_bytes,
        flash_change=report.flash_change, code_added=dict(report.code_added),
        arena_bytes=int(report.arena_bytes if report.arena_bytes is not None
                        else result.arena_bytes),
        int8_arena_bytes=int(int8.device.arena_bytes if int8.device.arena_bytes is not None
                             else int8.arena_bytes),
        host_arena_bytes=int(result.arena_bytes),
        decode_ops=len(report.decoded),
        decode_instructions=report.decode_instructions,
        decode_share=report.decode_share,
        paths=paths,
        bit_exact=bool(result.verification and result.verification.bit_exact),
        verdict=report.verdict(),
    )


def run_model(name, models_dir, target, work):
    import numpy as np

    import lutq_tf
    import tflite_export

    model = _model(name, models_dir)
    if model is None:
        print(f"{name}: not in {models_dir}, skipped", flush=True)
        return []
    _, kind, bits = MODELS[name]
    data = _inputs(model, kind, np.random.default_rng(0))
    int8 = tflite_export.export(model, os.path.join(work, "int8.tflite"),
                                representative_data=data, target=target)
    q = lutq_tf.quantize_model(model, bits=bits)
    rows = [_row(name, "int8", 8, int8, int8)]
    for variant, decode in (("LUT (forced)", "always"), ("default", "auto")):
        result = tflite_export.export(q, os.path.join(work, f"{decode}.tflite"),
                                      representative_data=data, target=target,
                                      decode=decode)
        rows.append(_row(name, variant, bits, result, int8))
        print(f"{name} {variant}: file {result.size_bytes:,} B, firmware "
              f"{result.device.flash_change:+,} B", flush=True)
    return rows


def markdown(rows, command, seconds, target):
    from tflite_export import target as targets

    profile = targets.get(target)
    lines = [
        f"# Exports on the device ({profile.name})",
        "",
        f"`{command}` ({seconds / 60:.1f} min). Estimates from the profile "
        f"`{profile.name}` ({profile.kernels} kernels; {profile.provenance}). "
        "Dictionaries fitted to the weights by k-means, one per tensor; "
        f"calibration on {_SAMPLES} random inputs. *flash*: firmware flash "
        "change against the slim int8 file (file change plus the code the file "
        "links: DECODE once). *arena*: an upper bound for a 32-bit Cortex-M build "
        "with the profile's kernel set (the wheel's activations and scratch, its "
        "persistent data recomputed for 32-bit pointers, plus CMSIS-NN's largest "
        "scratch buffer; `device.arena`); *host arena*: the smallest arena on the "
        "x86-64 tflite-micro wheel (reference kernels). *decode*: "
        "instructions per inference decoding the weights, and their share of the "
        "int8 model's MAC instructions. *default* is what `export(..., "
        f"target=\"{profile.name}\")` writes; *LUT (forced)* is `decode=\"always\"`.",
        "",
        "| model | variant | bits | file | flash vs int8 | arena | host arena | decode ops "
        "| decode instr. | share | paths | bit-exact |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        paths = ", ".join(f"{p} x{n}" for p, n in sorted(r.paths.items())) or "-"
        lines.append(
            f"| {r.model} | {r.variant} | {r.bits} | {r.file_bytes:,} | {r.flash_change:+,} "
            f"| {r.arena_bytes:,} | {r.host_arena_bytes:,} | {r.decode_ops} "
            f"| {r.decode_instructions:,.0f} "
            f"| {100 * r.decode_share:.1f} % | {paths} | {'yes' if r.bit_exact else 'NO'} |"
        )
    lines += ["", "Verdicts of the default exports:", ""]
    lines += [f"- {r.model}: {r.verdict}" for r in rows if r.variant == "default"]
    return "\n".join(lines) + "\n"


def _write(out, rows, command, seconds, target):
    record = {"command": command, "date": time.strftime("%Y-%m-%d"),
              "seconds": round(seconds), "target": target,
              "rows": [dataclasses.asdict(r) for r in rows]}
    save_record(record, out + ".json")
    write_text(markdown(rows, command, seconds, target), out + ".md")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    command = "python -m benchmarks.device " + " ".join(sys.argv[1:])
    start = time.time()
    rows = []
    for name in f.models:
        if name not in MODELS:
            raise app.UsageError(f"--models: unknown model {name!r}; known: {list(MODELS)}")
        with tempfile.TemporaryDirectory() as work:
            rows += run_model(name, f.models_dir, f.target, work)
        _write(f.out, rows, command, time.time() - start, f.target)
    print(markdown(rows, command, time.time() - start, f.target))


if __name__ == "__main__":
    define_flags()
    app.run(main)
