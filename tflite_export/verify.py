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
        task: `"classification"` (Keras outputs are probabilities: top-1
            is the figure that matters) or `"regression"` (judge by
            `relative_error` and `snr_db`).
        relative_error: max |TFLM - Keras| over the range of Keras' outputs.
        snr_db: 10 log10(sum Keras^2 / sum (TFLM - Keras)^2).
        int8_top1_agreement: The same figure for the converter's plain int8
            model, when the written model was requantised (shared tables),
            else None.
        int8_max_abs_diff: Likewise for `max_abs_diff`.
    """

    samples: int
    inputs: str
    bit_exact: bool
    top1_agreement: object
    max_abs_diff: float
    output_step: object = None
    task: str = "classification"
    relative_error: float = 0.0
    snr_db: float = float("inf")
    int8_top1_agreement: object = None
    int8_max_abs_diff: object = None

    @property
    def worse_than_int8(self):
        """Whether the requantised model agrees less with Keras than plain int8."""
        if self.int8_max_abs_diff is None:
            return False
        if self.task == "classification" and self.top1_agreement is not None:
            return self.top1_agreement < self.int8_top1_agreement
        return self.max_abs_diff > self.int8_max_abs_diff

    def describe(self):
        """One line: bit-exactness and agreement with Keras, fit to the task."""
        text = (
            f"Verified on {self.samples} {self.inputs.replace('_', ' ')} inputs: "
            "compressed == uncompressed on TFLM: "
            f"{'bit-exact' if self.bit_exact else 'DIFFERENT'}; vs Keras: "
        )
        diff = f"max |diff| {self.max_abs_diff:.4g}"
        if self.output_step:
            diff += f" ({self.max_abs_diff / self.output_step:.1f} output steps)"
        if self.task == "classification" and self.top1_agreement is not None:
            text += f"top-1 agreement {self.top1_agreement:.2%}, {diff}"
        else:
            text += (
                f"{diff}, {self.relative_error:.2%} of the output range, "
                f"SNR {self.snr_db:.1f} dB"
            )
        if self.int8_max_abs_diff is not None:
            text += " (plain int8: " + (
                f"top-1 {self.int8_top1_agreement:.2%}, "
                if self.int8_top1_agreement is not None
                and self.task == "classification"
                else ""
            ) + f"max |diff| {self.int8_max_abs_diff:.4g})"
        return text


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


# Arena for probe runs: generous, as the probe only compares outputs.
_PROBE_ARENAS = (16 << 20, 256 << 20)


def probe_outputs(model_bytes, samples=3):
    """TFLM's raw outputs on fixed pseudo-random inputs, as bytes.

    Used to check that a rewrite of the flatbuffer (slimming) leaves every
    output bit-identical.
    """
    _, runtime, _ = tflm.require()
    for arena in _PROBE_ARENAS:
        try:
            interpreter = runtime.Interpreter.from_bytes(
                bytes(model_bytes), arena_size=arena
            )
            break
        except RuntimeError:
            if arena == _PROBE_ARENAS[-1]:
                raise
    details = interpreter.get_input_details(0)
    dtype = np.dtype(details["dtype"])
    rng = np.random.default_rng(0)
    outputs = []
    for _ in range(samples):
        if dtype.kind == "f":
            x = rng.standard_normal(details["shape"]).astype(dtype)
        else:
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max + 1, details["shape"]).astype(dtype)
        interpreter.set_input(x, 0)
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_output(0)).tobytes())
    return b"".join(outputs)


def _agreement(real, expected):
    """`(top-1 agreement or None, max |diff|)` of TFLM against Keras."""
    real = real.reshape(expected.shape)
    top1 = None
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        top1 = float(np.mean(np.argmax(real, -1) == np.argmax(expected, -1)))
    return top1, float(np.max(np.abs(real - expected)))


def _is_probabilities(expected):
    return (
        expected.ndim >= 2
        and expected.shape[-1] > 1
        and np.all(expected >= 0)
        and np.allclose(expected.sum(-1), 1.0, atol=1e-3)
    )


def verify(compressed, baseline, keras_model, inputs, arena, baseline_arena,
           input_source="representative_data", min_agreement=None,
           plain_int8=None):
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
        plain_int8: The converter's own int8 model, when `baseline` was
            requantised from it: its agreement with Keras is measured too.

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
    top1, max_diff = _agreement(real, expected)
    error = real.reshape(expected.shape) - expected
    span = float(expected.max() - expected.min())
    noise = float(np.sum(error**2))
    step = None
    if np.dtype(details["dtype"]).kind != "f":
        step = float(details["quantization_parameters"]["scales"][0])
    result = Verification(
        samples=len(inputs),
        inputs=input_source,
        bit_exact=True,
        top1_agreement=top1,
        max_abs_diff=max_diff,
        output_step=step,
        task="classification" if _is_probabilities(expected) else "regression",
        relative_error=max_diff / span if span > 0 else 0.0,
        snr_db=(
            10 * np.log10(float(np.sum(expected**2)) / noise)
            if noise > 0
            else float("inf")
        ),
    )
    if plain_int8 is not None:
        _, plain_real, _ = run_tflm(plain_int8, inputs, baseline_arena + _ARENA_MARGIN)
        result.int8_top1_agreement, result.int8_max_abs_diff = _agreement(
            plain_real, expected
        )
    if min_agreement is not None and top1 is not None and top1 < min_agreement:
        raise VerificationError(
            f"TFLM and Keras agree on the top-1 class for {top1:.1%} of the "
            f"inputs, below min_agreement={min_agreement:.1%}. Nothing was "
            "written. Give more representative data for calibration, or "
            "check the model."
        )
    return result
