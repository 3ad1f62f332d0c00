"""Checks that the exported model computes what it should.

Two checks: the compressed model and its uncompressed twin must give
bit-identical outputs on TFLM (DECODE must restore every weight exactly);
and the TFLM outputs, dequantised, are compared with the Keras model's
(top-1 agreement and largest absolute difference), which measures what the
int8 conversion itself costs.
"""

import dataclasses

import numpy as np

from tflite_export import tflm
from tflite_export.errors import VerificationError

# The arena given to verification on top of the measured minimum.
_ARENA_MARGIN = 4096


@dataclasses.dataclass
class Verification:
    """Figures of the verification.

    Attributes:
        samples: Number of inputs run.
        inputs: `"representative_data"` or `"random"` (float32 without data).
        bit_exact: Compressed and uncompressed outputs are identical.
        top1_agreement: Fraction of inputs where the TFLM model and Keras
            pick the same class (argmax of the last axis), or None for
            outputs with one value per sample.
        max_abs_diff: Largest |TFLM - Keras| over all outputs, dequantised.
        output_step: The output quantisation step (int8 output), else None.
    """

    samples: int
    inputs: str
    bit_exact: bool
    top1_agreement: object
    max_abs_diff: float
    output_step: object = None


def _quantize(x, details):
    """Float inputs to the model's input type."""
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    q = details["quantization_parameters"]
    scale, zero = float(q["scales"][0]), int(q["zero_points"][0])
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(y, details):
    if np.dtype(details["dtype"]).kind == "f":
        return y.astype(np.float64)
    q = details["quantization_parameters"]
    scale, zero = float(q["scales"][0]), int(q["zero_points"][0])
    return (y.astype(np.float64) - zero) * scale


def run_tflm(model_bytes, inputs, arena_size):
    """Runs a one-input, one-output model on TFLM, one sample at a time.

    Args:
        model_bytes: The .tflite flatbuffer.
        inputs: float32 array `(N,) + input shape`.
        arena_size: Arena bytes (must be enough: too small can crash).

    Returns:
        `(raw, real, details)`: the raw outputs `(N,) + output shape`, the
        same dequantised to float64, and TFLM's output tensor details.
    """
    _, runtime, _ = tflm.require()
    interpreter = runtime.Interpreter.from_bytes(bytes(model_bytes), arena_size=arena_size)
    input_details = interpreter.get_input_details(0)
    output_details = interpreter.get_output_details(0)
    shape = tuple(input_details["shape"])
    raw = []
    for x in inputs:
        # TFLM keeps no input between invokes: set it every time.
        interpreter.set_input(_quantize(x.reshape(shape), input_details), 0)
        interpreter.invoke()
        raw.append(np.array(interpreter.get_output(0), copy=True))
    raw = np.stack(raw)
    return raw, _dequantize(raw, output_details), output_details


def verify(compressed, baseline, keras_model, inputs, arena, baseline_arena,
           input_source="representative_data", min_agreement=None):
    """Runs both models on TFLM and compares them with each other and Keras.

    Args:
        compressed: The compressed flatbuffer.
        baseline: Its uncompressed twin.
        keras_model: The plain Keras model that was converted.
        inputs: float32 inputs `(N,) + input shape`.
        arena: Arena bytes the compressed model needs.
        baseline_arena: Arena bytes the uncompressed model needs.
        input_source: Where the inputs came from, for the report.
        min_agreement: If set, the lowest acceptable top-1 agreement.

    Returns:
        A `Verification`.

    Raises:
        VerificationError: The outputs differ, or agreement is too low.
    """
    raw, real, details = run_tflm(compressed, inputs, arena + _ARENA_MARGIN)
    if bytes(compressed) == bytes(baseline):  # nothing was compressed
        twin = raw
    else:
        twin, _, _ = run_tflm(baseline, inputs, baseline_arena + _ARENA_MARGIN)
    bit_exact = raw.shape == twin.shape and np.array_equal(raw, twin)
    if not bit_exact:
        differing = int(np.sum(np.any((raw != twin).reshape(len(raw), -1), axis=1)))
        raise VerificationError(
            f"The compressed model's outputs differ from its uncompressed "
            f"twin's on {differing} of {len(raw)} inputs: TFLM's DECODE did "
            "not restore the weights exactly. Nothing was written."
        )
    expected = np.asarray(
        keras_model.predict(inputs, batch_size=64, verbose=0), dtype=np.float64
    )
    real = real.reshape(expected.shape)
    top1 = None
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        top1 = float(np.mean(np.argmax(real, -1) == np.argmax(expected, -1)))
    step = None
    if np.dtype(details["dtype"]).kind != "f":
        step = float(details["quantization_parameters"]["scales"][0])
    result = Verification(
        samples=len(inputs),
        inputs=input_source,
        bit_exact=True,
        top1_agreement=top1,
        max_abs_diff=float(np.max(np.abs(real - expected))),
        output_step=step,
    )
    if min_agreement is not None and top1 is not None and top1 < min_agreement:
        raise VerificationError(
            f"TFLM and Keras agree on the top-1 class for {top1:.1%} of the "
            f"inputs, below min_agreement={min_agreement:.1%}. Nothing was "
            "written. Give more representative data for calibration, or "
            "check the model."
        )
    return result
