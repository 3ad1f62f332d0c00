"""The LUT-Q k-means step on one weight matrix, as pure TensorFlow functions.

Weights are viewed as a matrix `x` of shape `[M, C]`: C tables (1 for a
per-tensor dictionary, else one per output channel) of M weights each. The
dictionary `d` is `[K, C]` and the assignment `a` is `[M, C]` with values in
`[0, K)`; the quantised weights are `q[m, c] = d[a[m, c], c]`.

In the scaled-dictionary mode (`scaled_kmeans_step`), each column is first
divided by its scale `s_c` (its RMS), the normalised columns form one
table `[M * C, 1]` with one dictionary `[K, 1]`, and
`q[m, c] = s_c * d[a[m, c]]`. An all-zero column has `s_c = 0`: its
normalised weights are 0, they leave the cluster means alone, and its `q`
is exactly 0.

With pruning, row 0 of `d` is the pruning entry, fixed at exactly 0, and
exactly `num_pruned` weights of each table (the smallest |x|; ties broken by
position) are assigned to it; the other weights go to the nearest of rows
`1..K-1`.

Dictionaries are kept sorted along axis 0 (with pruning, rows 1..K-1).
Every function is deterministic: ties in the assignment go to the lower
dictionary entry, ties in pruning to the earlier weight.
"""

import numpy as np
import tensorflow as tf

# Up to this many entries, counting the midpoints below each weight (K-1
# fused compares) beats the binary search's gathers on CPU under XLA.
_LINEAR_SEARCH_MAX_VALUES = 32


def materialize(table):
    """Returns a small tensor unchanged, computed once.

    XLA fuses cheap producers into their consumers, so a table read by a
    loop over every weight (midpoints, the dictionary, a cumsum) would be
    recomputed for each weight: 10x slower at K=16. XLA never fuses a
    scatter into its consumers, so the values pass through one that writes
    every position (a copy).
    """
    flat = tf.reshape(table, [-1])
    positions = tf.range(tf.size(flat))[:, None]
    copied = tf.tensor_scatter_nd_update(tf.zeros_like(flat), positions, flat)
    return tf.reshape(copied, tf.shape(table))


def nearest_assignment(x, dictionary):
    """Index of the nearest dictionary row for every weight.

    Counts the midpoints between consecutive entries that lie strictly below
    each weight: the nearest entry, ties going to the lower one. For small K
    it compares against every midpoint (K-1 compares that XLA fuses into one
    pass). For larger K, a per-tensor dictionary uses a bucketed search (a
    few gathers from small tables per weight, O(1)), and per-channel ones a
    branchless binary search (O(log K) gathers). All beat tf.searchsorted
    and an `[M, C, K]` distance matrix on CPU under XLA.

    Args:
        x: float32 `[M, C]`.
        dictionary: float32 `[K, C]`, sorted ascending along axis 0 (equal
            entries split the weights at their value).

    Returns:
        int32 `[M, C]`, row indices into `dictionary`.
    """
    num_values = dictionary.shape[0]
    channels = x.shape[1]
    if num_values == 1:
        return tf.zeros_like(x, dtype=tf.int32)
    midpoints = 0.5 * (dictionary[1:] + dictionary[:-1])  # [K-1, C]
    if num_values <= _LINEAR_SEARCH_MAX_VALUES:
        # XLA fuses the broadcast compare into the sum; no [M, C, K-1]
        # tensor is made. A reduction (unlike a chain of adds) is also
        # never recomputed inside each consumer of the assignment.
        above = x[:, :, None] > materialize(tf.transpose(midpoints))[None]
        return tf.reduce_sum(tf.cast(above, tf.int32), axis=2)
    if channels == 1:
        midpoints = materialize(midpoints[:, 0])
        below = midpoints_below_bins(midpoints)
        return tf.cond(
            bins_fit(below),
            lambda: bin_search(x, midpoints, below),
            lambda: binary_search(x, midpoints[None, :]),
        )
    return binary_search(x, tf.transpose(midpoints))


