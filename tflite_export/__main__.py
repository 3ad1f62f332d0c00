"""Command line: export a saved LUT-Q Keras model to a TFLM .tflite file.

    python -m tflite_export MODEL --out model.tflite [--quantize int8]
        [--representative data.npy] [--c_array model_data.cc] [--noslim]
        [--shared_tables auto|true|false]

MODEL is a `.keras` file or an HDF5 `.h5` file, also one saved by tf.keras
2.x (loaded by `lutq_tf.load_model`). Prints the export report as a table.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

_OUT = flags.DEFINE_string(
    "out", None, "The .tflite file to write (default: MODEL with .tflite)."
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "int8", ["int8", "float32"], "Full-integer int8, or float32."
)
_REPRESENTATIVE = flags.DEFINE_string(
    "representative", None,
    ".npy file of typical inputs, shape (N, ...input shape); needed for int8.",
)
_C_ARRAY = flags.DEFINE_string(
    "c_array", None, "Also write the model as a C array to this .cc (and .h)."
)
_IO_DTYPE = flags.DEFINE_enum(
    "io_dtype", None, ["int8", "float32"],
    "Model input/output type (default: the --quantize type).",
)
_WEIGHT_QUANTIZATION = flags.DEFINE_enum(
    "weight_quantization", "auto",
    ["auto", "per_channel", "dense_per_tensor", "per_tensor"],
    "int8 weight quantisation of the converter.",
)
_VERIFY = flags.DEFINE_bool(
    "verify", True, "Verify on TFLM (bit-exact vs uncompressed) and vs Keras."
)
_SLIM = flags.DEFINE_bool(
    "slim", True,
    "Remove what TFLM never reads (names, metadata, zero-point arrays, ...); "
    "each step kept only if TFLM's outputs stay bit-identical.",
)
_SHARED_TABLES = flags.DEFINE_enum(
    "shared_tables", "auto", ["auto", "true", "false"],
    "One value table for all channels of a tensor whose channels share a "
    "dictionary (auto: unless it agrees less with Keras than plain int8).",
)
_MIN_AGREEMENT = flags.DEFINE_float(
    "min_agreement", None, "Fail if top-1 agreement with Keras is lower."
)


def main(argv):
    # absl turns on INFO logging, which TF and the converter flood.
    logging.set_verbosity(logging.WARNING)
    if len(argv) != 2:
        raise app.UsageError("give exactly one MODEL path (.keras or .h5)")
    model_path = argv[1]
    if not os.path.isfile(model_path):
        raise app.UsageError(f"no such model file: {model_path}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np

    # Registers the LUT-Q layers, and loads tf.keras 2.x .h5 files too.
    import lutq_tf
    import tflite_export

    try:
        # Uncompiled: the export needs no optimizer, and a tf.keras 2.x
        # training config may not compile in Keras 3.
        model = lutq_tf.load_model(model_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = np.load(_REPRESENTATIVE.value) if _REPRESENTATIVE.value else None
    out = _OUT.value or os.path.splitext(model_path)[0] + ".tflite"
    try:
        result = tflite_export.export(
            model,
            out,
            representative_data=data,
            quantize=_QUANTIZE.value,
            verify=_VERIFY.value,
            c_array=_C_ARRAY.value,
            io_dtype=_IO_DTYPE.value,
            weight_quantization=_WEIGHT_QUANTIZATION.value,
            min_agreement=_MIN_AGREEMENT.value,
            slim=_SLIM.value,
            shared_tables={"auto": "auto", "true": True, "false": False}[
                _SHARED_TABLES.value
            ],
        )
    except (ValueError, TypeError, ImportError, tflite_export.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.table())
    return 0


if __name__ == "__main__":
    app.run(main)
