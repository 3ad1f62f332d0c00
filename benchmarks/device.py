"""The exports judged on a microcontroller: firmware flash, arena, decode time.

For the quickstart digits CNN (2-bit) and the five MLPerf Tiny models (4-bit,
one dictionary per tensor), with dictionaries fitted to the weights by
k-means (no training: size and cost do not depend on it), each model is
exported four ways with a device profile (`tflite_export.device.target`):

- `int8`: the slim int8 file, the route every figure is set against;
- `LUT (forced)`: `decode="always"`: the LUT file whatever it costs;
- `default`: `decode="auto"`: what `export(..., target=...)` writes, the LUT
  file only where it shrinks the firmware;
- `int4`: native int4 weights (`int4="always"`, or `"auto"` where a kernel
  cannot be int4): batch norms folded into the layer before them
  (`lutq_tf.fold_batchnorm`), 4-bit `constraint="int4"` dictionaries per
  output channel, one per tensor for Dense (TFLM's FULLY_CONNECTED takes int4
  per tensor only: `weight_quantization="dense_per_tensor"`).
- `planned`: `plan_budget(..., target=...)` on the model with its batch
  norms folded, for the `LUT (forced)` file's bytes (random inputs, so the
  Fisher weights come from the outputs): int8, int4 or a LUT per layer,
  quantised with `quantize_model(**plan)` and exported with
  `plan.export_options()`.

The quickstart model is trained as the quickstart's float stage does
(seed 0) and takes scikit-learn's digits; with `--cifar10=PATH`, ResNet-8
takes CIFAR-10 images (x255, as the .h5 expects). Each: its first 32
training images calibrate and weight the plan, and the agreement is taken
on `--agreement_images` test images. The other models take random inputs,
on which a classifier's top-1 agreement is a coin toss on near-ties
(ResNet-8 puts 27 of 32 of them in one class) and says little about the
file.

Figures are estimates from the profile's measured costs, not a device run:
firmware flash change against the int8 route (file change plus the code the
file links), arena for the profile's kernel set (an upper bound for a
32-bit Cortex-M build: `firmware.arena`) beside the host wheel's, decode
instructions per inference and their share of the int8 model's MAC
instructions, the int4 kernels' extra instructions likewise, the weights
left int8, and each file's agreement with the float Keras model on the
random inputs, or the real ones (TFLM against Keras: top-1 for a
classifier, SNR otherwise).

    python -m benchmarks.device --models_dir=PATH --cifar10=PATH

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
    flags.DEFINE_string("cifar10", None, "Optional CIFAR-10 path (experiments.datasets): "
                        "ResNet-8 takes real images instead of random ones.")
    flags.DEFINE_integer("agreement_images", 256, "--cifar10: test images the "
                         "agreement with float Keras is taken on.")
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
    # Firmware flash against the int8 row's file (file change plus the code
    # linked); `flash_change` is `result.device`'s, against the export's own
    # int8 twin, which can differ (e.g. slimming steps kept for int4).
    firmware_change: int = 0
    int8_instructions: float = 0.0
    int4_ops: int = 0
    int4_weights: int = 0
    int4_instructions: float = 0.0
    int4_share: float = 0.0
    int8_weights: int = 0
    float_top1: object = None
    float_snr_db: object = None
    float_max_diff: float = 0.0
    reference_scratch: int = 0
    notes: list = dataclasses.field(default_factory=list)
    # What the agreement is taken on: "random" or a real data set's name.
    inputs: str = "random"


def _model(name, models_dir):
    import keras

    from experiments import datasets
    from experiments import models
    from experiments import pipeline
    import lutq_tf

    h5 = MODELS[name][0]
    if h5 is None:  # as the quickstart's float stage: 30 epochs, batch 32, Adam 1e-3
        keras.utils.set_random_seed(0)
        model = models.digits_cnn()
        pipeline.train_float(model, datasets.load_digits(seed=0)[0], 30, 32, 1e-3,
                             verbose=0, seed=0)
        return model
    path = os.path.join(models_dir, h5)
    return lutq_tf.load_model(path) if os.path.exists(path) else None


def _inputs(model, kind, rng):
    import numpy as np

    shape = (_SAMPLES,) + tuple(model.inputs[0].shape[1:])
    if kind == "0..255":
        return rng.uniform(0, 255, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def weight_count(model_bytes):
    """Weights of a file's CONV / DEPTHWISE / FC / TRANSPOSE_CONV filters."""
    from tflite_export.pipeline import flatbuffer

    return sum(int(w.array.size) for w in flatbuffer.read(model_bytes).weights)