# The bucketed search: a uniform grid of bins over the midpoints' range,
# and per bin the number of midpoints below it. A bin may hold up to
# BIN_CAPACITY midpoints, which each weight compares against. Small tables
# matter: XLA's CPU gathers cost ~0.5 ns from an L1-resident table and ~5 ns
# from a 192 KiB one (this one is 16 KiB), and each compare is a gather: 4
# per weight instead of 2 cost 15 % more on a 784x512 kernel. A 256-entry
# k-means dictionary fitted to the MLPerf Tiny ResNet-8's kernels, or to
# Gaussian, Laplace or Student-t(3) weights, puts at most 1 midpoint in a
# bin; denser ones fall back to the binary search.
NUM_BINS = 4096
BIN_CAPACITY = 2


def bin_index(values, low, high):
    """Bin of each value on a uniform grid over [low, high]: 0 .. NUM_BINS.

    Monotone non-decreasing in `values`, also under float rounding, which is
    all that the bucketed search's exactness needs.
    """
    scale = (NUM_BINS - 1) / tf.maximum(high - low, 1e-30)
    bins = tf.floor(tf.clip_by_value((values - low) * scale, -1.0,
                                     NUM_BINS - 1.0))
    return tf.cast(bins, tf.int32) + 1


def midpoints_below_bins(midpoints):
    """Midpoints (sorted, `[K-1]`) below each bin: int32 `[NUM_BINS + 2]`.

    Entry b counts the midpoints in bins < b (b = 0 .. NUM_BINS + 1).
    """
    bins = bin_index(midpoints, midpoints[0], midpoints[-1])
    in_bin = tf.math.unsorted_segment_sum(tf.ones_like(bins), bins,
                                          NUM_BINS + 2)
    return materialize(tf.cumsum(in_bin, exclusive=True))


def bins_fit(below):
    """True if no bin holds more than `BIN_CAPACITY` midpoints.

    Args:
        below: `midpoints_below_bins(midpoints)`.
    """
    return tf.reduce_max(below[1:] - below[:-1]) <= BIN_CAPACITY


def bin_search(x, midpoints, below):
    """Number of midpoints strictly below x, for one table (`x` `[M, 1]`).

    Per weight: one gather of the count of midpoints below its bin, then
    `BIN_CAPACITY` compares against the next midpoints (+inf past the
    end). Exact when `bins_fit(below)`: by the binning's monotonicity,
    midpoints of lower bins are below x and those of higher bins are not, so
    only the bin's own midpoints need comparing.

    Args:
        x: float32 `[M, 1]`.
        midpoints: float32 `[K-1]`, sorted.
        below: `midpoints_below_bins(midpoints)`.
    """
    low, high = midpoints[0], midpoints[-1]
    padded = tf.concat(
        [midpoints, tf.fill([BIN_CAPACITY], np.float32(np.inf))], axis=0)
    values = x[:, 0]
    start = tf.gather(below, bin_index(values, low, high))
    # Summed as a reduction so XLA computes it once, not inside each
    # consumer (sums, lookup, storage cast) as it would an elementwise op.
    terms = [start] + [
        tf.cast(values > tf.gather(padded, start + j), tf.int32)
        for j in range(BIN_CAPACITY)
    ]
    return tf.reduce_sum(tf.stack(terms, axis=1), axis=1)[:, None]


def binary_search(x, midpoints):
    """Number of midpoints strictly below x per column; midpoints `[C, K-1]`."""
    channels, count = midpoints.shape
    # Pad to 2**r - 1 midpoints with +inf so every round halves exactly.
    rounds = int(np.ceil(np.log2(count + 1)))
    width = 2**rounds - 1
    midpoints = tf.pad(
        midpoints, [[0, 0], [0, width - count]], constant_values=np.inf
    )
    flat_midpoints = materialize(tf.reshape(midpoints, [-1]))
    row_offset = tf.range(channels, dtype=tf.int32)[None, :] * width
    position = tf.zeros_like(x, dtype=tf.int32)
    for r in reversed(range(rounds)):
        candidate = position + 2**r
        threshold = tf.gather(flat_midpoints, row_offset + candidate - 1)
        position = tf.where(x > threshold, candidate, position)
    return position


