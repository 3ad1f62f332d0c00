"""`LUTQuantizer`: what dictionary a weight tensor gets, and its k-means step."""

import math
import numbers

import keras
import numpy as np

from lutq_tf import constraints as constraints_lib
from lutq_tf import kmeans


def index_bits(num_values):
    """Bits of one index into a table of `num_values` entries: ceil(log2 K),
    at least 1 (the one home of this fact; the exporter packs with it)."""
    return max(1, (int(num_values) - 1).bit_length())


# The values of `granularity`, and the internal mode each one names.
GRANULARITIES = ("per_tensor", "per_channel", "per_channel_scaled")
_MODES = {"per_tensor": "tensor", "per_channel": "channel",
          "per_channel_scaled": "scaled"}
# The boolean options that are aliases of one granularity each.
_ALIASES = (("per_channel", "per_channel"),
            ("channel_scales", "per_channel_scaled"))

@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQuantizer:
    """The LUT-Q specification of one weight tensor: Q = d[A].

    These are also the options `lutq_tf.quantize_model` takes for its
    default quantizer and in its `overrides` dicts (this docstring is their
    one description).

    Args:
        num_values: K, the number of dictionary entries (>= 2). Give this or
            `bits`.
        bits: index bits; K = 2**bits.
        constraint: "none", "pow2", "uniform", "int4" or a
            `lutq_tf.constraints.Constraint`.
        prune_rate: fraction in [0, 1) of each table's weights (smallest
            |W|) assigned to an entry fixed at exactly 0. 0 disables pruning.
        per_channel: True is an alias of `granularity="per_channel"`
            (None or False: not that granularity).
        kmeans_every: run the k-means step after every this many optimizer
            steps.
        init_iterations: Lloyd iterations of the initial k-means.
        channel_scales: True is an alias of
            `granularity="per_channel_scaled"` (None or False: not that
            granularity).
        dictionary_rate: float in [0, 1]: how far each training k-means step
            moves d towards the cluster means, d <- d + rate * (means - d),
            before the constraint's projection. 1 refits d at every step;
            0 keeps d at its initial fit (only A follows W). The initial
            k-means (`initialize`) always fits fully.
        per_channel_fallback: True when per-channel dictionaries were asked
            for a layer whose output channels hold fewer than K weights
            each, so this quantizer has one dictionary per tensor instead
            (set by `quantize_model`; `summary` reports it). Only with
            granularity "per_tensor".
        granularity: what one dictionary serves (default "per_tensor", or
            what the aliases `per_channel` / `channel_scales` say):

            - "per_tensor": one dictionary per weight tensor.
            - "per_channel": one dictionary per output channel.
              `quantize_model` gives a layer whose output channels hold
              fewer than K weights each (a 3x3 DepthwiseConv2D has 9) one
              dictionary per tensor instead, whatever the constraint; one
              warning lists such layers and `summary` marks them
              ("tensor (channels < K)").
            - "per_channel_scaled": one dictionary per tensor over the
              weights divided by their output channel's scale
              `s_c = RMS(W[:, c])` (refreshed at each k-means step);
              Q[m, c] = s_c * d[A[m, c]]. An all-zero channel has s_c = 0,
              so its Q stays exactly 0. Per-channel ranges at one table's
              cost (an exporter folds s_c into the int8 per-channel scale).
              Pruning takes the tensor's smallest |W[m, c] / s_c|. With
              "pow2", Q = s_c * 2^e is multiplierless only up to s_c.

            An alias that contradicts `granularity` (`per_channel=True`
            with another granularity, or `per_channel=False` with
            "per_channel"; likewise `channel_scales`) is a ValueError.
            Configs store the aliases (`per_channel`, `channel_scales`), so
            saved models keep their layout.
    """

    def __init__(
        self,
        num_values=None,
        bits=None,
        constraint="none",
        prune_rate=0.0,
        per_channel=None,
        kmeans_every=1,
        init_iterations=20,
        channel_scales=None,
        dictionary_rate=1.0,
        per_channel_fallback=False,
        granularity=None,
    ):
        self.num_values = _resolve_num_values(num_values, bits)
        self.constraint = constraints_lib.get(constraint)
        self.constraint.check_num_values(self.num_values)
        self.prune_rate = check_fraction("prune_rate", prune_rate)
        granularity = resolve_granularity(granularity, per_channel,
                                          channel_scales)
        self.per_channel = granularity == "per_channel"
        self.channel_scales = granularity == "per_channel_scaled"
        self.kmeans_every = check_int("kmeans_every", kmeans_every, 1)
        self.init_iterations = check_int("init_iterations", init_iterations,
                                         1)
        self.dictionary_rate = check_rate("dictionary_rate", dictionary_rate)
        self.per_channel_fallback = check_bool("per_channel_fallback",
                                               per_channel_fallback)
        if self.per_channel_fallback and self.mode != "tensor":
            raise ValueError(
                "per_channel_fallback=True marks a per-tensor dictionary that "
                "replaced a per-channel one; it needs granularity="
                "'per_tensor' (per_channel=False and channel_scales=False)."
            )

    @property
    def index_bits(self):
        """Bits of one assignment index: ceil(log2 K)."""
        return index_bits(self.num_values)

    @property
    def assignment_dtype(self):
        """The smallest unsigned integer dtype that holds indices < K."""
        for dtype in ("uint8", "uint16"):
            if self.num_values - 1 <= np.iinfo(dtype).max:
                return dtype
        return "int32"

    @property
    def mode(self):
        """"tensor", "channel" or "scaled": what one dictionary serves
        (`granularity`'s short name, as `summary` shows it)."""
        if self.per_channel:
            return "channel"
        return "scaled" if self.channel_scales else "tensor"

    @property
    def granularity(self):
        """"per_tensor", "per_channel" or "per_channel_scaled" (see the
        class docstring)."""
        return {mode: name for name, mode in _MODES.items()}[self.mode]

    def num_pruned(self, table_size, rate=None):
        """Weights of a table of `table_size` fixed to the zero entry.

        Args:
            table_size: weights per table.
            rate: the pruning rate; defaults to `prune_rate` (a schedule
                passes a lower one).
        """
        rate = self.prune_rate if rate is None else rate
        if rate == 0:
            return 0
        # The 1e-9 keeps rate * size that is an integer in exact arithmetic
        # (0.5 * 10) from rounding up through float error.
        return min(table_size, math.ceil(rate * table_size - 1e-9))

    def scales(self, matrix):
        """The channel scales of a `[M, C]` matrix, or None.

        Returns:
            float32 `[C]`, `s_c` = the RMS of `matrix[:, c]` (0 for an all-zero
            column), with `channel_scales`; else None.
        """
        if not self.channel_scales:
            return None
        return kmeans.channel_scales(matrix)

    def seed(self, matrix):
        """Initial dictionary for a `[M, C]` matrix: quantile seeds.

        Returns:
            float32 `[K, C]`; `[K, 1]` per tensor or with `channel_scales`
            (seeded from the normalised weights of the non-zero channels).
        """
        if self.channel_scales:
            return kmeans.scaled_seed_dictionary(
                matrix, self.scales(matrix), self.num_values, self.constraint,
                self.num_pruned(matrix.shape[0] * matrix.shape[1]))
        return kmeans.seed_dictionary(
            matrix, self.num_values, self.constraint,
            self.num_pruned(matrix.shape[0]),
        )

    def initialize(self, matrix):
        """`(dictionary, assignment, quantised)` fitted to a `[M, C]` matrix.

        Quantile seeds, then `init_iterations` full k-means steps (whatever
        `dictionary_rate`).
        """
        dictionary = self.seed(matrix)
        scales = self.scales(matrix)
        for _ in range(self.init_iterations):
            dictionary, assignment, quantized, _ = self.step(
                matrix, dictionary, scales, initial=True)
        return dictionary, assignment, quantized

    def step(self, matrix, dictionary, scales=None, num_pruned=None,
             initial=False):
        """One k-means step: `(dictionary, assignment, quantised, finite)`.

        Args:
            matrix: float32 `[M, C]`, the weights.
            dictionary: float32 `[K, C]` (`[K, 1]` with `channel_scales`).
            scales: with `channel_scales`, `self.scales(matrix)` if already
                computed (else computed here); ignored otherwise.
            num_pruned: with `prune_rate` > 0, an int32 scalar tensor in
                `[0, self.num_pruned(table size)]`: the weights per table
                pruned at this step (a ramp); None for the full count.
                Row 0 stays the zero entry even at 0.
            initial: Python bool; True for a step of the initial fit, which
                takes the cluster means fully (rate 1) whatever
                `dictionary_rate`.

        Returns:
            As `kmeans.kmeans_step`; with `channel_scales`, the quantised
            weights are `scales[c] * d[A]` (`kmeans.scaled_kmeans_step`).
        """
        fixed_zero = self.prune_rate > 0
        rate = 1.0 if initial else self.dictionary_rate
        if self.channel_scales:
            if scales is None:
                scales = self.scales(matrix)
            if num_pruned is None:
                num_pruned = self.num_pruned(
                    matrix.shape[0] * matrix.shape[1])
            return kmeans.scaled_kmeans_step(
                matrix, dictionary, scales, self.constraint, num_pruned,
                fixed_zero, rate)
        if num_pruned is None:
            num_pruned = self.num_pruned(matrix.shape[0])
        return kmeans.kmeans_step(
            matrix, dictionary, self.constraint, num_pruned, fixed_zero,
            rate)

    def with_options(self, **options):
        """A copy with some options replaced (for per-layer overrides).

        A `granularity` replaces this quantizer's layout (its `per_channel`
        and `channel_scales`); the aliases alone update it as before.
        """
        config = self.get_config()
        if "bits" in options or "num_values" in options:
            config.pop("num_values")
        if "granularity" in options:
            config.pop("per_channel")
            config.pop("channel_scales")
        # The fallback was `quantize_model`'s decision for one layer's
        # shapes: a derived quantizer starts without it.
        config["per_channel_fallback"] = False
        config.update(options)
        return LUTQuantizer.from_config(config)

    def get_config(self):
        return {
            "num_values": self.num_values,
            "constraint": constraints_lib.serialize(self.constraint),
            "prune_rate": self.prune_rate,
            "per_channel": self.per_channel,
            "kmeans_every": self.kmeans_every,
            "init_iterations": self.init_iterations,
            "channel_scales": self.channel_scales,
            "dictionary_rate": self.dictionary_rate,
            "per_channel_fallback": self.per_channel_fallback,
        }

    @classmethod
    def from_config(cls, config):
        # Configs saved before `dictionary_rate` (or `per_channel_fallback`)
        # existed load with its default, 1.0 (False): `__init__`'s.
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, LUTQuantizer) and (
            self.get_config() == other.get_config()
        )

    def __repr__(self):
        return (
            f"LUTQuantizer(num_values={self.num_values}, "
            f"constraint={self.constraint!r}, prune_rate={self.prune_rate}, "
            f"per_channel={self.per_channel}, "
            f"channel_scales={self.channel_scales}, "
            f"kmeans_every={self.kmeans_every}, "
            f"dictionary_rate={self.dictionary_rate}"
            + (", per_channel_fallback=True" if self.per_channel_fallback
               else "")
            + ")"
        )