def int8_weights(total, report):
    """Weights left int8: `total` (the int8 file's `weight_count`) less those
    a `DeviceReport` finds decoded by DECODE or stored as native int4."""
    return total - sum(d.elements for d in report.decoded) - sum(
        w.elements for w in report.int4)


def agreement(expected, real):
    """`(top-1 or None, SNR dB, max |diff|)` of `real` (TFLM) against
    `expected` (float Keras): top-1 only for probability outputs."""
    import numpy as np

    expected = np.asarray(expected, np.float64)
    real = np.asarray(real, np.float64).reshape(expected.shape)
    top1 = None
    if (expected.ndim >= 2 and expected.shape[-1] > 1 and np.all(expected >= 0)
            and np.allclose(expected.sum(-1), 1.0, atol=1e-3)):
        top1 = float(np.mean(np.argmax(real, -1) == np.argmax(expected, -1)))
    noise = float(np.sum((real - expected) ** 2))
    snr = 10 * np.log10(float(np.sum(expected ** 2)) / noise) if noise > 0 else None
    return top1, (None if snr is None else float(snr)), float(np.max(np.abs(real - expected)))


def reference_scratch(model_bytes):
    """The largest scratch buffer the reference kernels request for a file's
    ops (aligned): for int4 filters, the unpacked filter, which CMSIS-NN
    does not allocate (`firmware.arena` leaves it out for CMSIS-NN)."""
    from tflite_export.device import kernel_scratch

    rows = kernel_scratch.op_scratch(model_bytes, aligned=True)
    return max((r.reference or 0 for r in rows), default=0)


def dense_layers(model):
    """Names of a model's Dense layers (top level; they need per-tensor
    dictionaries for int4)."""
    import keras

    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def _row(name, variant, bits, result, int8, total_weights, data, expected, path, notes=()):
    import tflite_export

    report = result.device
    paths = {}
    for d in report.decoded:
        paths[d.path] = paths.get(d.path, 0) + 1
    top1, snr, diff = agreement(
        expected, tflite_export.tflm_predict(path, data, result.arena_bytes))
    with open(path, "rb") as f:
        written = f.read()
    arena_bytes = int(report.arena_bytes if report.arena_bytes is not None
                      else result.arena_bytes)
    return Row(
        model=name, variant=variant, bits=bits,
        file_bytes=result.size_bytes, int8_file_bytes=int8.size_bytes,
        flash_change=report.flash_change, code_added=dict(report.code_added),
        arena_bytes=arena_bytes,
        int8_arena_bytes=int(int8.device.arena_bytes if int8.device.arena_bytes is not None
                             else int8.arena_bytes),
        host_arena_bytes=int(result.arena_bytes),
        decode_ops=len(report.decoded),
        decode_instructions=report.decode_instructions,
        decode_share=report.decode_share,
        paths=paths,
        bit_exact=bool(result.verification and result.verification.bit_exact),
        verdict=report.verdict(),
        firmware_change=result.size_bytes - int8.size_bytes + sum(report.code_added.values()),
        int8_instructions=report.int8_instructions,
        int4_ops=len(report.int4),
        int4_weights=sum(w.elements for w in report.int4),
        int4_instructions=report.int4_instructions,
        int4_share=(report.int4_instructions / report.int8_instructions
                    if report.int8_instructions else 0.0),
        int8_weights=int8_weights(total_weights, report),
        float_top1=top1, float_snr_db=snr, float_max_diff=diff,
        reference_scratch=reference_scratch(written),
        notes=list(notes),
    )


