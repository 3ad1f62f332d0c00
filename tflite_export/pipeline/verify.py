"""Checks that the exported model computes what it should.

Two checks: the compressed model and its uncompressed twin must give
bit-identical outputs on TFLM (DECODE must restore every weight exactly);
and the TFLM outputs, dequantised, are compared with the Keras model's
(top-1 agreement and largest absolute difference), which measures what the
int8 conversion itself costs.
"""

import dataclasses
import math

import numpy as np

from tflite_export.errors import VerificationError
from tflite_export.pipeline import tflm
from tflite_export.pipeline.arena import MARGIN as _ARENA_MARGIN


@dataclasses.dataclass
class Verification:
    """Figures of the verification.

    Attributes:
        samples: Number of inputs run.
        inputs: `"representative_data"` or `"random"` (float32 without data).
        bit_exact: Compressed and uncompressed outputs are identical:
            always True, since `verify` raises rather than return a
            `Verification` for outputs that differ (kept for records).
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
        int8_snr_db: Likewise for `snr_db`.
        discordant: `(only_int8, only_written)`: inputs where only the plain
            int8 model, or only the written one, picks Keras' class (with
            `int8_top1_agreement`), else None.
        name: The output's name (`"output_<i>"`) in a per-output record.
        outputs: For a model with several outputs, one `Verification` per
            output (in Keras order); the figures above are then the worst
            over the outputs (lowest top-1, largest differences). Else [].
        checked_inputs: Inputs of the bit-exact check: the verification
            inputs plus random inputs over the whole input range, which
            exercise every weight.
        note: A caveat, e.g. Keras' outputs did not vary over the inputs.
    """

    samples: int
    inputs: str
    bit_exact: bool
    top1_agreement: float | None
    max_abs_diff: float
    output_step: float | None = None
    task: str = "classification"
    relative_error: float = 0.0
    snr_db: float = float("inf")
    int8_top1_agreement: float | None = None
    int8_max_abs_diff: float | None = None
    int8_snr_db: float | None = None
    discordant: tuple[int, int] | None = None
    name: str = ""
    outputs: list["Verification"] = dataclasses.field(default_factory=list)
    checked_inputs: int = 0
    note: str = ""

    @property
    def worse_than_int8(self) -> bool:
        """Whether the requantised model loses agreement with Keras that
        rounding noise does not explain, against the plain int8 model.

        Requantising (shared tables) rounds each weight once more, by at most
        the half step the int8 conversion itself rounds by. Noise of that
        kind at most doubles the error power, so a regression output loses
        only if its SNR drops by more than `ROUNDING_NOISE_DB` (3 dB). A
        classifier loses only if the inputs where plain int8 alone picks
        Keras' class outnumber the reverse beyond chance (one-sided sign test
        at `SIGNIFICANCE`): near ties flip either way.
        """
        if self.outputs:
            return any(o.worse_than_int8 for o in self.outputs)
        if self.int8_max_abs_diff is None:
            return False
        if self.task == "classification" and self.discordant is not None:
            only_int8, only_written = self.discordant
            return only_int8 > only_written and (
                sign_test(only_int8, only_written) < SIGNIFICANCE
            )
        if self.int8_snr_db is None:
            return self.max_abs_diff > self.int8_max_abs_diff
        return self.snr_db < self.int8_snr_db - ROUNDING_NOISE_DB

    def describe(self) -> str:
        """Bit-exactness and agreement with Keras, fit to the task.

        One line for a one-output model; a line per output after the first
        for several.
        """
        text = (
            f"Verified on {self.samples} {self.inputs.replace('_', ' ')} inputs: "
            "compressed == uncompressed on TFLM: bit-exact; vs Keras: "
        )
        text += self.agreement()
        if self.note:
            text += f"\nNote: {self.note}"
        return text

    def agreement(self) -> str:
        """Agreement with Keras (and plain int8's, for requantised models), as
        text: one line, or a line per output after the first for several."""
        if self.outputs:
            return "per output:\n" + "\n".join(
                f"  {o.name}: {o.output_agreement()}" for o in self.outputs
            )
        return self.output_agreement()

    def output_agreement(self) -> str:
        """`agreement` of one output."""
        text = ""
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
            ) + f"max |diff| {self.int8_max_abs_diff:.4g}" + (
                f", SNR {self.int8_snr_db:.1f} dB"
                if self.int8_snr_db is not None and self.task != "classification"
                else ""
            ) + ")"
        return text