def pruning_mask(x, num_pruned):
    """The `num_pruned` smallest-|x| weights of each column, ties by position.

    Finds each column's threshold exactly by bisection on the bit patterns
    of |x| (non-negative floats order like their int32 bits), 31 counting
    passes instead of a sort.

    Args:
        x: float32 `[M, C]`, finite.
        num_pruned: Python int or int32 scalar tensor in `[0, M]`.

    Returns:
        bool `[M, C]` with exactly `num_pruned` True per column.
    """
    if isinstance(num_pruned, int) and num_pruned == 0:
        return tf.zeros_like(x, dtype=tf.bool)
    bits = tf.bitcast(tf.abs(x), tf.int32)
    channels = x.shape[1]
    low = tf.fill([channels], tf.constant(-1, tf.int32))
    high = tf.fill([channels], tf.constant(0x7F800000, tf.int32))
    # Invariant: count(bits <= low) < num_pruned <= count(bits <= high).
    for _ in range(31):
        middle = low + (high - low) // 2
        count = tf.reduce_sum(tf.cast(bits <= middle[None, :], tf.int32), 0)
        enough = count >= num_pruned
        high = tf.where(enough, middle, high)
        low = tf.where(enough, low, middle)
    below = bits < high[None, :]
    at = bits == high[None, :]
    missing = num_pruned - tf.reduce_sum(tf.cast(below, tf.int32), axis=0)
    rank_at = tf.cumsum(tf.cast(at, tf.int32), axis=0)
    return below | (at & (rank_at <= missing[None, :]))


def assign(x, dictionary, num_pruned, fixed_zero=None):
    """The LUT-Q assignment: nearest entry, with pruning if `num_pruned`.

    Args:
        x: float32 `[M, C]`.
        dictionary: float32 `[K, C]`, sorted; with pruning row 0 is the zero
            entry and rows 1.. are sorted.
        num_pruned: Python int (0 disables pruning) or int32 scalar tensor.
        fixed_zero: Python bool, whether row 0 is the zero entry; defaults
            to `num_pruned > 0` (required for a tensor `num_pruned`).

    Returns:
        int32 `[M, C]`.
    """
    if fixed_zero is None:
        fixed_zero = num_pruned > 0
    if not fixed_zero:
        return nearest_assignment(x, dictionary)
    nearest = nearest_assignment(x, dictionary[1:]) + 1
    return tf.where(pruning_mask(x, num_pruned), 0, nearest)


def sort_entries(dictionary, fixed_zero):
    """Sorts each column's entries; with `fixed_zero`, row 0 stays first."""
    if fixed_zero:
        return tf.concat(
            [dictionary[:1], tf.sort(dictionary[1:], axis=0)], axis=0)
    return tf.sort(dictionary, axis=0)


# XLA's CPU scatter-add costs about the same per update whatever the update's
# width, so a per-tensor table adds `g` consecutive weights in one update, to
# the joint bin of their g entries (K**g bins), and folds the bins afterwards.
# Up to 256 bins (an L1-resident table) this halves the K=16 sums and takes
# 40 % off K=4's; per-channel tables would need C times the bins and are
# slower grouped.
_MAX_JOINT_BINS = 256


def _group_size(num_values, channels):
    """Weights per scatter update: the largest g with K**g <= 256, per tensor."""
    group = 1
    if channels == 1:
        while num_values ** (group + 1) <= _MAX_JOINT_BINS:
            group += 1
    return group


def cluster_sums(x, assignment, num_values):
    """Per-entry weight sums and counts, each float32 `[K, C]`."""
    channels = x.shape[1]
    group = _group_size(num_values, channels)
    if group > 1:
        return _grouped_cluster_sums(x, assignment, num_values, group)
    segment = assignment * channels + tf.range(channels, dtype=tf.int32)[None]
    segment = tf.reshape(segment, [-1])
    values = tf.stack([tf.reshape(x, [-1]), tf.ones([tf.size(x)])], axis=1)
    sums = tf.math.unsorted_segment_sum(values, segment,
                                        num_values * channels)
    sums = tf.reshape(sums, [num_values, channels, 2])
    return sums[..., 0], sums[..., 1]


