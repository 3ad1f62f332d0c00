"""Dictionary constraints: the projection applied to d after each k-means step.

A constraint maps the cluster means of one k-means step to the nearest
admissible dictionary. The same LUT-Q solver then yields non-uniform
quantisation (`Free`), multiplierless networks (`PowerOfTwo`) and fixed-point
grids (`Uniform`; with K=2 and K=3 these are binary and ternary networks).
Pruning is not a constraint: it fixes entry 0 of any dictionary at exactly 0
(see `LUTQuantizer`), and each constraint keeps that entry at 0.

Dictionaries are `[K, C]` tensors: K entries for each of C tables (C = 1 for a
per-tensor dictionary, the number of output channels for per-channel ones).
"""

import keras
import numpy as np
import tensorflow as tf


class Constraint:
    """Base class: a projection of dictionaries onto an admissible set.

    Subclasses implement `project` and `get_config`; they hold no state, so
    one instance can serve every layer of a model.
    """

    def project(self, dictionary, counts, previous, fixed_zero):
        """Project cluster means onto the constraint.

        Args:
            dictionary: float32 `[K, C]`, the cluster means (an empty cluster
                holds its previous value).
            counts: float32 `[K, C]`, the number of weights in each cluster.
            previous: float32 `[K, C]`, the dictionary before this step.
            fixed_zero: Python bool; if True, row 0 is the pruning entry and
                must stay exactly 0.

        Returns:
            float32 `[K, C]`, the projected dictionary.
        """
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config()
        )


@keras.saving.register_keras_serializable(package="lutq_tf")
class Free(Constraint):
    """No constraint: K free values (non-uniform quantisation)."""

    def project(self, dictionary, counts, previous, fixed_zero):
        return dictionary


@keras.saving.register_keras_serializable(package="lutq_tf")
class PowerOfTwo(Constraint):
    """Every entry is +-2**e with integer e in `[min_exponent, max_exponent]`.

    Products with such weights are bit shifts: a multiplierless network.

    Args:
        min_exponent: smallest exponent e.
        max_exponent: largest exponent e. The default leaves the top
            unbounded (float32's range), so large weights are never clipped;
            set it to the shift range of the target hardware.
        allow_zero: if True, an entry may also be exactly 0 (it becomes 0 when
            0 is nearer than 2**min_exponent).
    """

    def __init__(self, min_exponent=-16, max_exponent=127, allow_zero=True):
        if int(min_exponent) != min_exponent or int(max_exponent) != (
            max_exponent
        ):
            raise ValueError(
                "PowerOfTwo: min_exponent and max_exponent must be integers, "
                f"got {min_exponent!r} and {max_exponent!r}."
            )
        if min_exponent > max_exponent:
            raise ValueError(
                f"PowerOfTwo: min_exponent ({min_exponent}) must not exceed "
                f"max_exponent ({max_exponent})."
            )
        if min_exponent < -126 or max_exponent > 127:
            raise ValueError(
                "PowerOfTwo: exponents must lie in [-126, 127] (float32 "
                f"normal range), got [{min_exponent}, {max_exponent}]."
            )
        self.min_exponent = int(min_exponent)
        self.max_exponent = int(max_exponent)
        self.allow_zero = bool(allow_zero)

    def project(self, dictionary, counts, previous, fixed_zero):
        magnitude = tf.abs(dictionary)
        # floor(log2 |v|) from the float's exponent bits: exact, unlike log2.
        bits = tf.bitcast(tf.maximum(magnitude, 1e-37), tf.int32)
        floor_exp = tf.bitwise.right_shift(bits, 23) - 127
        low = _exact_pow2(floor_exp)
        # The nearer of 2**e and 2**(e+1) in linear distance.
        exponent = tf.where(magnitude >= 1.5 * low, floor_exp + 1, floor_exp)
        exponent = tf.clip_by_value(
            exponent, self.min_exponent, self.max_exponent
        )
        value = _exact_pow2(exponent)
        if self.allow_zero:
            # 0 is nearer than the smallest power when |v| < 2**min / 2.
            value = tf.where(
                magnitude < 0.5 * 2.0**self.min_exponent, 0.0, value
            )
        sign = tf.where(dictionary < 0, -1.0, 1.0)
        projected = sign * value
        if fixed_zero:
            projected = _zero_row0(projected)
        return projected

    def get_config(self):
        return {
            "min_exponent": self.min_exponent,
            "max_exponent": self.max_exponent,
            "allow_zero": self.allow_zero,
        }