# The shared-tables fallback (`Verification.worse_than_int8`): the SNR drop a
# second rounding of the weights can cause (error power at most doubled), and
# the sign test's level for classifiers.
ROUNDING_NOISE_DB = 10 * math.log10(2)
SIGNIFICANCE = 0.05


def sign_test(only_a, only_b):
    """One-sided sign test: the chance of `only_a` or more of the
    `only_a + only_b` discordant pairs going one way if each is a coin toss."""
    n = only_a + only_b
    return sum(math.comb(n, k) for k in range(only_a, n + 1)) / 2.0**n


def _quantized(details):
    q = details["quantization_parameters"]
    return len(q["scales"]) > 0


def _quantize(x, details):
    """Inputs to the model's input type.

    Float inputs of an int8 model are quantised with the input tensor's
    scale; integer inputs that are not quantised (e.g. GATHER indices) are
    passed as they are.
    """
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f" or not _quantized(details):
        return np.asarray(x).astype(dtype)
    q = details["quantization_parameters"]
    scale, zero = float(q["scales"][0]), int(q["zero_points"][0])
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(y, details):
    if np.dtype(details["dtype"]).kind == "f" or not _quantized(details):
        return y.astype(np.float64)
    q = details["quantization_parameters"]
    scale, zero = float(q["scales"][0]), int(q["zero_points"][0])
    return (y.astype(np.float64) - zero) * scale


def _as_inputs(inputs):
    """One array, or a list of arrays (one per input), as a list."""
    if isinstance(inputs, (list, tuple)):
        return [np.asarray(a) for a in inputs]
    return [np.asarray(inputs)]


