"""File size and TFLM arena of LUT-compressed exports vs the uncompressed baseline.

Builds a small CNN (conv-bn, depthwise, pointwise, dense) whose kernels hold
K values per tensor or per output channel, exports it with `tflite_export`
for several K, and prints bytes and arena against the int8 / float32
baseline. The weights are random draws from the dictionaries: this measures
storage, not accuracy.

    python -m benchmarks.export_size [--k 2,4,16,64] [--quantize int8,float32]
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_K = flags.DEFINE_list("k", ["2", "4", "16", "64"], "Dictionary sizes K.")
_QUANTIZE = flags.DEFINE_list("quantize", ["int8", "float32"], "Export types.")


def _model(k, per_channel, seed=0):
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(32, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.Conv2D(64, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(128, activation="relu", name="fc")(x)
    out = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inp, out)
    for layer in model.layers:
        if not hasattr(layer, "kernel"):
            continue
        w = layer.kernel.numpy()
        # Tables along the output channel ([..., in, mult] flattened for dw).
        flat = w.reshape(-1, w.shape[-2] * w.shape[-1]) if layer.name == "dw" else w.reshape(-1, w.shape[-1])
        columns = flat.shape[1] if per_channel else 1
        tables = flat.reshape(-1, columns) if per_channel else flat.reshape(-1, 1)
        for c in range(columns):
            d = np.linspace(-1, 1, k) * rng.uniform(0.1, 0.5)
            tables[:, c] = d[rng.integers(0, k, tables.shape[0])]
        layer.kernel.assign(tables.reshape(w.shape))
    data = rng.normal(size=(64, 16, 16, 3)).astype("float32")
    return model, data


def main(argv):
    # absl turns on INFO logging, which TF and the converter flood.
    logging.set_verbosity(logging.WARNING)
    del argv
    import tflite_export

    header = ("quantize", "dict", "K", "baseline", "compressed", "ratio",
              "arena", "arena (uncompressed)", "compressed tensors")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in _QUANTIZE.value:
            for per_channel in (False, True):
                for k in map(int, _K.value):
                    model, data = _model(k, per_channel)
                    try:
                        r = tflite_export.export(
                            model, os.path.join(tmp, "m.tflite"),
                            representative_data=data, quantize=quantize,
                        )
                    except tflite_export.ExportError as e:
                        rows.append((quantize, "channel" if per_channel else "tensor",
                                     str(k), "-", "-", "-", "-", "-",
                                     "error: " + str(e).split(":")[0]))
                        continue
                    rows.append((
                        quantize, "channel" if per_channel else "tensor", str(k),
                        str(r.baseline_bytes), str(r.size_bytes), f"{r.ratio:.2f}x",
                        str(r.arena_bytes), str(r.baseline_arena_bytes),
                        f"{len(r.compressed_tensors)}/{len(r.tensors)}",
                    ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    app.run(main)