def resolve_granularity(granularity, per_channel=None, channel_scales=None):
    """The granularity that `granularity` and its aliases say together.

    Args:
        granularity: one of `GRANULARITIES`, or None to take it from the
            aliases.
        per_channel: None (not given), or a bool: True is
            `granularity="per_channel"`.
        channel_scales: None (not given), or a bool: True is
            `granularity="per_channel_scaled"`.

    Returns:
        One of `GRANULARITIES` ("per_tensor" when nothing is given).

    Raises:
        TypeError: an alias is not a bool, or `granularity` not a string.
        ValueError: `granularity` is not one of `GRANULARITIES`, or the
            options contradict each other.
    """
    aliases = {
        name: None if value is None else check_bool(name, value)
        for name, value in (("per_channel", per_channel),
                            ("channel_scales", channel_scales))
    }
    if granularity is None:
        if aliases["per_channel"] and aliases["channel_scales"]:
            raise ValueError(
                "per_channel=True and channel_scales=True exclude each other: "
                "choose per-channel dictionaries (per_channel) or one "
                "dictionary over channel-scaled weights (channel_scales); "
                "better, say which with granularity='per_channel' or "
                "'per_channel_scaled'."
            )
        for name, implied in _ALIASES:
            if aliases[name]:
                return implied
        return "per_tensor"
    if not isinstance(granularity, str):
        raise TypeError(
            f"granularity must be one of {list(GRANULARITIES)}, got "
            f"{_describe(granularity)}.")
    if granularity not in GRANULARITIES:
        short = {mode: name for name, mode in _MODES.items()}
        hint = (f" (write {short[granularity]!r})" if granularity in short
                else "")
        raise ValueError(
            f"granularity must be one of {list(GRANULARITIES)}, got "
            f"{granularity!r}{hint}.")
    for name, implied in _ALIASES:
        value = aliases[name]
        if value is not None and value != (granularity == implied):
            raise ValueError(
                f"granularity={granularity!r} and {name}={value} contradict "
                f"each other ({name}=True is the older spelling of "
                f"granularity={implied!r}). Give granularity alone."
            )
    return granularity