def io_counts(model_bytes):
    """`(inputs, outputs)` of subgraph 0, read from the flatbuffer.

    Asking TFLM's interpreter for the details of a tensor past the last
    is not safe, so the counts come from the file.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(model_bytes), 0)
    subgraph = model.Subgraphs(0)
    return subgraph.InputsLength(), subgraph.OutputsLength()


def interpreter_io(interpreter, model_bytes):
    """`(input details, output details)` lists of a TFLM interpreter."""
    inputs, outputs = io_counts(model_bytes)
    return (
        [interpreter.get_input_details(i) for i in range(inputs)],
        [interpreter.get_output_details(o) for o in range(outputs)],
    )


def run_tflm_all(model_bytes, inputs, arena_size):
    """Runs a model on TFLM, one sample at a time; every input and output.

    Args:
        model_bytes: The .tflite flatbuffer.
        inputs: A list of arrays `(N,) + input shape`, one per model input
            in order (float for float inputs, integers for integer ones), or
            one array for a one-input model.
        arena_size: Arena bytes (must be enough: too small can crash).

    Returns:
        `(raw, real, details)`: lists over the outputs of the raw outputs
        `(N,) + output shape`, the same dequantised to float64, and TFLM's
        output tensor details.

    Raises:
        ValueError: The inputs do not fit the model (count or shape).
    """
    _, runtime, _ = tflm.require()
    inputs = _as_inputs(inputs)
    interpreter = runtime.Interpreter.from_bytes(bytes(model_bytes), arena_size=arena_size)
    input_details, output_details = interpreter_io(interpreter, model_bytes)
    if len(inputs) != len(input_details):
        raise ValueError(
            f"x holds {len(inputs)} input arrays, but the model has "
            f"{len(input_details)} inputs: pass a list of {len(input_details)} "
            "arrays in model input order."
        )
    shapes = [tuple(int(d) for d in details["shape"]) for details in input_details]
    count = len(inputs[0])
    for i, (x, shape) in enumerate(zip(inputs, shapes)):
        which = f"x[{i}]" if len(inputs) > 1 else "x"
        if x.ndim < 1 or len(x) != count or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            expected = "(N, " + ", ".join(str(d) for d in shape[1:]) + ")"
            raise ValueError(
                f"{which} has shape {x.shape}, but the model input {i} takes "
                f"samples of shape {shape} (batch 1): pass an array of shape "
                f"{expected}" + (", with as many samples as x[0]." if i else ".")
            )
    raw = [[] for _ in output_details]
    for n in range(count):
        # TFLM keeps no input between invokes: set every input every time.
        for i, (x, details) in enumerate(zip(inputs, input_details)):
            interpreter.set_input(_quantize(x[n].reshape(shapes[i]), details), i)
        interpreter.invoke()
        for o in range(len(output_details)):
            raw[o].append(np.array(interpreter.get_output(o), copy=True))
    raw = [np.stack(r) for r in raw]
    real = [_dequantize(r, d) for r, d in zip(raw, output_details)]
    return raw, real, output_details


def run_tflm(model_bytes, inputs, arena_size):
    """Runs a one-output model on TFLM, one sample at a time.

    Args:
        model_bytes: The .tflite flatbuffer.
        inputs: float32 array `(N,) + input shape` (or a list of arrays, one
            per model input).
        arena_size: Arena bytes (must be enough: too small can crash).

    Returns:
        `(raw, real, details)`: the raw outputs `(N,) + output shape`, the
        same dequantised to float64, and TFLM's output tensor details.
    """
    raw, real, details = run_tflm_all(model_bytes, inputs, arena_size)
    return raw[0], real[0], details[0]


# Arena for probe runs: generous, as the probe only compares outputs.
_PROBE_ARENAS = (16 << 20, 256 << 20)


def random_inputs(input_details, samples, rng, data=None):
    """Inputs over each input tensor's whole range, one list per input.

    Quantised inputs get uniform codes, float inputs normal values (scaled
    like `data` when given), integer inputs that are not quantised (indices)
    values drawn from `data` (zeros without it).
    """
    inputs = []
    for i, details in enumerate(input_details):
        dtype = np.dtype(details["dtype"])
        shape = (samples,) + tuple(int(d) for d in details["shape"])
        if dtype.kind == "f":
            scale = float(np.std(data[i])) if data is not None else 1.0
            center = float(np.mean(data[i])) if data is not None else 0.0
            x = (center + scale * rng.standard_normal(shape)).astype(dtype)
        elif _quantized(details):
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        elif data is not None:
            pool = np.asarray(data[i]).ravel()
            x = rng.choice(pool, size=shape).astype(dtype)
        else:
            x = np.zeros(shape, dtype)
        inputs.append(x)
    return inputs


def probe_outputs(model_bytes, samples=3, data=None):
    """TFLM's raw outputs on fixed pseudo-random inputs, as bytes.

    Every input is fed and every output read, so a rewrite of the
    flatbuffer (slimming) that changes any output is caught.

    Args:
        model_bytes: The .tflite flatbuffer.
        samples: Number of inputs run.
        data: Optional list of per-input sample arrays (Keras order): the
            pool for integer index inputs (random ids could be out of range).
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
    input_details, output_details = interpreter_io(interpreter, model_bytes)
    rng = np.random.default_rng(0)
    inputs = random_inputs(input_details, samples, rng, data)
    outputs = []
    for n in range(samples):
        for i, x in enumerate(inputs):
            # The raw tensor values, already of the input type.
            interpreter.set_input(x[n], i)
        interpreter.invoke()
        for o in range(len(output_details)):
            outputs.append(np.array(interpreter.get_output(o)).tobytes())
    return b"".join(outputs)


def _agreement(real, expected):
    """`(top-1 agreement or None, max |diff|)` of TFLM against Keras."""
    real = real.reshape(expected.shape)
    top1 = None
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        top1 = float(np.mean(_same_class(real, expected)))
    return top1, float(np.max(np.abs(real - expected)))


def _same_class(real, expected):
    return np.argmax(real.reshape(expected.shape), -1) == np.argmax(expected, -1)


def _snr_db(real, expected):
    noise = float(np.sum((real.reshape(expected.shape) - expected) ** 2))
    return 10 * np.log10(float(np.sum(expected**2)) / noise) if noise > 0 else float("inf")


