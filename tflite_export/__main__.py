"""Command line: export a saved LUT-Q Keras model to a TFLM .tflite file.

    python -m tflite_export MODEL --out model.tflite [--quantize int8]
        [--representative data.npy|data.npz] [--c_array model_data.cc]
        [--noslim] [--shared_tables auto|true|false]
        [--max_decode_bytes N | --ram_bytes N]
        [--target cortex-m4-cmsis-nn|profile.json [--decode auto|always]]
        [--int4 auto|always]

Flags that the export would ignore in the combination given (e.g.
--weight_quantization with --quantize float32, --min_agreement with
--noverify, --decode without --target) are errors, as in
`tflite_export.export`.

--target names a device profile (`tflite_export.PROFILES`) or a JSON
file of one (`json.dump(target.to_dict(), f)`: a value ending in .json or
naming a file is read as a file); the report then judges the file on that
device, and with --decode auto (the default) the int8 file is written where
DECODE's code outweighs what compression saves.

MODEL is a `.keras` file or an HDF5 `.h5` file, also one saved by tf.keras
2.x (loaded by `lutq_tf.load_model`). Prints the export report as a table.
"""

import os
import sys
import zipfile

from absl import app
from absl import flags
from absl import logging

from tflite_export.device import target as targets

_OUT = flags.DEFINE_string(
    "out", None, "The .tflite file to write (default: MODEL with .tflite)."
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "int8", ["int8", "float32"], "Full-integer int8, or float32."
)
_REPRESENTATIVE = flags.DEFINE_string(
    "representative", None,
    "Typical inputs; needed for int8 and integer inputs. One input: a .npy "
    "of shape (N, ...input shape). Several: a .npz with one array per input, "
    "named by input name (np.savez(f, name=array, ...)) or in model input "
    "order (np.savez(f, x0, x1, ...)).",
)
_C_ARRAY = flags.DEFINE_string(
    "c_array", None, "Also write the model as a C array to this .cc (and .h)."
)
_IO_DTYPE = flags.DEFINE_enum(
    "io_dtype", None, ["int8", "float32"],
    "Model input/output type (default: the --quantize type).",
)
_WEIGHT_QUANTIZATION = flags.DEFINE_enum(
    "weight_quantization", None,
    ["auto", "per_channel", "dense_per_tensor", "per_tensor"],
    "int8 weight quantisation of the converter (default: auto; int8 only).",
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
    "shared_tables", None, ["auto", "true", "false"],
    "One value table for all channels of a tensor whose channels share a "
    "dictionary (default auto: unless it agrees less with Keras than plain "
    "int8; int8 per-channel weights only).",
)
_MAX_DECODE_BYTES = flags.DEFINE_integer(
    "max_decode_bytes", None,
    "Largest decoded kernel in bytes (e.g. 32768): larger Dense/Conv kernels "
    "are split into output-channel groups, others kept int8.",
)
_RAM_BYTES = flags.DEFINE_integer(
    "ram_bytes", None,
    "TFLM arena budget in bytes (e.g. 65536): per kernel, compress, split or "
    "keep int8 for the smallest file whose arena fits; the wheel's arena, or "
    "with --target that target's 32-bit estimate.",
)
_TARGET = flags.DEFINE_string(
    "target", None,
    "Device to judge the file on: a profile name (" + ", ".join(sorted(targets.PROFILES))
    + ") or a JSON profile file (Target.to_dict()). int8 only.",
)
_DECODE = flags.DEFINE_enum(
    "decode", None, ["auto", "always"],
    "With --target: auto (default) writes DECODE ops only where they save "
    "firmware flash, else the int8 file; always writes every compression "
    "that shrinks the file.",
)
_INT4 = flags.DEFINE_enum(
    "int4", None, ["never", "auto", "always"],
    "Native int4 weights (no DECODE) for int4-exact LUT kernels: auto where "
    "no larger than the LUT, always for every LUT kernel (an error names one "
    "that cannot be). Default never.",
)
_MIN_AGREEMENT = flags.DEFINE_float(
    "min_agreement", None,
    "Fail if top-1 agreement with Keras is lower (needs --verify).",
)