def _int4_export(model, data, target, path):
    """The int4 row's export: `(result, notes)`."""
    import warnings

    import lutq_tf
    import tflite_export
    from tflite_export.errors import ExportError

    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, folds = lutq_tf.fold_batchnorm(model)
        dense = dense_layers(folded)
        q = lutq_tf.quantize_model(
            folded, bits=4, constraint="int4", per_channel=True,
            overrides={n: {"granularity": "per_tensor"} for n in dense})
    if folds:
        notes.append(f"{len(folds)} batch norm(s) folded")
    fewer = [str(w.message) for w in caught if "fewer weights than" in str(w.message)]
    if fewer:
        notes.append("one dictionary per tensor where a channel holds fewer than 16 weights")
    options = dict(representative_data=data, target=target,
                   weight_quantization="dense_per_tensor" if dense else None)
    try:
        return tflite_export.export(q, path, int4="always", **options), notes
    except ExportError as e:
        notes.append(f"int4='always' refused ({str(e).splitlines()[0]}); int4='auto'")
        return tflite_export.export(q, path, int4="auto", **options), notes


def real_images(cifar10, agreement_images):
    """`{model: (calibration, evaluation, name)}`: real inputs, `_SAMPLES`
    training images and `agreement_images` test images: the quickstart's
    from scikit-learn's bundled digits, ResNet-8's from CIFAR-10 (x255, as
    the .h5 expects) if `cifar10` is given."""
    from experiments import datasets

    (x, _), (test, _) = datasets.load_digits(seed=0)
    real = {"quickstart": (x[:_SAMPLES], test[:agreement_images],
                           f"{len(test[:agreement_images])} digits test images")}
    if cifar10:
        (x, _), (test, _) = datasets.load_cifar10(cifar10)
        real["ResNet-8"] = (255.0 * x[:_SAMPLES], 255.0 * test[:agreement_images],
                            f"{len(test[:agreement_images])} CIFAR-10 test images")
    return real


def run_model(name, models_dir, target, work, real=None):
    """The rows of one model.

    Args:
        name: a key of `MODELS`.
        models_dir, target: see the flags.
        work: a folder for the files.
        real: `(calibration, evaluation, name)` of real inputs (`real_images`),
            or None for `_SAMPLES` random ones, used for both.
    """
    import numpy as np

    import lutq_tf
    import tflite_export

    model = _model(name, models_dir)
    if model is None:
        print(f"{name}: not in {models_dir}, skipped", flush=True)
        return []
    _, kind, bits = MODELS[name]
    if real is None:
        data = evaluation = _inputs(model, kind, np.random.default_rng(0))
        inputs = "random"
    else:
        data, evaluation, inputs = real
    expected = model.predict(evaluation, verbose=0)
    int8_path = os.path.join(work, "int8.tflite")
    int8 = tflite_export.export(model, int8_path, representative_data=data, target=target)
    with open(int8_path, "rb") as f:
        total = weight_count(f.read())

    def row(variant, row_bits, result, path, notes=()):
        r = _row(name, variant, row_bits, result, int8, total, evaluation, expected, path,
                 notes)
        r.inputs = inputs
        print(f"{name} {variant}: file {r.file_bytes:,} B, firmware {r.firmware_change:+,} B, "
              f"arena {r.arena_bytes:,} B (int8 {r.int8_arena_bytes:,}), "
              f"int8 weights {r.int8_weights:,}", flush=True)
        return r

    rows = [row("int8", 8, int8, int8_path)]
    q = lutq_tf.quantize_model(model, bits=bits)
    for variant, decode in (("LUT (forced)", "always"), ("default", "auto")):
        path = os.path.join(work, f"{decode}.tflite")
        result = tflite_export.export(q, path, representative_data=data, target=target,
                                      decode=decode)
        rows.append(row(variant, bits, result, path))
    path = os.path.join(work, "int4.tflite")
    result, notes = _int4_export(model, data, target, path)
    rows.append(row("int4", 4, result, path, notes))
    budget = rows[1].file_bytes  # the LUT (forced) file
    path = os.path.join(work, "planned.tflite")
    result, notes = _planned_export(model, data, target, budget, path)
    rows.append(row("planned", "plan", result, path, notes))
    return rows


