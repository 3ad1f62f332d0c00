"""RAM of LUT-Q exports under a decode limit and under an arena budget.

TFLM decodes each compressed kernel into the arena, so the arena grows by
the largest decoded kernel. This measures `export(max_decode_bytes=...)`
(split layers into output-channel groups) and `export(ram_bytes=...)` (the
exporter's per-kernel choice of compress, split or int8) against the
issue's targets:

- LeNet-5, 2 bits, 32 KB decode limit: arena <= int8 arena + 34 KB, flash
  <= 1.10x the unsplit file, host latency <= 1.2x;
- MLPerf AD autoencoder, 4 bits, 16 KB: arena <= int8 arena + 18 KB, flash
  <= 1.10x;
- digits CNN, 2 bits, 4 KB: arena <= int8 arena + 5 KB.

"int8 arena" is the arena of the unsplit model's uncompressed twin. A
LeNet-5 row at a 40,000 B limit (10 groups, one CONCATENATION) beside the
32 KB row (13 groups, two: a stage of 4, then 10) shows what the stage costs.

LeNet-5 and the digits CNN get a short float training (MNIST from
--mnist, sklearn's digits) so calibration sees real activations; the
dictionaries are fitted by k-means without LUT-Q fine-tuning (sizes and
RAM do not depend on it). AD takes its pretrained weights and 64 random
calibration inputs (there is no data for it here). Every file is verified
bit-exact on TFLM against its own uncompressed (split) twin.

    python -m benchmarks.ram_budget --mnist=../shared/data/mnist.npz \
        --models_dir=../shared/models

Writes `benchmarks/results/ram_budget.json` and `.md`.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

KB = 1024
# model -> (bits, decode limit, allowed arena growth, flash ratio, latency ratio)
TARGETS = {
    "LeNet-5": (2, 32 * KB, 34 * KB, 1.10, 1.2),
    "AD": (4, 16 * KB, 18 * KB, 1.10, None),
    "digits CNN": (2, 4 * KB, 5 * KB, None, None),
}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def define_flags():
    flags.DEFINE_string("mnist", "../shared/data/mnist.npz",
                        "MNIST .npz for LeNet-5 (skipped if missing).")
    flags.DEFINE_string("models_dir", "../shared/models",
                        "Folder with mlperf_tiny_ad01.h5 (AD skipped if missing).")
    flags.DEFINE_list("models", list(TARGETS), "Models to run.")
    flags.DEFINE_string("out", os.path.join(RESULTS, "ram_budget"),
                        "Output path without extension (.json and .md).")


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    bits: int
    budget: str
    limit: int
    bytes: int
    unsplit_bytes: int
    arena: int
    int8_arena: int
    twin_arena: int
    unsplit_arena: int
    decode_buffer: int
    latency_us: float
    unsplit_latency_us: float
    splits: str
    bit_exact: bool
    agreement: str
    targets: str


def _lenet(path):
    import numpy as np

    from experiments import datasets
    from experiments import models

    (x, y), (x_test, _) = datasets.load_mnist(path, limit=12000)
    model = models.lenet()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    return model, np.asarray(x_test[:200])


def _digits():
    import numpy as np

    from experiments import datasets
    from experiments import models

    (x, y), (x_test, _) = datasets.load_digits()
    model = models.digits_cnn()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    return model, np.asarray(x_test[:200])


def _ad(models_dir):
    import numpy as np

    import lutq_tf

    model = lutq_tf.load_model(os.path.join(models_dir, "mlperf_tiny_ad01.h5"))
    return model, np.random.default_rng(0).standard_normal((64, 640)).astype(np.float32)


def _row(name, variant, bits, result, budget, target):
    ram = result.ram
    growth = ram.arena_bytes - ram.int8_arena_bytes
    checks = []
    if target is not None:
        _, _, headroom, flash, speed = target
        checks.append(f"arena +{growth:,} <= +{headroom:,}: "
                      + ("met" if growth <= headroom else "MISSED"))
        ratio = ram.size_bytes / ram.unsplit_size_bytes
        if flash:
            checks.append(f"flash {ratio:.3f}x <= {flash}x: "
                          + ("met" if ratio <= flash else "MISSED"))
        if speed and ram.latency_us is not None:
            lat = ram.latency_us / ram.unsplit_latency_us
            checks.append(f"latency {lat:.2f}x <= {speed}x: "
                          + ("met" if lat <= speed else "MISSED"))
    v = result.verification
    if v.task == "classification" and v.top1_agreement is not None:
        agreement = f"top-1 {v.top1_agreement:.1%}"
    else:
        agreement = f"SNR {v.snr_db:.1f} dB"
    splits = ", ".join(
        f"{c.layer} {c.choice}" + (f" x{c.groups}" if c.choice == "split" else "")
        + (f" ({ram.concat_ops[c.layer]} concat)" if c.layer in ram.concat_ops else "")
        for c in ram.choices if c.choice != "compress"
    ) or "none"
    return Row(
        model=name, variant=variant, bits=bits, budget=budget, limit=ram.limit,
        bytes=result.size_bytes, unsplit_bytes=ram.unsplit_size_bytes,
        arena=ram.arena_bytes, int8_arena=ram.int8_arena_bytes,
        twin_arena=ram.twin_arena_bytes, unsplit_arena=ram.unsplit_arena_bytes,
        decode_buffer=ram.decode_buffer_bytes,
        latency_us=ram.latency_us or 0.0,
        unsplit_latency_us=ram.unsplit_latency_us or 0.0,
        splits=splits, bit_exact=bool(v.bit_exact), agreement=agreement,
        targets="; ".join(checks),
    )


def run_model(name, work):
    import lutq_tf
    import tflite_export

    f = flags.FLAGS
    if name == "LeNet-5":
        if not os.path.isfile(f.mnist):
            print(f"skipping {name}: no {f.mnist}")
            return []
        model, data = _lenet(f.mnist)
    elif name == "AD":
        if not os.path.isfile(os.path.join(f.models_dir, "mlperf_tiny_ad01.h5")):
            print(f"skipping {name}: no AD model in {f.models_dir}")
            return []
        model, data = _ad(f.models_dir)
    else:
        model, data = _digits()
    target = TARGETS[name]
    bits, limit, headroom = target[:3]
    q = lutq_tf.quantize_model(model, bits=bits)
    # AD's random inputs make agreement a coin toss: keep shared tables for
    # size, as the flash benchmark does (bit-exactness is still checked).
    options = {"shared_tables": True} if name == "AD" else {}
    path = os.path.join(work, "m.tflite")
    rows = []
    result = tflite_export.export(q, path, representative_data=data,
                                  max_decode_bytes=limit, **options)
    print(result.table(), flush=True)
    rows.append(_row(name, "max_decode_bytes", bits, result, f"{limit:,} B", target))
    if name == "LeNet-5":
        flat = tflite_export.export(q, path, representative_data=data,
                                    max_decode_bytes=40000, **options)
        rows.append(_row(name, "max_decode_bytes (10 groups, flat)", bits, flat,
                         "40,000 B", None))
    budget = result.ram.int8_arena_bytes + headroom
    chosen = tflite_export.export(q, path, representative_data=data,
                                  ram_bytes=budget, **options)
    print(chosen.table(), flush=True)
    row = _row(name, "ram_bytes", bits, chosen, f"{budget:,} B", None)
    row.targets = (f"arena {chosen.ram.arena_bytes:,} <= {budget:,}: "
                   + ("met" if chosen.ram.arena_bytes <= budget else "MISSED"))
    rows.append(row)
    return rows


def markdown(rows, command, seconds):
    lines = [
        "# RAM: decode buffers under a limit",
        "",
        f"`{command}` ({seconds / 60:.1f} min). *int8 arena*: the unsplit "
        "model's uncompressed twin; *twin arena*: the written (split) model's "
        "uncompressed twin; *arena*: the written file's main arena, decode "
        "buffers in it; *unsplit*: the same LUT-Q model exported without a "
        "limit. Latency: TFLM's reference kernels on this host (Python "
        "interpreter), median us per invoke, split and unsplit timed in turn "
        "in one process (- : nothing split, not timed). *ram_bytes* rows: "
        "budget = int8 arena + the target's headroom; the exporter picks the "
        "decode limit and, per kernel, compress, split or int8.",
        "",
        "| model | variant | bits | budget | limit | bytes | unsplit bytes | arena "
        "| int8 arena | twin arena | unsplit arena | decode buf | us | unsplit us "
        "| not just compressed | bit-exact | vs Keras | targets |",
        "| --- | --- | ---: | ---: |" + " ---: |" * 10 + " --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.variant} | {r.bits} | {r.budget} | {r.limit:,} "
            f"| {r.bytes:,} | {r.unsplit_bytes:,} | {r.arena:,} | {r.int8_arena:,} "
            f"| {r.twin_arena:,} | {r.unsplit_arena:,} | {r.decode_buffer:,} "
            f"| {_us(r.latency_us)} | {_us(r.unsplit_latency_us)} | {r.splits} "
            f"| {'yes' if r.bit_exact else 'NO'} | {r.agreement} | {r.targets} |"
        )
    return "\n".join(lines) + "\n"


def _us(value):
    """Latency cell: '-' when nothing was split (not timed)."""
    return f"{value:.0f}" if value else "-"


def _write(out, rows, command, seconds):
    record = {"run": {"command": command, "date": time.strftime("%Y-%m-%d"),
                      "seconds": round(seconds)},
              "rows": [dataclasses.asdict(r) for r in rows]}
    for path, text in ((out + ".json", json.dumps(record, indent=1)),
                       (out + ".md", markdown(rows, command, seconds))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    command = "python -m benchmarks.ram_budget " + " ".join(sys.argv[1:])
    start = time.time()
    rows = []
    for name in f.models:
        if name not in TARGETS:
            raise app.UsageError(f"--models: unknown {name!r}; known: {list(TARGETS)}")
        with tempfile.TemporaryDirectory() as work:
            rows += run_model(name, work)
        _write(f.out, rows, command, time.time() - start)
    print(markdown(rows, command, time.time() - start))


if __name__ == "__main__":
    define_flags()
    app.run(main)