def _resolve_num_values(num_values, bits):
    if num_values is None and bits is None:
        raise ValueError("Give the dictionary size: `bits` or `num_values`.")
    if bits is not None:
        bits = check_int("bits", bits, 1)
        if bits > 16:
            raise ValueError(
                f"bits={bits} is more than LUT-Q needs (at most 16); "
                "keep such a layer in float instead."
            )
        if num_values is not None and num_values != 2**bits:
            raise ValueError(
                f"bits={bits} and num_values={num_values} disagree; give one."
            )
        return 2**bits
    return check_int("num_values (K)", num_values, 2)


# Option checks, shared with `quantize_model`. Numpy scalars count as numbers
# (np.float32 is a `numbers.Real`); bools are refused where a number is
# expected, since `True` as a rate or a count is always a mistake.


def _describe(value):
    return f"{value!r} ({type(value).__name__})"


def check_int(name, value, minimum):
    """`value` as a Python int >= `minimum`, else a clear error.

    Integer-valued floats (4.0) are accepted; NaN, Inf, 2.5, strings, None
    and bools are not.

    Raises:
        TypeError: `value` is not a number.
        ValueError: `value` is not an integer >= `minimum`.
    """
    form = f"{name} must be an integer >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Real):
        raise TypeError(f"{form}, got {_describe(value)}.")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{form}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{form}, got {value!r}.")
    return int(value)


def check_fraction(name, value):
    """`value` as a Python float in [0, 1), else a clear error."""
    form = f"{name} must be a fraction in [0, 1)"
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Real):
        raise TypeError(f"{form}, got {_describe(value)}.")
    # NaN fails both comparisons.
    if not 0 <= value < 1:
        raise ValueError(f"{form}, got {value!r}.")
    return float(value)


def check_rate(name, value):
    """`value` as a Python float in [0, 1] (both ends included), else a
    clear error."""
    form = f"{name} must be a float in [0, 1]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Real):
        raise TypeError(f"{form}, got {_describe(value)}.")
    # NaN fails both comparisons.
    if not 0 <= value <= 1:
        raise ValueError(f"{form}, got {value!r}.")
    return float(value)


def check_bool(name, value):
    """`value` as a Python bool; only True/False (numpy's too) are taken.

    A truthiness test would read "no" or "False" as True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{name} must be True or False, got {_describe(value)}."
        )
    return bool(value)
