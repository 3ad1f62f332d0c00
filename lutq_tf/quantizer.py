"""`LUTQuantizer`: what dictionary a weight tensor gets, and its k-means step."""

import math

import keras
import numpy as np
import tensorflow as tf

from lutq_tf import constraints as constraints_lib
from lutq_tf import kmeans


@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQuantizer:
    """The LUT-Q specification of one weight tensor: Q = d[A].

    Args:
        num_values: K, the number of dictionary entries (>= 2). Give this or
            `bits`.
        bits: index bits; K = 2**bits.
        constraint: "none", "pow2", "uniform" or a
            `lutq_tf.constraints.Constraint`.
        prune_rate: fraction in [0, 1) of each table's weights (smallest
            |W|) assigned to an entry fixed at exactly 0. 0 disables pruning.
        per_channel: one dictionary per output channel instead of one per
            tensor.
        kmeans_every: run the k-means step after every this many optimizer
            steps.
        init_iterations: Lloyd iterations of the initial k-means.
        channel_scales: one dictionary per tensor over the weights divided
            by their output channel's scale `s_c = max |W[:, c]|` (refreshed
            at each k-means step); Q[m, c] = s_c * d[A[m, c]]. Per-channel
            ranges at one table's cost (an exporter folds s_c into the int8
            per-channel scale). Pruning takes the tensor's smallest
            |W[m, c] / s_c|. Excludes `per_channel`.
    """

    def __init__(
        self,
        num_values=None,
        bits=None,
        constraint="none",
        prune_rate=0.0,
        per_channel=False,
        kmeans_every=1,
        init_iterations=20,
        channel_scales=False,
    ):
        self.num_values = _resolve_num_values(num_values, bits)
        self.constraint = constraints_lib.get(constraint)
        if not (isinstance(prune_rate, (int, float)) and 0 <= prune_rate < 1):
            raise ValueError(
                f"prune_rate must be a fraction in [0, 1), got {prune_rate!r}."
            )
        self.prune_rate = float(prune_rate)
        self.per_channel = bool(per_channel)
        self.channel_scales = bool(channel_scales)
        if self.per_channel and self.channel_scales:
            raise ValueError(
                "per_channel=True and channel_scales=True exclude each other: "
                "choose per-channel dictionaries (per_channel) or one "
                "dictionary over channel-scaled weights (channel_scales)."
            )
        if int(kmeans_every) != kmeans_every or kmeans_every < 1:
            raise ValueError(
                f"kmeans_every must be an integer >= 1, got {kmeans_every!r}."
            )
        self.kmeans_every = int(kmeans_every)
        if int(init_iterations) != init_iterations or init_iterations < 1:
            raise ValueError(
                "init_iterations must be an integer >= 1, got "
                f"{init_iterations!r}."
            )
        self.init_iterations = int(init_iterations)

    @property
    def index_bits(self):
        """Bits of one assignment index: ceil(log2 K)."""
        return max(1, math.ceil(math.log2(self.num_values)))

    @property
    def assignment_dtype(self):
        """The smallest unsigned integer dtype that holds indices < K."""
        for dtype in ("uint8", "uint16"):
            if self.num_values - 1 <= np.iinfo(dtype).max:
                return dtype
        return "int32"

    @property
    def mode(self):
        """"tensor", "channel" or "scaled": what one dictionary serves."""
        if self.per_channel:
            return "channel"
        return "scaled" if self.channel_scales else "tensor"

    def num_pruned(self, table_size):
        """Weights of a table of `table_size` fixed to the zero entry."""
        if self.prune_rate == 0:
            return 0
        # The 1e-9 keeps rate * size that is an integer in exact arithmetic
        # (0.5 * 10) from rounding up through float error.
        return min(table_size, math.ceil(self.prune_rate * table_size - 1e-9))

    def scales(self, matrix):
        """The channel scales of a `[M, C]` matrix, or None.

        Returns:
            float32 `[C]`, `s_c = max_m |matrix[m, c]|` (1 for an all-zero
            column), with `channel_scales`; else None.
        """
        if not self.channel_scales:
            return None
        return kmeans.channel_scales(matrix)

    def seed(self, matrix):
        """Initial dictionary for a `[M, C]` matrix: quantile seeds.

        Returns:
            float32 `[K, C]`; `[K, 1]` per tensor or with `channel_scales`
            (seeded from the normalised weights).
        """
        if self.channel_scales:
            matrix = tf.reshape(matrix / self.scales(matrix), [-1, 1])
        return kmeans.seed_dictionary(
            matrix, self.num_values, self.constraint,
            self.num_pruned(matrix.shape[0]),
        )

    def initialize(self, matrix):
        """`(dictionary, assignment, quantised)` fitted to a `[M, C]` matrix.

        Quantile seeds, then `init_iterations` k-means steps.
        """
        dictionary = self.seed(matrix)
        scales = self.scales(matrix)
        for _ in range(self.init_iterations):
            dictionary, assignment, quantized, _ = self.step(
                matrix, dictionary, scales)
        return dictionary, assignment, quantized

    def step(self, matrix, dictionary, scales=None):
        """One k-means step: `(dictionary, assignment, quantised, finite)`.

        Args:
            matrix: float32 `[M, C]`, the weights.
            dictionary: float32 `[K, C]` (`[K, 1]` with `channel_scales`).
            scales: with `channel_scales`, `self.scales(matrix)` if already
                computed (else computed here); ignored otherwise.

        Returns:
            As `kmeans.kmeans_step`; with `channel_scales`, the quantised
            weights are `scales[c] * d[A]` (`kmeans.scaled_kmeans_step`).
        """
        if self.channel_scales:
            if scales is None:
                scales = self.scales(matrix)
            return kmeans.scaled_kmeans_step(
                matrix, dictionary, scales, self.constraint,
                self.num_pruned(matrix.shape[0] * matrix.shape[1]),
            )
        return kmeans.kmeans_step(
            matrix,
            dictionary,
            self.constraint,
            self.num_pruned(matrix.shape[0]),
        )

    def with_options(self, **options):
        """A copy with some options replaced (for per-layer overrides)."""
        config = self.get_config()
        if "bits" in options or "num_values" in options:
            config.pop("num_values")
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
        }

    @classmethod
    def from_config(cls, config):
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
            f"kmeans_every={self.kmeans_every})"
        )


def _resolve_num_values(num_values, bits):
    if num_values is None and bits is None:
        raise ValueError("Give the dictionary size: `bits` or `num_values`.")
    if bits is not None:
        if isinstance(bits, bool) or int(bits) != bits or bits < 1:
            raise ValueError(f"bits must be an integer >= 1, got {bits!r}.")
        if bits > 16:
            raise ValueError(
                f"bits={bits} is more than LUT-Q needs (at most 16); "
                "keep such a layer in float instead."
            )
        if num_values is not None and num_values != 2**bits:
            raise ValueError(
                f"bits={bits} and num_values={num_values} disagree; give one."
            )
        return 2 ** int(bits)
    if isinstance(num_values, bool) or int(num_values) != num_values or (
        num_values < 2
    ):
        raise ValueError(
            f"num_values (K) must be an integer >= 2, got {num_values!r}."
        )
    return int(num_values)
