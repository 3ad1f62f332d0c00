"""Converts a plain Keras model to a .tflite flatbuffer with TF's converter.

Keras 3 models go through a SavedModel (`model.export`) with a static
batch-1 signature: `from_concrete_functions` leaves Keras 3 variables as
resource reads that calibration cannot run, and a static shape lets the
converter fold the shape arithmetic (e.g. of Flatten or Conv2DTranspose)
into constants, so TFLM needs no SHAPE/PACK ops.
"""

import re
import tempfile

import numpy as np
import tensorflow as tf

from tflite_export.errors import ExportError

QUANTIZE_MODES = ("int8", "float32")

# Weight quantisation of the int8 converter. TF 2.21 quantises CONV_2D,
# DEPTHWISE_CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED weights per channel
# by default; these private converter flags switch FULLY_CONNECTED only, or
# everything, to per tensor. They are converter-wide, not per layer.
WEIGHT_QUANTIZATION = {
    "per_channel": {},
    "dense_per_tensor": {
        "_experimental_disable_per_channel_quantization_for_dense_layers": True
    },
    "per_tensor": {"_experimental_disable_per_channel": True},
}

# Calibration sees at most this many samples; more rarely moves the ranges.
_MAX_CALIBRATION_SAMPLES = 1000


def check_model(model):
    """Checks that the exporter can take the model.

    Args:
        model: The plain Keras model.

    Raises:
        TypeError: Not a Keras model.
        ValueError: Not one float input and one output.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model must be a keras.Model, got {type(model).__name__}."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            "model must be a built functional or Sequential model with a "
            "known input shape (e.g. built with keras.Input)."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"model has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; tflite_export takes models with one input and one output."
        )
    dtype = np.dtype(model.inputs[0].dtype)
    if dtype.kind != "f":
        raise ValueError(
            f"model input is {dtype.name}; tflite_export takes float inputs."
        )


def check_representative_data(model, data, quantize):
    """Validates `representative_data` against the model input.

    Args:
        model: The Keras model (one input).
        data: Array-like of shape `(N,) + input shape`, floating point, or
            None.
        quantize: `"int8"` or `"float32"`.

    Returns:
        A float32 array, or None.

    Raises:
        ValueError: Missing for int8, or wrong shape, dtype or values.
    """
    expected = tuple(model.inputs[0].shape[1:])
    shown = "(N, " + ", ".join("?" if d is None else str(d) for d in expected) + ")"
    if data is None:
        if quantize == "int8":
            raise ValueError(
                "quantize='int8' needs representative_data: an array of "
                f"typical model inputs of shape {shown} (a few hundred "
                "training samples) to calibrate the activation ranges. "
                "Pass it, or export with quantize='float32'."
            )
        return None
    array = np.asarray(data)
    if array.dtype.kind not in "f":
        raise ValueError(
            f"representative_data must be floating point like the model "
            f"input, got dtype {array.dtype}. Convert it the way the model "
            "was fed in training, e.g. data.astype('float32') / 255."
        )
    shape_ok = array.ndim == len(expected) + 1 and all(
        e is None or e == a for e, a in zip(expected, array.shape[1:])
    )
    if not shape_ok or array.shape[0] < 1:
        raise ValueError(
            f"representative_data has shape {array.shape}, but the model "
            f"takes inputs of shape {shown}: pass a batch of at least one "
            "sample."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("representative_data holds NaN or infinite values.")
    return array.astype(np.float32)


def input_shape(model, data):
    """The static batch-1 input shape to convert with."""
    shape = [1] + list(model.inputs[0].shape[1:])
    for i, dim in enumerate(shape[1:], start=1):
        if dim is None:
            if data is None:
                raise ValueError(
                    f"model input has an unknown dimension {i}; pass "
                    "representative_data so the exporter knows its size "
                    "(TFLM needs static shapes)."
                )
            shape[i] = int(data.shape[i])
    return tuple(shape)


def _conversion_error(e):
    """Turns a converter failure into a short message naming the ops."""
    text = str(e)
    keep = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"error:|TF Select ops|not supported", line)
    ]
    detail = "\n  ".join(keep[:8]) if keep else text[-1500:]
    return ExportError(
        "TF's TFLite converter cannot convert this model to builtin TFLite "
        "ops (TFLM runs builtin ops only; TF Select/Flex ops are not "
        "available on microcontrollers). Replace or remove the layers using "
        f"these ops:\n  {detail}"
    )


def convert(model, quantize, data, io_dtype=None, weight_quantization="per_channel"):
    """Converts a plain Keras model to a .tflite flatbuffer.

    Args:
        model: Plain Keras model (one float input, one output).
        quantize: `"int8"` (full integer) or `"float32"`.
        data: float32 representative inputs (required for int8), or None.
        io_dtype: For int8, `"int8"` (default) or `"float32"` model input and
            output. Ignored for float32.
        weight_quantization: For int8, a key of `WEIGHT_QUANTIZATION`.

    Returns:
        The flatbuffer, as bytes.

    Raises:
        ExportError: The converter failed.
    """
    shape = input_shape(model, data)
    dtype = tf.as_dtype(np.dtype(model.inputs[0].dtype).name)
    with tempfile.TemporaryDirectory(prefix="tflite_export_") as saved:
        try:
            model.export(
                saved,
                format="tf_saved_model",
                verbose=False,
                input_signature=[tf.TensorSpec(shape, dtype)],
            )
        except Exception as e:
            raise ExportError(
                f"Keras could not export the model as a SavedModel: {e}"
            ) from e
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if quantize == "int8":
            samples = data[:_MAX_CALIBRATION_SAMPLES]

            def representative_dataset():
                for i in range(len(samples)):
                    yield [samples[i : i + 1]]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io = tf.int8 if (io_dtype or "int8") == "int8" else tf.float32
            converter.inference_input_type = io
            converter.inference_output_type = io
            for flag, value in WEIGHT_QUANTIZATION[weight_quantization].items():
                setattr(converter, flag, value)
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return bytes(converter.convert())
        except Exception as e:
            raise _conversion_error(e) from e