def _grouped_cluster_sums(x, assignment, num_values, group):
    """`cluster_sums` of a `[M, 1]` table, `group` weights per update."""
    pad = -x.shape[0] % group
    # Padding weights are 0 in entry 0: they add nothing to its sum and
    # `pad` to its count, taken off below.
    x = tf.reshape(tf.pad(x, [[0, pad], [0, 0]]), [-1, group])
    assignment = tf.reshape(tf.pad(assignment, [[0, pad], [0, 0]]),
                            [-1, group])
    joint = assignment[:, 0]
    for j in range(1, group):
        joint = joint * num_values + assignment[:, j]
    values = tf.concat([x, tf.ones_like(x[:, :1])], axis=1)
    bins = tf.math.unsorted_segment_sum(values, joint, num_values**group)
    # Column j of a bin sums the groups' j-th weights, the last column counts
    # the groups. The j-th weight's entry is digit j (most significant
    # first) of `joint` in base K: the middle axis below.
    sums = 0.0
    counts = 0.0
    for j in range(group):
        digit_j = tf.reshape(
            bins, [num_values**j, num_values, -1, group + 1])
        sums += tf.reduce_sum(digit_j[..., j], axis=[0, 2])
        counts += tf.reduce_sum(digit_j[..., group], axis=[0, 2])
    if pad:
        counts -= pad * tf.one_hot(0, num_values)
    return sums[:, None], counts[:, None]


def lookup(dictionary, assignment):
    """q = d[a] per column: float32 `[M, C]`."""
    num_values, channels = dictionary.shape
    flat = tf.reshape(dictionary, [-1])
    return tf.gather(
        flat, assignment * channels + tf.range(channels, dtype=tf.int32)[None]
    )


def kmeans_step(x, dictionary, constraint, num_pruned, fixed_zero=None,
                dictionary_rate=1.0):
    """One LUT-Q k-means step.

    Assignment to the nearest entry (pruning first, if any), cluster means
    (an empty cluster keeps its value), the blend of the means into the old
    dictionary (`dictionary_rate`), then the constraint's projection.

    Args:
        x: float32 `[M, C]`, the full-precision weights.
        dictionary: float32 `[K, C]`.
        constraint: a `lutq_tf.constraints.Constraint`.
        num_pruned: Python int, weights per column fixed to the zero entry,
            or an int32 scalar tensor (then give `fixed_zero`).
        fixed_zero: Python bool, whether row 0 is the zero entry; defaults
            to `num_pruned > 0`. True with `num_pruned` 0 keeps the entry
            unused (a pruning ramp's start).
        dictionary_rate: Python float in [0, 1]: the dictionary moves this
            share of the way to the cluster means, d + rate * (means - d),
            before the projection. 1 (the default) takes the means as they
            are (no blend is computed, so the result is bit-identical to a
            step without the option); 0 keeps d (only A moves).

    Returns:
        `(dictionary, assignment, quantised, finite)`: float32 `[K, C]`,
        int32 `[M, C]`, float32 `[M, C]` with `quantised == d[a]` exactly,
        and a bool scalar, False if `x` holds NaN or Inf (the other outputs
        are then meaningless).
    """
    if fixed_zero is None:
        fixed_zero = num_pruned > 0
    dictionary, assignment, sums, counts = _assign_and_sum(
        x, dictionary, num_pruned, fixed_zero)
    return _refit(dictionary, assignment, sums, counts, constraint,
                  fixed_zero, dictionary_rate)


def _assign_and_sum(x, dictionary, num_pruned, fixed_zero):
    """`kmeans_step`'s first half: `(sorted d, assignment, sums, counts)`."""
    # Every step keeps d sorted (cluster means of a nearest-entry partition
    # stay in order, the projections are monotone); sorting again costs
    # nothing and guards against a one-ulp inversion from rounding.
    dictionary = sort_entries(dictionary, fixed_zero)
    assignment = assign(x, dictionary, num_pruned, fixed_zero)
    sums, counts = cluster_sums(x, assignment, dictionary.shape[0])
    return dictionary, assignment, sums, counts