@keras.saving.register_keras_serializable(package="lutq_tf")
class Uniform(Constraint):
    """Entries on an evenly spaced grid `s * g` with a fitted step `s`.

    The codes g are integers `-(K//2) ... (K-1)//2` when the grid must hold 0
    (odd K, or pruning), else the symmetric half-integers
    `-(K-1)/2 ... (K-1)/2`. The step is the least-squares fit of the grid to
    the weights under the current assignment. K=2 gives binary weights
    +-s/2, K=3 ternary weights {-s, 0, s}. K=2 with pruning has one
    non-zero entry, {0, v}: v takes the sign of the kept weights' mean.

    Args:
        power_of_two_step: if True, the step is rounded to a power of two
            (a fixed-point grid).
    """

    def __init__(self, power_of_two_step=False):
        self.power_of_two_step = bool(power_of_two_step)

    @staticmethod
    def codes(num_values, fixed_zero):
        """The grid codes of each dictionary row, as a float32 numpy array.

        With `fixed_zero`, row 0 holds code 0 and the rest follow in order.
        """
        k = num_values
        if fixed_zero or k % 2 == 1:
            grid = np.arange(-(k // 2), (k - 1) // 2 + 1, dtype=np.float32)
            if fixed_zero:
                grid = np.concatenate([[0.0], grid[grid != 0]])
            return grid.astype(np.float32)
        return np.arange(k, dtype=np.float32) - (k - 1) / 2.0

    def project(self, dictionary, counts, previous, fixed_zero):
        if fixed_zero and dictionary.shape[0] == 2:
            return self._project_one_value(dictionary, counts, previous)
        codes = tf.constant(self.codes(dictionary.shape[0], fixed_zero))[:, None]
        # Least squares over the weights: sum_k n_k (mean_k - s g_k)^2.
        numerator = tf.reduce_sum(counts * codes * dictionary, axis=0)
        denominator = tf.reduce_sum(counts * codes * codes, axis=0)
        fallback = tf.reduce_sum(tf.abs(previous) * tf.abs(codes), axis=0) / (
            tf.reduce_sum(codes * codes, axis=0)
        )
        fitted = (denominator > 0) & (numerator > 0)
        step = tf.where(fitted, numerator / tf.maximum(denominator, 1e-30),
                        fallback)
        step = tf.maximum(step, 1e-30)
        if self.power_of_two_step:
            step = _round_pow2(step)
        return codes * step[None, :]

    def _project_one_value(self, dictionary, counts, previous):
        """K=2 with pruning: the grid {0, v}, v of either sign.

        Codes {0, -1} with a positive step would flip every kept positive
        weight; the least-squares v is the kept weights' mean, whatever its
        sign (an empty cluster keeps its value).
        """
        value = tf.where(counts[1:] > 0, dictionary[1:], previous[1:])
        sign = tf.where(value < 0, -1.0, 1.0)
        step = tf.maximum(tf.abs(value), 1e-30)
        if self.power_of_two_step:
            step = _round_pow2(step)
        return tf.concat([tf.zeros_like(value), sign * step], axis=0)

    def get_config(self):
        return {"power_of_two_step": self.power_of_two_step}


def _round_pow2(value):
    """The nearer power of two to each positive float32 value."""
    bits = tf.bitcast(value, tf.int32)
    floor_exp = tf.bitwise.right_shift(bits, 23) - 127
    low = _exact_pow2(floor_exp)
    return _exact_pow2(tf.where(value >= 1.5 * low, floor_exp + 1, floor_exp))


def _exact_pow2(exponent):
    """2.0**exponent for int32 exponents in [-126, 127], built from bits."""
    exponent = tf.clip_by_value(exponent, -126, 127)
    return tf.bitcast(tf.bitwise.left_shift(exponent + 127, 23), tf.float32)


def _zero_row0(dictionary):
    return tf.concat([tf.zeros_like(dictionary[:1]), dictionary[1:]], axis=0)


_ALIASES = {
    "none": Free,
    "free": Free,
    "pow2": PowerOfTwo,
    "power_of_two": PowerOfTwo,
    "uniform": Uniform,
}


def get(identifier):
    """Returns a `Constraint` from a name, a config dict or an instance.

    Names: "none" (free values), "pow2" (+-2**e, optionally 0), "uniform"
    (evenly spaced grid).
    """
    if identifier is None:
        return Free()
    if isinstance(identifier, Constraint):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _ALIASES:
            raise ValueError(
                f"Unknown constraint {identifier!r}. Use one of "
                f"{sorted(set(_ALIASES))} or a lutq_tf.constraints.Constraint "
                "instance."
            )
        return _ALIASES[key]()
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise ValueError(
        f"Cannot interpret constraint {identifier!r}: pass a name such as "
        "'none', 'pow2' or 'uniform', or a Constraint instance."
    )


def serialize(constraint):
    return keras.saving.serialize_keras_object(constraint)


__all__ = ["Constraint", "Free", "PowerOfTwo", "Uniform", "get", "serialize"]
