"""Dictionary constraints: the projection applied to d after each k-means step.

A constraint maps the cluster means of one k-means step to the nearest
admissible dictionary. The same LUT-Q solver then yields non-uniform
quantisation (`Free`), multiplierless networks (`PowerOfTwo`) and fixed-point
grids (`Uniform`; with K=2 and K=3 these are binary and ternary networks)
and native int4 tables (`Int4`: distinct integer codes in [-8, 7] times a
fitted step).
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

    def check_num_values(self, num_values):
        """Raises a ValueError if K = `num_values` entries cannot satisfy
        the constraint (called when a `LUTQuantizer` is made). The base
        class takes any K."""

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


# The int4 fit: an infeasible code costs this much (weighted squared
# distances of clipped targets stay below 1e13).
_INFEASIBLE = np.float32(1e30)
# Weight of an empty cluster in the int4 fit, next to a non-empty one's
# count (>= 1): it still lands near its previous value, but moves no step.
_EMPTY_WEIGHT = np.float32(1e-3)
# Rounds of (codes for the step, least-squares step for the codes) per start;
# a third changed nothing on 640 random dictionaries.
_INT4_ROUNDS = 2
# Starting steps: the largest |m| on code j, for these j. Whole codes up to 8
# recover a dictionary already on a grid; 10 and 12 start beyond the range
# (clipped). Against the exhaustive least-squares optimum on 640 random
# dictionaries (K <= 5, both ranges, with and without pruning), these found
# it in 636 cases, the worst at 1.46x its error (1..8 alone: 633, 1.78x;
# 19 starts: 639, 1.46x).
_INT4_STARTS = np.array([1, 2, 3, 4, 5, 6, 7, 8, 10, 12], np.float32)


@keras.saving.register_keras_serializable(package="lutq_tf")
class Int4(Constraint):
    """Entries `s * k`: distinct integers k in `[-8, 7]` times a fitted step.

    One step s > 0 per table (per tensor, or per output channel with
    `per_channel`; with `channel_scales` the entries are over the
    normalised weights and Q = s_c * s * k), so that each table can be
    stored as native int4 (TFLM's kTfLiteInt4) with scale s. The grid
    holds 0, so pruning (`prune_rate`) keeps its zero entry (code 0; the
    other entries then take distinct non-zero codes).

    The projection fits the codes and the step to the cluster means m_j
    with counts n_j by least squares, min sum_j n_j (m_j - s k_j)^2 over
    s > 0 and strictly increasing integer codes in range: from 10 starting
    steps (the largest |m_j| on codes 1..8, 10, 12), it alternates twice
    the best codes for the step (a dynamic programme over the codes, so the
    entries stay distinct and sorted, as the k-means step requires) and the
    least-squares step for the codes, and keeps the start with the smallest
    error. It is a local search: on random dictionaries it found the
    exhaustive optimum in 636 of 640 cases, the worst at 1.46x its error.
    A dictionary already on an int4 grid is kept (to rounding), and
    `codes_and_steps` recovers its codes and steps. The fit costs
    O(10 starts x K x 16 codes) per table: nothing per tensor, but per
    channel a 784x512 Dense's k-means step took about 5x `Uniform`'s
    (31 vs 7 ms, one measurement on a 2-core VM), and compiling a step
    takes about 1.5 s more.

    Args:
        symmetric: if True, codes in `[-7, 7]` (15 codes, so K <= 15), for
            kernels that need a symmetric range; else `[-8, 7]` (K <= 16).

    Raises:
        ValueError: from `check_num_values`, when the quantizer is made,
            if K exceeds the number of codes.
    """

    def __init__(self, symmetric=False):
        if not isinstance(symmetric, (bool, np.bool_)):
            raise TypeError(
                f"Int4: symmetric must be True or False, got {symmetric!r}."
            )
        self.symmetric = bool(symmetric)

    @property
    def min_code(self):
        """The smallest code: -7 if `symmetric`, else -8."""
        return -7 if self.symmetric else -8

    @property
    def max_code(self):
        """The largest code, 7."""
        return 7

    @property
    def max_num_values(self):
        """The most dictionary entries the codes allow: 15 or 16."""
        return self.max_code - self.min_code + 1

    def check_num_values(self, num_values):
        if num_values > self.max_num_values:
            hint = (" or symmetric=False (16 codes)"
                    if self.symmetric and num_values == 16 else "")
            raise ValueError(
                f"{self!r}: K={num_values} dictionary entries do not fit the "
                f"{self.max_num_values} int4 codes [{self.min_code}, "
                f"{self.max_code}]. Use bits<=4 (num_values<="
                f"{self.max_num_values}){hint} for this layer, or another "
                "constraint."
            )

    def project(self, dictionary, counts, previous, fixed_zero):
        codes, steps = self.fit(dictionary, counts, fixed_zero)
        return codes * steps[None, :]

    def fit(self, dictionary, counts, fixed_zero):
        """The codes and steps of the projection of `dictionary`.

        Args:
            dictionary: float32 `[K, C]`, sorted along axis 0 (with
                `fixed_zero`, rows 1..K-1; row 0 is 0).
            counts: float32 `[K, C]`, the weights of each entry (cluster
                sizes; an empty cluster still counts a little).
            fixed_zero: Python bool; if True, row 0 gets code 0 and the other
                rows distinct non-zero codes.

        Returns:
            `(codes, steps)`: float32 `[K, C]` integer codes in
            `[min_code, max_code]`, strictly increasing along axis 0 (rows
            1..K-1 with `fixed_zero`), and float32 `[C]` steps > 0.
        """
        num_values = dictionary.shape[0]
        self.check_num_values(num_values)
        dictionary = tf.convert_to_tensor(dictionary, tf.float32)
        weights = tf.convert_to_tensor(counts, tf.float32) + _EMPTY_WEIGHT
        rows = slice(1, None) if fixed_zero else slice(None)
        means, weights = dictionary[rows], weights[rows]
        # Starts: the largest |m| on each code of `_INT4_STARTS`.
        peak = tf.reduce_max(tf.abs(means), axis=0)
        starts = _INT4_STARTS
        steps = peak[None, :] / starts[:, None]
        steps = tf.where(steps > 0, steps, np.float32(1e-30))  # [P, C]
        num_starts, channels = len(starts), tf.shape(means)[1]
        # Starts as extra columns: [R, P * C].
        tile = lambda t: tf.tile(t, [1, num_starts])  # noqa: E731
        means_p, weights_p = tile(means), tile(weights)
        steps = tf.reshape(steps, [-1])
        for _ in range(_INT4_ROUNDS):
            codes = self._best_codes(means_p / steps[None, :], weights_p,
                                     fixed_zero)
            numerator = tf.reduce_sum(weights_p * means_p * codes, axis=0)
            denominator = tf.reduce_sum(weights_p * codes * codes, axis=0)
            steps = tf.where(numerator > 0,
                             numerator / tf.maximum(denominator, 1e-30), steps)
        error = tf.reduce_sum(
            weights_p * tf.square(means_p - codes * steps[None, :]), axis=0)
        best = tf.argmin(tf.reshape(error, [num_starts, channels]), axis=0,
                         output_type=tf.int32)
        pick = best * channels + tf.range(channels)
        codes = tf.gather(codes, pick, axis=1)
        steps = tf.gather(steps, pick)
        if fixed_zero:
            codes = tf.concat([tf.zeros_like(codes[:1]), codes], axis=0)
        return codes, steps

    def _best_codes(self, targets, weights, fixed_zero):
        """Strictly increasing integer codes nearest the targets.

        Minimises sum_r w_r (t_r - k_r)^2 over k_0 < k_1 < ... in
        `[min_code, max_code]` (0 excluded with `fixed_zero`) by a dynamic
        programme over the codes: F_r(v) = cost_r(v) + min_{u<v} F_{r-1}(u).

        Args:
            targets: float32 `[R, N]`, sorted along axis 0.
            weights: float32 `[R, N]`, > 0.
            fixed_zero: Python bool.

        Returns:
            float32 `[R, N]`.
        """
        levels = np.arange(self.min_code, self.max_code + 1, dtype=np.float32)
        num_levels = len(levels)
        # Clipped: a far target costs the same order, and nothing overflows.
        targets = tf.clip_by_value(targets, self.min_code - 64.0,
                                   self.max_code + 64.0)
        cost = weights[:, :, None] * tf.square(
            targets[:, :, None] - levels[None, None, :])  # [R, N, L]
        if fixed_zero:
            cost += np.where(levels == 0, _INFEASIBLE, 0.0).astype(
                np.float32)
        # One loop body each way (unrolled, 16 rows compile 5x slower).
        totals = tf.scan(
            lambda total, row: row + _exclusive_prefix_min(total, num_levels),
            cost[1:], initializer=cost[0])
        totals = tf.concat([cost[:1], totals], axis=0)
        last = tf.argmin(totals[-1], axis=1, output_type=tf.int32)
        positions = tf.range(num_levels)[None, :]

        def back(index, total):
            return tf.argmin(tf.where(positions < index[:, None], total,
                                      np.inf), axis=1, output_type=tf.int32)

        earlier = tf.scan(back, totals[:-1], initializer=last, reverse=True)
        codes = tf.concat([earlier, last[None]], axis=0)
        return tf.cast(codes, tf.float32) + float(self.min_code)

    def codes_and_steps(self, dictionary, fixed_zero=False):
        """The int4 codes and steps of a dictionary this constraint made.

        Args:
            dictionary: float32 `[K, C]` on the grid (a projection's output:
                the `dictionary` of `LUTQWrapper.quantized_tensors`).
            fixed_zero: True if row 0 is a pruning entry (`prune_rate > 0`).

        Returns:
            `(codes, steps)`: numpy int8 `[K, C]` in `[min_code, max_code]`
            and float32 `[C]` > 0 with `np.float32(steps * codes)` equal to
            `dictionary` bit for bit.

        Raises:
            ValueError: a column is not `s * k` for any float32 s > 0 and
                integer codes in range (the dictionary was not made by this
                constraint).
        """
        dictionary = np.asarray(dictionary, np.float32)
        codes, _ = self.fit(dictionary, np.ones_like(dictionary), fixed_zero)
        codes = codes.numpy().astype(np.int8)
        steps = np.zeros(dictionary.shape[1], np.float32)
        for c in range(dictionary.shape[1]):
            steps[c] = _exact_step(dictionary[:, c], codes[:, c])
            if steps[c] <= 0:
                raise ValueError(
                    f"codes_and_steps: column {c} of the dictionary, "
                    f"{dictionary[:, c].tolist()}, is not s * k for integers "
                    f"k in [{self.min_code}, {self.max_code}]; pass a "
                    f"dictionary projected by {self!r}."
                )
        return codes, steps

    def get_config(self):
        return {"symmetric": self.symmetric}


def _exclusive_prefix_min(values, length):
    """min_{u<v} values[:, u] for each v (the infeasible cost at v = 0)."""
    fill = tf.fill([tf.shape(values)[0], 1], _INFEASIBLE)
    result = tf.concat([fill, values[:, :-1]], axis=1)
    shift = 1
    while shift < length:
        pad = tf.fill([tf.shape(values)[0], shift], _INFEASIBLE)
        result = tf.minimum(result, tf.concat([pad, result[:, :-shift]],
                                              axis=1))
        shift *= 2
    return result


def _exact_step(column, codes):
    """A float32 s > 0 with float32(s * codes) == column exactly, else 0."""
    nonzero = codes != 0
    if not np.all(column[~nonzero] == 0):
        return np.float32(0)
    for j in np.flatnonzero(nonzero)[np.argsort(-np.abs(codes[nonzero]))]:
        guess = np.float32(column[j] / np.float32(codes[j]))
        for candidate in (guess, np.nextafter(guess, np.float32(np.inf)),
                          np.nextafter(guess, np.float32(0))):
            if candidate > 0 and np.array_equal(
                    (candidate * codes.astype(np.float32)).astype(np.float32),
                    column):
                return candidate
    return np.float32(0)


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
    "int4": Int4,
}


def get(identifier):
    """Returns a `Constraint` from a name, a config dict or an instance.

    Names: "none" (free values), "pow2" (+-2**e, optionally 0), "uniform"
    (evenly spaced grid), "int4" (`Int4()`: s * k, integers k in [-8, 7]).
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
        "'none', 'pow2', 'uniform' or 'int4', or a Constraint instance."
    )


def serialize(constraint):
    return keras.saving.serialize_keras_object(constraint)


__all__ = [
    "Constraint", "Free", "Int4", "PowerOfTwo", "Uniform", "get", "serialize",
]