def _refit(dictionary, assignment, sums, counts, constraint, fixed_zero,
           dictionary_rate):
    """`kmeans_step`'s second half: the means, the blend, the projection."""
    # Every weight, pruned ones included, adds to some sum, so a NaN or Inf
    # in x shows here: a [K, C] check instead of a pass over x.
    finite = tf.reduce_all(tf.math.is_finite(sums))
    means = tf.where(counts > 0, sums / tf.maximum(counts, 1.0), dictionary)
    # Decided in Python on the constant: rate 1 builds today's graph, and
    # rate 0 keeps d exactly (0 * (means - d) could be NaN on overflow). A
    # blend of two sorted dictionaries stays sorted.
    if dictionary_rate == 0:
        means = dictionary
    elif dictionary_rate != 1:
        means = dictionary + np.float32(dictionary_rate) * (means - dictionary)
    if fixed_zero:
        means = tf.concat([tf.zeros_like(means[:1]), means[1:]], axis=0)
    projected = materialize(
        constraint.project(means, counts, dictionary, fixed_zero))
    return projected, assignment, lookup(projected, assignment), finite


def channel_scales(x):
    """Each column's scale: its RMS `s_c = sqrt(mean_m x[m, c]^2)` (0 for an
    all-zero column, whose quantised weights are then exactly 0).

    RMS rather than the largest |x|: one outlier would squeeze a channel's
    bulk of weights near 0. On CIFAR-10 ResNet-8 (k-means fit alone, no
    training, 3,000 test images) RMS gave 50.4 % at 4 bits and 33.3 % at 2
    bits, the largest |x| 36.1 % and 0.3 % (per tensor: 41.0 %, 10.7 %).

    A NaN or Inf in a column reaches the normalised weights (x / s is NaN),
    so `scaled_kmeans_step`'s finite check still sees it.

    Args:
        x: float32 `[M, C]`.

    Returns:
        float32 `[C]`.
    """
    # Squares of weights above ~1.8e19 overflow float32: take them relative
    # to the column's largest |x| (a NaN or Inf in x still reaches s).
    peak = tf.reduce_max(tf.abs(x), axis=0)
    unit = tf.where(peak > 0, peak, tf.ones_like(peak))
    rms = unit * tf.sqrt(tf.reduce_mean(tf.square(x / unit[None, :]), axis=0))
    # Materialised: the division and the final product read it per weight.
    return materialize(rms)


def normalize(x, scales):
    """The normalised weights `x[m, c] / s_c`, 0 in columns with `s_c = 0`.

    A column holding NaN or Inf has a NaN scale, so its normalised weights
    stay NaN (the step's finite check sees them).

    Args:
        x: float32 `[M, C]`.
        scales: float32 `[C]`, `channel_scales(x)`.

    Returns:
        float32 `[M, C]`.
    """
    # s_c = 0 only in an all-zero column, whose weights 0 / 1 are 0: no
    # per-weight select (XLA would recompute it in each consumer).
    safe = materialize(tf.where(scales == 0, tf.ones_like(scales), scales))
    return x / safe[None, :]


