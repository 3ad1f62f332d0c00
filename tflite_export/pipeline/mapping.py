"""Maps the weight tensors of a .tflite model back to Keras LUT kernels.

Tensor names are a hint only (the converter names tensors after TF name
scopes, e.g. `functional_1/conv_1/convolution` for layer `conv`, and fuses
names of folded ops). The proof is in the values: the TFLite tensor, read as
real numbers, must equal the Keras kernel laid out the TFLite way, up to one
factor per output channel (a batch norm folded into the kernel) and the
rounding of int8 quantisation.
"""

import dataclasses
import itertools
import re

import numpy as np

# Keras kernel layout -> TFLite layout, per op and kernel rank: the axis
# permutation, after which a reshape gives the TFLite shape.
#   Dense [in, out] -> FC [out, in]
#   Conv1D [k, in, out] / Conv2D [kh, kw, in, out] -> CONV_2D [out, (1,) kh, kw, in]
#   Depthwise [kh, kw, in, mult] -> DEPTHWISE_CONV_2D [1, kh, kw, in * mult]
#   Conv2DTranspose [kh, kw, out, in] -> TRANSPOSE_CONV [out, kh, kw, in]
_KNOWN_LAYOUTS = {
    ("FULLY_CONNECTED", 2): (1, 0),
    ("CONV_2D", 3): (2, 0, 1),
    ("CONV_2D", 4): (3, 0, 1, 2),
    ("DEPTHWISE_CONV_2D", 3): (0, 1, 2),
    ("DEPTHWISE_CONV_2D", 4): (0, 1, 2, 3),
    ("TRANSPOSE_CONV", 4): (2, 0, 1, 3),
}


@dataclasses.dataclass
class Match:
    """A TFLite weight tensor and the Keras LUT kernel it came from.

    Attributes:
        weight: The `flatbuffer.WeightTensor`.
        kernel: The `lut_tensors.LutKernel`.
        layout: The Keras kernel values in the TFLite tensor's layout.
        channel_factors: float array, the per-output-channel factor between
            the two (1 unless a batch norm was folded in).
    """

    weight: object
    kernel: object
    layout: np.ndarray
    channel_factors: np.ndarray

    @property
    def folded(self):
        """Whether the kernel was rescaled per channel (batch norm folded)."""
        used = self.channel_factors[self.channel_factors != 0]
        return bool(used.size) and not np.allclose(used, 1.0, rtol=1e-3)


def _layouts(array, op, shape):
    """Candidate TFLite layouts of a Keras kernel, most likely first."""
    size = int(np.prod(shape))
    if array.size != size:
        return
    known = _KNOWN_LAYOUTS.get((op, array.ndim))
    orders = [known] if known else []
    orders += [p for p in itertools.permutations(range(array.ndim)) if p != known]
    for order in orders:
        yield np.transpose(array, order).reshape(shape)


def _channel_factors(weight, layout):
    """Per-channel factors mapping `layout` onto `weight`, or None."""
    axis = weight.output_axis
    real = np.moveaxis(weight.dequantized(), axis, 0)
    real = real.reshape(real.shape[0], -1)
    keras_values = np.moveaxis(layout.astype(np.float64), axis, 0)
    keras_values = keras_values.reshape(keras_values.shape[0], -1)
    norm = np.sum(keras_values * keras_values, axis=1)
    factors = np.where(
        norm > 0, np.sum(real * keras_values, axis=1) / np.maximum(norm, 1e-300), 0
    )
    if weight.scales is not None and weight.quantized_dimension == axis:
        # The converter quantises each channel symmetrically with
        # scale_c = max|g_c W_c| / 127: that gives |g_c| exactly, where a
        # least-squares fit on a few distinct values can miss by a step.
        # Kept per channel only where it fits better (a converter may floor
        # the scale of a near-zero channel).
        peak = np.abs(keras_values).max(axis=1)
        exact = weight.scales.astype(np.float64) * 127.0 / np.where(peak > 0, peak, 1)
        exact = np.where(peak > 0, np.sign(factors) * exact, factors)

        def misfit(f):
            return np.abs(real - f[:, None] * keras_values).max(axis=1)

        factors = np.where(misfit(exact) <= misfit(factors), exact, factors)
    residual = np.abs(real - factors[:, None] * keras_values).max(axis=1)
    # Tolerance: one quantisation step (rounding is half a step) plus float
    # round-off of the folding arithmetic.
    peak = np.abs(real).max(axis=1)
    tolerance = 1e-4 * peak + 1e-12
    if weight.scales is not None:
        if weight.quantized_dimension is None:
            step = np.full(real.shape[0], float(weight.scales[0]))
        elif weight.quantized_dimension == axis:
            step = weight.scales.astype(np.float64)
        else:
            step = np.full(real.shape[0], float(weight.scales.max()))
        tolerance = tolerance + step
    if np.all(residual <= tolerance):
        return factors
    return None


def _name_score(tensor_name, layer_name):
    """2 if a scope of the tensor name is the layer name (maybe `_N`-suffixed)."""
    pattern = re.compile(re.escape(layer_name) + r"(_\d+)?")
    parts = re.split(r"[/;:]", tensor_name)
    return 2 if any(pattern.fullmatch(part) for part in parts) else 0


def match(weights, kernels):
    """Finds, for each TFLite weight tensor, the LUT kernel it holds.

    Args:
        weights: `flatbuffer.WeightTensor`s of the converted model.
        kernels: `lut_tensors.LutKernel`s of the Keras model.

    Returns:
        `(matches, unmatched)`: a list of `Match`, and the kernels no tensor
        holds.
    """
    matches = []
    used = set()
    for weight in weights:
        candidates = [
            (id(k) in used, -_name_score(weight.name, k.layer), i)
            for i, k in enumerate(kernels)
            if k.array.size == weight.array.size
        ]
        for _, _, i in sorted(candidates):
            kernel = kernels[i]
            found = None
            for layout in _layouts(kernel.array, weight.op, weight.array.shape):
                factors = _channel_factors(weight, layout)
                if factors is not None:
                    found = Match(weight, kernel, layout, factors)
                    break
            if found is not None:
                matches.append(found)
                used.add(id(kernel))
                break
    unmatched = [k for k in kernels if id(k) not in used]
    return matches, unmatched
