"""A plain numpy LUT-Q step, written from the method's definition, to check
lutq_tf.kmeans against. Column c of `x` ([M, C]) is one table."""

import numpy as np


def assign(x, d, num_pruned):
    """Nearest entry of the sorted dictionary; a weight exactly between two
    entries (or on a repeated entry's value) goes to the lower index."""
    m, c = x.shape
    a = np.zeros((m, c), np.int64)
    first = 1 if num_pruned else 0
    for j in range(c):
        col, candidates = x[:, j], d[first:, j]
        assert np.all(np.diff(candidates) >= 0), "dictionary must be sorted"
        for i, value in enumerate(col):
            distance = np.abs(value - candidates)
            best = np.flatnonzero(distance == distance.min())
            # Among equally near entries, the lowest index, unless the value
            # lies strictly above a repeated entry: then the last repeat.
            k = best[0]
            while (k + 1 < len(candidates)
                   and candidates[k + 1] == candidates[k]
                   and value > candidates[k]):
                k += 1
            a[i, j] = k + first
        if num_pruned:
            order = np.lexsort((np.arange(m), np.abs(col)))
            a[order[:num_pruned], j] = 0
    return a


def means(x, a, d):
    out = d.astype(np.float64).copy()
    counts = np.zeros_like(out)
    for k in range(d.shape[0]):
        for j in range(d.shape[1]):
            members = x[a[:, j] == k, j]
            counts[k, j] = members.size
            if members.size:
                out[k, j] = members.astype(np.float64).mean()
    return out, counts


def project_pow2(d, min_e, max_e, allow_zero, fixed_zero):
    powers = 2.0 ** np.arange(min_e, max_e + 1)
    candidates = np.concatenate([-powers[::-1], powers])
    if allow_zero:
        candidates = np.concatenate([candidates, [0.0]])
    flat = d.reshape(-1)
    distance = np.abs(flat[:, None] - candidates[None, :])
    # Ties go to the larger magnitude, as lutq_tf documents.
    distance = distance - 1e-12 * np.abs(candidates)[None, :]
    out = candidates[np.argmin(distance, axis=1)].reshape(d.shape)
    if fixed_zero:
        out[0] = 0
    return out


def project_uniform(d, counts, codes, previous, pow2_step=False):
    if len(codes) == 2 and codes[0] == 0:
        # K=2 with pruning: {0, v}, v the kept weights' mean, either sign.
        v = np.where(counts[1] > 0, d[1], previous[1])
        step = np.maximum(np.abs(v), 1e-30)
        if pow2_step:
            low = 2.0 ** np.floor(np.log2(step))
            step = np.where(step - low >= 2 * low - step, 2 * low, low)
        return np.stack([np.zeros_like(v), np.where(v < 0, -1.0, 1.0) * step])
    g = codes[:, None]
    num = (counts * g * d).sum(0)
    den = (counts * g * g).sum(0)
    fallback = (np.abs(previous) * np.abs(g)).sum(0) / (g * g).sum(0)
    step = np.where((den > 0) & (num > 0), num / np.maximum(den, 1e-30),
                    fallback)
    if pow2_step:
        low = 2.0 ** np.floor(np.log2(step))
        step = np.where(step - low >= 2 * low - step, 2 * low, low)
    return g * step[None, :]


def step(x, d, constraint, num_pruned):
    """Returns (dictionary, assignment) after one LUT-Q step."""
    from lutq_tf import constraints

    a = assign(x, d, num_pruned)
    mu, counts = means(x, a, d)
    if num_pruned:
        mu[0] = 0
    if isinstance(constraint, constraints.Free):
        out = mu
    elif isinstance(constraint, constraints.PowerOfTwo):
        out = project_pow2(mu, constraint.min_exponent,
                           constraint.max_exponent, constraint.allow_zero,
                           num_pruned > 0)
    elif isinstance(constraint, constraints.Uniform):
        codes = constraints.Uniform.codes(d.shape[0], num_pruned > 0)
        out = project_uniform(mu, counts, codes.astype(np.float64), d,
                              constraint.power_of_two_step)
    else:
        raise NotImplementedError(constraint)
    return out, a