def _compare_with_int8(check, written, plain, expected):
    """Fills `check`'s plain-int8 figures from the plain model's outputs."""
    check.int8_top1_agreement, check.int8_max_abs_diff = _agreement(plain, expected)
    check.int8_snr_db = _snr_db(plain, expected)
    if check.int8_top1_agreement is not None:
        ours, theirs = _same_class(written, expected), _same_class(plain, expected)
        check.discordant = (int(np.sum(theirs & ~ours)), int(np.sum(ours & ~theirs)))


def _is_probabilities(expected):
    return (
        expected.ndim >= 2
        and expected.shape[-1] > 1
        and np.all(expected >= 0)
        and np.allclose(expected.sum(-1), 1.0, atol=1e-3)
    )


def keras_outputs(keras_model, inputs):
    """The Keras model's outputs on `inputs` (a list, one per input), as a list."""
    x = inputs[0] if len(inputs) == 1 else list(inputs)
    y = keras_model.predict(x, batch_size=64, verbose=0)
    if isinstance(y, dict):
        raise VerificationError(
            "the Keras model returns a dict; verification compares outputs "
            "in order: return a list of tensors."
        )
    y = list(y) if isinstance(y, (list, tuple)) else [y]
    return [np.asarray(a, dtype=np.float64) for a in y]


def _output_check(real, expected, details, **common):
    top1, max_diff = _agreement(real, expected)
    span = float(expected.max() - expected.min())
    step = None
    if np.dtype(details["dtype"]).kind != "f" and _quantized(details):
        step = float(details["quantization_parameters"]["scales"][0])
    return Verification(
        top1_agreement=top1,
        max_abs_diff=max_diff,
        output_step=step,
        task="classification" if _is_probabilities(expected) else "regression",
        relative_error=max_diff / span if span > 0 else 0.0,
        snr_db=_snr_db(real, expected),
        **common,
    )


def _worst(checks, common):
    """One summary `Verification` of several outputs: the worst figures."""
    top1 = [c.top1_agreement for c in checks if c.top1_agreement is not None]
    int8_top1 = [c.int8_top1_agreement for c in checks if c.int8_top1_agreement is not None]
    int8_diff = [c.int8_max_abs_diff for c in checks if c.int8_max_abs_diff is not None]
    int8_snr = [c.int8_snr_db for c in checks if c.int8_snr_db is not None]
    return Verification(
        top1_agreement=min(top1) if top1 else None,
        max_abs_diff=max(c.max_abs_diff for c in checks),
        output_step=None,
        task="classification" if all(c.task == "classification" for c in checks)
        else "regression",
        relative_error=max(c.relative_error for c in checks),
        snr_db=min(c.snr_db for c in checks),
        int8_top1_agreement=min(int8_top1) if int8_top1 else None,
        int8_max_abs_diff=max(int8_diff) if int8_diff else None,
        int8_snr_db=min(int8_snr) if int8_snr else None,
        outputs=checks,
        **common,
    )


# Random inputs over the whole input range added to the bit-exact check.
EXTRA_RANDOM_INPUTS = 8