def _planned_export(model, data, target, budget, path):
    """The planned row's export at `budget` bytes: `(result, notes)`."""
    import lutq_tf
    import tflite_export

    folded, folds = lutq_tf.fold_batchnorm(model)
    plan = tflite_export.plan_budget(folded, budget, data, target=target)
    print(plan, flush=True)
    counts = {}
    for r in plan.layers:
        counts[r.representation] = counts.get(r.representation, 0) + 1
    notes = [f"plan for {budget:,} B: " + ", ".join(
        f"{n} {kind}" for kind, n in sorted(counts.items()))
        + f", estimate {plan.estimate_bytes:,} B"]
    if folds:
        notes.append(f"{len(folds)} batch norm(s) folded")
    q = lutq_tf.quantize_model(folded, **plan)
    return tflite_export.export(q, path, representative_data=data,
                                **plan.export_options()), notes


def _agreement_text(r):
    where = "" if r.inputs == "random" else f" on {r.inputs}"
    if r.float_top1 is not None:
        return f"top-1 {100 * r.float_top1:.1f} %{where}"
    return "exact" if r.float_snr_db is None else f"SNR {r.float_snr_db:.1f} dB{where}"


def markdown(rows, command, seconds, target):
    from tflite_export.device import target as targets

    profile = targets.get(target)
    unpack = ", which CMSIS-NN does not allocate" if profile.kernels == "cmsis-nn" else ""
    real = {r.model: r.inputs for r in rows if r.inputs != "random"}
    real_calibration = real_agreement = ""
    if real:
        real_calibration = (f" ({', '.join(real)}: {_SAMPLES} training images of the set "
                            "they are evaluated on)")
        real_agreement = " (" + "; ".join(f"{m}: on {inputs}" for m, inputs in real.items()) + ")"
    lines = [
        f"# Exports on the device ({profile.name})",
        "",
        f"`{command}` ({seconds / 60:.1f} min). Estimates from the profile "
        f"`{profile.name}` ({profile.kernels} kernels; {profile.provenance}). "
        "LUT rows: dictionaries fitted to the weights by k-means, one per tensor. "
        "*int4*: batch norms folded (`lutq_tf.fold_batchnorm`), 4-bit "
        "`constraint=\"int4\"` dictionaries fitted by k-means per output channel "
        "(per tensor for Dense and where a channel holds fewer than 16 weights), "
        "exported with `int4=\"always\"` and `weight_quantization=\"dense_per_tensor\"`. "
        f"No fine-tuning; calibration on {_SAMPLES} random inputs{real_calibration}. "
        "*firmware*: "
        "firmware flash change against the int8 row's file (file change plus the "
        "code the file links: DECODE once); *report*: `result.device.flash_change`, "
        "against the export's own int8 twin (the same when both are slimmed alike). "
        "*arena*: an upper bound for a 32-bit Cortex-M build "
        "with the profile's kernel set (the wheel's activations and scratch, its "
        "persistent data recomputed for 32-bit pointers, plus CMSIS-NN's largest "
        "scratch buffer; `firmware.arena`; for CMSIS-NN, without the reference kernels' "
        "int4 unpack buffers, which CMSIS-NN's s4 kernels do not allocate: the wheel's "
        "figures are those of the file with its int4 filters stored int8; *ref. scratch* "
        "is the largest reference-kernel scratch buffer, for int4 files the largest "
        "unpack buffer); *host arena*: "
        "the smallest arena on the x86-64 tflite-micro wheel (reference kernels). "
        "*decode*: instructions per inference decoding the weights; *int4 instr.*: "
        "the int4 kernels' extra instructions over int8; shares are of the int8 "
        "model's MAC instructions. *int8 weights*: filter weights left int8. "
        "*vs float*: TFLM against the float Keras model on the random inputs"
        f"{real_agreement} "
        "(top-1 for classifiers, SNR otherwise). *default* is what `export(..., "
        f"target=\"{profile.name}\")` writes; *LUT (forced)* is `decode=\"always\"`; "
        "*planned* is `plan_budget(..., target=...)` for the LUT (forced) file's bytes "
        "(batch norms folded; Fisher weights from the outputs of the calibration inputs), "
        "quantised with `quantize_model(**plan)` and exported with "
        "`plan.export_options()`.",
        "",
        "| model | variant | bits | file | firmware | report | arena "
        "| host arena | decode ops | decode instr. | share | int4 ops | int4 instr. | share "
        "| int8 weights | ref. scratch | paths | bit-exact | vs float |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        paths = ", ".join(f"{p} x{n}" for p, n in sorted(r.paths.items())) or "-"
        lines.append(
            f"| {r.model} | {r.variant} | {r.bits} | {r.file_bytes:,} "
            f"| {r.firmware_change:+,} | {r.flash_change:+,} "
            f"| {r.arena_bytes:,} | {r.host_arena_bytes:,} "
            f"| {r.decode_ops} "
            f"| {r.decode_instructions:,.0f} | {100 * r.decode_share:.1f} % "
            f"| {r.int4_ops} | {r.int4_instructions:,.0f} | {100 * r.int4_share:.1f} % "
            f"| {r.int8_weights:,} | {r.reference_scratch:,} | {paths} "
            f"| {'yes' if r.bit_exact else 'NO'} "
            f"| {_agreement_text(r)} |"
        )
    lines += ["", "Verdicts of the default exports:", ""]
    lines += [f"- {r.model}: {r.verdict}" for r in rows if r.variant == "default"]
    lines += ["", "The int4 exports:", ""]
    lines += [
        f"- {r.model}: {r.int4_weights:,} weights int4 in {r.int4_ops} op(s), "
        f"{r.int8_weights:,} left int8; firmware {r.firmware_change:+,} B against the "
        f"int8 row ({r.flash_change:+,} B against its own int8 twin); arena "
        f"{r.arena_bytes - r.int8_arena_bytes:+,} B against int8 "
        f"(`result.device.arena_bytes`; the reference kernels' largest unpack buffer "
        f"{r.reference_scratch:,} B{unpack}); "
        f"{_agreement_text(r)} against float Keras."
        + "".join(f" {n[0].upper()}{n[1:]}." for n in r.notes)
        for r in rows if r.variant == "int4"
    ]
    planned = [r for r in rows if r.variant == "planned"]
    if planned:
        lines += ["", "The planned exports:", ""]
        lines += [
            f"- {r.model}: " + "; ".join(r.notes) + f"; firmware {r.firmware_change:+,} B "
            f"against the int8 row, arena {r.arena_bytes - r.int8_arena_bytes:+,} B, "
            f"instructions +{100 * (r.decode_share + r.int4_share):.1f} % "
            f"({r.decode_ops} DECODE, {r.int4_ops} int4 op(s)); "
            f"{_agreement_text(r)} against float Keras."
            for r in planned]
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
    unknown = [name for name in f.models if name not in MODELS]
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; known: {list(MODELS)}")
    real = real_images(f.cifar10, f.agreement_images)
    rows = []
    for name in f.models:
        with tempfile.TemporaryDirectory() as work:
            rows += run_model(name, f.models_dir, f.target, work, real.get(name))
        _write(f.out, rows, command, time.time() - start, f.target)
    print(markdown(rows, command, time.time() - start, f.target))


if __name__ == "__main__":
    define_flags()
    app.run(main)