def scaled_kmeans_step(x, dictionary, scales, constraint, num_pruned,
                       fixed_zero=None, dictionary_rate=1.0):
    """One LUT-Q k-means step on channel-normalised weights.

    The normalised weights `x[m, c] / s_c` of all columns form one table
    (`[M * C, 1]`, row-major) that `kmeans_step` fits one dictionary to:
    assignment, pruning over the whole table, cluster means, projection.
    An all-zero column (`s_c = 0`) is normalised to 0 and assigned (pruned
    first, else to the entry nearest 0) but not counted in the cluster
    means, so it pulls no entry towards 0; its quantised weights are +0.

    Args:
        x: float32 `[M, C]`, the full-precision weights.
        dictionary: float32 `[K, 1]`, over normalised weights.
        scales: float32 `[C]`, `channel_scales(x)`.
        constraint: a `lutq_tf.constraints.Constraint`.
        num_pruned: Python int, weights of the whole table (M * C) fixed to
            the zero entry, or an int32 scalar tensor.
        fixed_zero: as `kmeans_step`'s.
        dictionary_rate: as `kmeans_step`'s.

    Returns:
        `(dictionary, assignment, quantised, finite)`: float32 `[K, 1]`,
        int32 `[M, C]`, float32 `[M, C]` with
        `quantised[m, c] == scales[c] * d[a[m, c]]` exactly (one float32
        product; +0 where `scales[c]` is 0), and a bool scalar, False if `x`
        holds NaN or Inf.
    """
    if fixed_zero is None:
        fixed_zero = num_pruned > 0
    num_values = dictionary.shape[0]
    channels = x.shape[1]
    table = tf.reshape(normalize(x, scales), [-1, 1])
    dictionary, assignment, sums, counts = _assign_and_sum(
        table, dictionary, num_pruned, fixed_zero)
    zero = scales == 0

    def zero_column_counts():
        # Their weights are 0: they add to the counts only.
        weights = tf.broadcast_to(tf.cast(zero, tf.float32)[None, :],
                                  tf.shape(x))
        return tf.math.unsorted_segment_sum(
            tf.reshape(weights, [-1]), tf.reshape(assignment, [-1]),
            num_values)[:, None]

    # A second pass over the weights, only for a tensor with an all-zero
    # column: a count mask inside the cluster sums cost every tensor
    # 15-20 % of its step (784x512, K=4 and 16), a branch around the whole
    # step about twice its compile time.
    counts -= tf.cond(tf.reduce_any(zero), zero_column_counts,
                      lambda: tf.zeros_like(counts))
    dictionary, assignment, normalised, finite = _refit(
        dictionary, assignment, sums, counts, constraint, fixed_zero,
        dictionary_rate)
    assignment = tf.reshape(assignment, [-1, channels])
    quantized = tf.reshape(normalised, [-1, channels]) * scales[None, :]
    # +0, not the -0 of 0 times a negative entry.
    quantized = tf.where(zero[None, :], tf.zeros_like(quantized), quantized)
    return dictionary, assignment, quantized, finite


def seed_dictionary(x, num_values, constraint, num_pruned):
    """Initial entries from the quantiles of each column, projected.

    Quantile seeding is deterministic and, in one dimension, places seeds
    where the weights are dense, which k-means++ only does in expectation.
    Lloyd iterations (`kmeans_step`) refine them.

    Args:
        x: float32 `[M, C]`, finite.
        num_values: K.
        constraint: a `Constraint`.
        num_pruned: Python int; if > 0, row 0 is the zero entry.

    Returns:
        float32 `[K, C]`.
    """
    fixed_zero = num_pruned > 0
    free = num_values - 1 if fixed_zero else num_values
    rows = x.shape[0]
    ordered = tf.sort(x, axis=0)
    positions = np.floor((np.arange(free) + 0.5) / free * rows).astype(np.int32)
    seeds = tf.gather(ordered, np.minimum(positions, rows - 1), axis=0)
    if fixed_zero:
        seeds = tf.concat([tf.zeros_like(seeds[:1]), seeds], axis=0)
    return constraint.project(seeds, tf.ones_like(seeds), seeds, fixed_zero)


def scaled_seed_dictionary(x, scales, num_values, constraint, num_pruned):
    """`seed_dictionary` of the normalised weights of the non-zero columns.

    All-zero columns (`s_c = 0`) are left out, as from the cluster means;
    if every column is zero, the seeds come from the zeros.

    Args:
        x: float32 `[M, C]`, finite; eager (the number of non-zero columns
            sets the table's length).
        scales: float32 `[C]`, `channel_scales(x)`.
        num_values: K.
        constraint: a `Constraint`.
        num_pruned: Python int; if > 0, row 0 is the zero entry.

    Returns:
        float32 `[K, 1]`.
    """
    normalised = normalize(x, scales)
    live = scales != 0
    if bool(tf.reduce_any(live)):
        normalised = tf.boolean_mask(normalised, live, axis=1)
    return seed_dictionary(tf.reshape(normalised, [-1, 1]), num_values,
                           constraint, num_pruned)