def verify(compressed, baseline, keras_model, inputs, arena, baseline_arena,
           input_source="representative_data", min_agreement=None,
           plain_int8=None):
    """Runs both models on TFLM and compares them with each other and Keras.

    Args:
        compressed: The compressed flatbuffer.
        baseline: Its uncompressed twin.
        keras_model: The plain Keras model that was converted.
        inputs: A list of arrays `(N,) + input shape`, one per model input in
            Keras order (float32 or integer); one array for one input.
        arena: Arena bytes the compressed model needs.
        baseline_arena: Arena bytes the uncompressed model needs.
        input_source: Where the inputs came from, for the report.
        min_agreement: If set, the lowest acceptable top-1 agreement (of
            every classifier output).
        plain_int8: The converter's own int8 model, when `baseline` was
            requantised from it: its agreement with Keras is measured too.

    Returns:
        A `Verification`; with `outputs` for a model of several outputs.

    Raises:
        VerificationError: The outputs differ, or agreement is too low.
    """
    inputs = _as_inputs(inputs)
    raw, real, details = run_tflm_all(compressed, inputs, arena + _ARENA_MARGIN)
    # The bit-exact check also runs inputs over the whole input range:
    # typical inputs may leave weights unexercised (e.g. ReLUs never open).
    _, runtime, _ = tflm.require()
    probe = runtime.Interpreter.from_bytes(bytes(compressed), arena_size=arena + _ARENA_MARGIN)
    input_details, _ = interpreter_io(probe, compressed)
    del probe
    extra = random_inputs(
        input_details, EXTRA_RANDOM_INPUTS, np.random.default_rng(1), inputs
    )
    extra_raw, _, _ = _run_raw(compressed, extra, arena + _ARENA_MARGIN)
    if bytes(compressed) == bytes(baseline):  # nothing was compressed
        twin, twin_extra = raw, extra_raw
    else:
        twin, _, _ = run_tflm_all(baseline, inputs, baseline_arena + _ARENA_MARGIN)
        twin_extra, _, _ = _run_raw(baseline, extra, baseline_arena + _ARENA_MARGIN)
    differing = 0
    for a, b, c, d in zip(raw, twin, extra_raw, twin_extra):
        if a.shape != b.shape or c.shape != d.shape:
            differing = len(a) + len(c)
            break
        differing = max(
            differing,
            int(np.sum(np.any((a != b).reshape(len(a), -1), axis=1)))
            + int(np.sum(np.any((c != d).reshape(len(c), -1), axis=1))),
        )
    if differing:
        raise VerificationError(
            f"The compressed model's outputs differ from its uncompressed "
            f"twin's on {differing} of {len(raw[0]) + EXTRA_RANDOM_INPUTS} "
            "inputs: TFLM's DECODE did not restore the weights exactly. "
            "Nothing was written."
        )
    expected = keras_outputs(keras_model, inputs)
    if len(expected) != len(real):
        raise VerificationError(
            f"the Keras model has {len(expected)} outputs, the converted model "
            f"{len(real)}; nothing was written."
        )
    common = dict(
        samples=len(inputs[0]), inputs=input_source, bit_exact=True,
        checked_inputs=len(inputs[0]) + EXTRA_RANDOM_INPUTS,
    )
    checks = [
        _output_check(r, e, d, name=f"output_{i}", **common)
        for i, (r, e, d) in enumerate(zip(real, expected, details))
    ]
    if plain_int8 is not None:
        _, plain_real, _ = run_tflm_all(plain_int8, inputs, baseline_arena + _ARENA_MARGIN)
        for check, w, r, e in zip(checks, real, plain_real, expected):
            _compare_with_int8(check, w, r, e)
    result = checks[0] if len(checks) == 1 else _worst(checks, common)
    result.name = ""
    constant = [
        c.name for c, e in zip(checks, expected)
        if len(e) > 1 and np.all(e == e[:1])
    ]
    if constant:
        result.note = (
            "Keras gives the same output for every verification input ("
            + ", ".join(constant)
            + "): agreement says little; give varied representative_data."
        )
    for check in checks:
        top1 = check.top1_agreement
        if min_agreement is not None and top1 is not None and top1 < min_agreement:
            where = f" on {check.name}" if len(checks) > 1 else ""
            raise VerificationError(
                f"TFLM and Keras agree on the top-1 class{where} for {top1:.1%} "
                f"of the inputs, below min_agreement={min_agreement:.1%}. "
                "Nothing was written. Give more representative data for "
                "calibration, or check the model."
            )
    return result


def _run_raw(model_bytes, inputs, arena_size):
    """Like `run_tflm_all`, with inputs already of the input tensors' types."""
    _, runtime, _ = tflm.require()
    interpreter = runtime.Interpreter.from_bytes(bytes(model_bytes), arena_size=arena_size)
    _, output_details = interpreter_io(interpreter, model_bytes)
    raw = [[] for _ in output_details]
    for n in range(len(inputs[0])):
        for i, x in enumerate(inputs):
            interpreter.set_input(x[n], i)
        interpreter.invoke()
        for o in range(len(output_details)):
            raw[o].append(np.array(interpreter.get_output(o), copy=True))
    raw = [np.stack(r) for r in raw]
    return raw, None, output_details