_SHARED_CHOICES = {None: None, "auto": "auto", "true": True, "false": False}


def main(argv):
    # absl turns on INFO logging, which TF and the converter flood.
    logging.set_verbosity(logging.WARNING)
    if len(argv) != 2:
        raise app.UsageError("give exactly one MODEL path (.keras or .h5)")
    model_path = argv[1]
    if not os.path.isfile(model_path):
        raise app.UsageError(f"no such model file: {model_path}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    # Registers the LUT-Q layers, and loads tf.keras 2.x .h5 files too.
    import lutq_tf
    import tflite_export
    from tflite_export import exporter

    try:
        target = targets.from_flag(_TARGET.value)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = dict(
        quantize=_QUANTIZE.value,
        verify=_VERIFY.value,
        weight_quantization=_WEIGHT_QUANTIZATION.value,
        min_agreement=_MIN_AGREEMENT.value,
        shared_tables=_SHARED_CHOICES[_SHARED_TABLES.value],
        max_decode_bytes=_MAX_DECODE_BYTES.value,
        ram_bytes=_RAM_BYTES.value,
        target=target,
        decode=_DECODE.value,
        int4=_INT4.value,
    )
    try:
        # export's own check, before the model is loaded.
        exporter.check_combinations(**options)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        # Uncompiled: the export needs no optimizer, and a tf.keras 2.x
        # training config may not compile in Keras 3.
        model = lutq_tf.load_model(model_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyError, OSError, zipfile.BadZipFile) as e:
        # A damaged .keras zip fails with a KeyError or a zip error.
        print(
            f"error: cannot load {model_path} as a Keras model ({e}); "
            "expected a .keras file saved by model.save() or an HDF5 .h5 model.",
            file=sys.stderr,
        )
        return 1
    data = None
    if _REPRESENTATIVE.value:
        try:
            data = load_representative(_REPRESENTATIVE.value, model)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    out = _OUT.value or os.path.splitext(model_path)[0] + ".tflite"
    try:
        result = tflite_export.export(
            model,
            out,
            representative_data=data,
            c_array=_C_ARRAY.value,
            io_dtype=_IO_DTYPE.value,
            slim=_SLIM.value,
            **options,
        )
    except (ValueError, TypeError, ImportError, tflite_export.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.table())
    return 0


def load_representative(path, model):
    """`--representative`: a .npy array, or a .npz of one array per input.

    Args:
        path: The file.
        model: The Keras model (its input names order a .npz).

    Returns:
        An array, or a dict by input name, or a list in input order.

    Raises:
        ValueError: Not a .npy/.npz file of numbers, or arrays that do not
            name the model's inputs.
    """
    import numpy as np

    from tflite_export.pipeline import convert

    flag = f"--representative {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file.")
    try:
        # No pickles: a data file must not run code, and a text or pickle
        # file gets this message instead of numpy's.
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{flag} is not a .npy or .npz file of numbers (write it with "
            f"np.save or np.savez): {e}"
        ) from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    names = [spec.name for spec in convert.input_specs(model, None)] if getattr(
        model, "inputs", None) else []
    if names and set(arrays) == set(names):
        return arrays
    positional = [f"arr_{i}" for i in range(len(arrays))]
    if sorted(arrays) == sorted(positional):
        values = [arrays[key] for key in positional]
        return values[0] if len(values) == 1 else values
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(
        f"{flag} holds arrays {sorted(arrays)}; name them by the model's "
        f"inputs {names} (np.savez(f, name=array, ...)) or save them in input "
        "order (np.savez(f, x0, x1, ...))."
    )


if __name__ == "__main__":
    app.run(main)
