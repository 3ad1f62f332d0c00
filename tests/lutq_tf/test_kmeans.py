"""The k-means step against a numpy reference, and its invariants."""

import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest
import reference
import tensorflow as tf

from lutq_tf import LUTQuantizer
from lutq_tf import constraints
from lutq_tf import kmeans

CONSTRAINTS = {
    "none": constraints.Free(),
    "pow2": constraints.PowerOfTwo(min_exponent=-8, max_exponent=2),
    "pow2_nozero": constraints.PowerOfTwo(-8, 2, allow_zero=False),
    "uniform": constraints.Uniform(),
    "uniform_pow2_step": constraints.Uniform(power_of_two_step=True),
}


def _random_problem(rng, rows, channels, k, fixed_zero):
    x = rng.normal(size=(rows, channels)).astype(np.float32)
    d = np.sort(rng.normal(size=(k, channels)), axis=0).astype(np.float32)
    if fixed_zero:
        d[0] = 0
    return x, d


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("num_pruned", [0, 37])
@pytest.mark.parametrize("k", [2, 3, 16, 40, 256])
def test_step_matches_numpy_reference(name, channels, num_pruned, k):
    rng = np.random.default_rng(k * 100 + channels + num_pruned)
    constraint = CONSTRAINTS[name]
    x, d = _random_problem(rng, 300, channels, k, num_pruned > 0)
    d = constraint.project(tf.constant(d), tf.ones_like(d), tf.constant(d),
                           num_pruned > 0).numpy()
    got_d, got_a, got_q, finite = kmeans.kmeans_step(
        tf.constant(x), tf.constant(d), constraint, num_pruned)
    assert bool(finite)
    want_d, want_a = reference.step(x, d, constraint, num_pruned)
    np.testing.assert_array_equal(got_a.numpy(), want_a)
    np.testing.assert_allclose(got_d.numpy(), want_d, rtol=1e-5, atol=1e-7)
    # The cached product is exactly d[A], per column.
    cols = np.arange(channels)[None, :]
    np.testing.assert_array_equal(got_q.numpy(),
                                  got_d.numpy()[got_a.numpy(), cols])


@pytest.mark.parametrize("k", [4, 16, 100])
def test_xla_step_equals_eager_assignment(k):
    rng = np.random.default_rng(k)
    x, d = _random_problem(rng, 500, 3, k, False)
    eager = kmeans.kmeans_step(tf.constant(x), tf.constant(d),
                               constraints.Free(), 0)
    compiled = tf.function(
        lambda x, d: kmeans.kmeans_step(x, d, constraints.Free(), 0),
        jit_compile=True)(tf.constant(x), tf.constant(d))
    np.testing.assert_array_equal(eager[1].numpy(), compiled[1].numpy())
    np.testing.assert_allclose(eager[0].numpy(), compiled[0].numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 301])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 16, 17])
def test_cluster_sums_match_bincount(k, rows, jit):
    # Small per-tensor K adds several weights per scatter update (joint
    # bins); row counts that are not a multiple of the group are padded.
    rng = np.random.default_rng(k * 1000 + rows)
    x = rng.normal(size=(rows, 1)).astype(np.float32)
    a = rng.integers(0, k, size=(rows, 1)).astype(np.int32)
    def sums_fn(x, a):
        return kmeans.cluster_sums(x, a, k)

    if jit:
        sums_fn = tf.function(sums_fn, jit_compile=True)
    sums, counts = sums_fn(tf.constant(x), tf.constant(a))
    assert sums.shape == counts.shape == (k, 1)
    np.testing.assert_array_equal(counts.numpy()[:, 0],
                                  np.bincount(a[:, 0], minlength=k))
    np.testing.assert_allclose(
        sums.numpy()[:, 0],
        np.bincount(a[:, 0], weights=x[:, 0], minlength=k),
        rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("num_pruned", [0, 150, 299])
@pytest.mark.parametrize("k", [4, 64])
def test_step_reports_non_finite_weights(bad, num_pruned, k):
    # The check reads the cluster sums instead of every weight; each weight,
    # wherever it is assigned, must still reach it.
    rng = np.random.default_rng(7)
    x, d = _random_problem(rng, 300, 1, k, num_pruned > 0)
    x[17, 0] = bad
    step = tf.function(
        lambda x, d: kmeans.kmeans_step(x, d, constraints.Free(), num_pruned),
        jit_compile=True)
    assert not bool(step(tf.constant(x), tf.constant(d))[3])
    x[17, 0] = 0.0
    assert bool(step(tf.constant(x), tf.constant(d))[3])


def test_empty_cluster_keeps_its_value():
    x = np.array([[0.0], [0.1], [0.2], [5.0]], np.float32)
    d = np.array([[0.05], [3.0], [5.0]], np.float32)  # entry 1 gets nothing
    new_d, a, _, _ = kmeans.kmeans_step(tf.constant(x), tf.constant(d),
                                        constraints.Free(), 0)
    assert a.numpy().ravel().tolist() == [0, 0, 0, 2]
    np.testing.assert_allclose(new_d.numpy().ravel(), [0.1, 3.0, 5.0],
                               rtol=1e-6)


def test_assignment_ties_go_to_lower_value():
    x = np.array([[0.5], [1.5], [1.0], [1.2]], np.float32)
    d = np.array([[0.0], [1.0], [1.0], [2.0]], np.float32)
    a = kmeans.nearest_assignment(tf.constant(x), tf.constant(d)).numpy()
    # Midway goes to the lower value; a repeated entry takes weights at its
    # value in its first copy and those above it in its last.
    assert a.ravel().tolist() == [0, 2, 1, 2]


def test_pruning_ties_broken_by_position():
    x = np.array([[0.1], [-0.1], [0.1], [2.0], [-3.0]], np.float32)
    mask = kmeans.pruning_mask(tf.constant(x), 2).numpy().ravel()
    assert mask.tolist() == [True, True, False, False, False]


def test_pow2_projection_boundaries():
    pow2 = constraints.PowerOfTwo(min_exponent=-3, max_exponent=1)
    d = tf.constant([[0.06], [0.0624], [0.75], [-0.7], [3.0], [100.0],
                     [-1e-9]])
    got = pow2.project(d, tf.ones_like(d), d, False).numpy().ravel()
    # 0.0625 = 2**-4 is the zero/2**-3 boundary; 0.75 = 1.5 * 2**-1 goes up.
    assert got.tolist() == [0.0, 0.0, 1.0, -0.5, 2.0, 2.0, 0.0]


def test_uniform_codes():
    assert constraints.Uniform.codes(2, False).tolist() == [-0.5, 0.5]
    assert constraints.Uniform.codes(3, False).tolist() == [-1, 0, 1]
    assert constraints.Uniform.codes(4, True).tolist() == [0, -2, -1, 1]


# -- property tests ------------------------------------------------------------

finite = st.floats(-100, 100, allow_nan=False, width=32)


@st.composite
def problems(draw):
    channels = draw(st.integers(1, 3))
    rows = draw(st.integers(4, 40))
    x = draw(hnp.arrays(np.float32, (rows, channels), elements=finite))
    k = draw(st.integers(2, min(rows, 12)))
    constraint = draw(st.sampled_from(sorted(CONSTRAINTS)))
    rate = draw(st.sampled_from([0.0, 0.3, 0.5]))
    return x, k, CONSTRAINTS[constraint], rate


@settings(max_examples=40, deadline=None)
@given(problems())
def test_invariants_hold_after_every_step(problem):
    x, k, constraint, rate = problem
    quantizer = LUTQuantizer(num_values=k, constraint=constraint,
                             prune_rate=rate, init_iterations=2)
    num_pruned = quantizer.num_pruned(x.shape[0])
    d, a, q = quantizer.initialize(tf.constant(x))
    d, a, q, _ = quantizer.step(tf.constant(x), d)
    d, a, q = d.numpy(), a.numpy(), q.numpy()
    cols = np.arange(x.shape[1])[None, :]
    # Q is exactly d[A], with at most K values per table.
    np.testing.assert_array_equal(q, d[a, cols])
    for c in range(x.shape[1]):
        assert len(np.unique(q[:, c])) <= k
    if num_pruned:
        assert num_pruned == math.ceil(rate * x.shape[0] - 1e-9)
        assert np.all(d[0] == 0)
        for c in range(x.shape[1]):
            pruned = a[:, c] == 0
            assert pruned.sum() == num_pruned
            if 0 < num_pruned < x.shape[0]:
                assert (np.abs(x[pruned, c]).max()
                        <= np.abs(x[~pruned, c]).min())
    # Assignment is to the nearest candidate entry (checked with the final
    # dictionary, sorted as the next step sorts it: the step assigned before
    # its means moved d, possibly out of order by an ulp).
    first = 1 if num_pruned else 0
    ordered = kmeans.sort_entries(tf.constant(d), num_pruned > 0).numpy()
    again = kmeans.assign(tf.constant(x), tf.constant(ordered),
                          num_pruned).numpy()
    for c in range(x.shape[1]):
        candidates = ordered[first:, c].astype(np.float64)
        xs = x[:, c].astype(np.float64)
        chosen = np.abs(xs - ordered[again[:, c], c])
        best = np.min(np.abs(xs[:, None] - candidates[None, :]), axis=1)
        keep = again[:, c] != 0 if num_pruned else slice(None)
        # Midpoints are rounded to float32: a weight within half an ulp of
        # one may go to the entry an ulp farther away.
        slack = 2 * np.spacing(np.abs(x[:, c])).astype(np.float64)
        # XLA on CPU flushes subnormal floats to zero.
        slack += np.finfo(np.float32).tiny
        assert np.all(chosen[keep] <= best[keep] * (1 + 1e-6) + slack[keep])
    # The constraint is exact.
    values = d[first:]
    if isinstance(constraint, constraints.PowerOfTwo):
        nonzero = values[values != 0]
        mantissa, exponent = np.frexp(np.abs(nonzero))
        assert np.all(mantissa == 0.5)
        assert np.all((exponent - 1 >= constraint.min_exponent)
                      & (exponent - 1 <= constraint.max_exponent))
        if not constraint.allow_zero:
            assert np.all(values != 0)
    if isinstance(constraint, constraints.Uniform):
        codes = constraints.Uniform.codes(k, num_pruned > 0)
        steps = d / np.where(codes == 0, 1, codes)[:, None]
        for c in range(x.shape[1]):
            s = steps[codes != 0, c]
            np.testing.assert_allclose(s, s[0], rtol=1e-6)
            # K=2 with pruning: {0, s}, s takes the kept weights' sign.
            assert s[0] > 0 or (k == 2 and num_pruned > 0)
            if constraint.power_of_two_step:
                # |s| a power of two (its sign is checked above).
                assert np.frexp(abs(s[0]))[0] == 0.5


@pytest.mark.parametrize("crowded", [0, kmeans.BIN_CAPACITY,
                                     kmeans.BIN_CAPACITY + 1])
def test_bucketed_search_and_its_fallback_are_exact(crowded):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 1)).astype(np.float32)
    d = np.sort(rng.normal(size=(200, 1)), axis=0).astype(np.float32)
    x[:50, 0] = (d[:50, 0] + d[1:51, 0]) / 2  # weights exactly on midpoints
    # `crowded` midpoints within 1e-5, one bin: up to the bin capacity the
    # bucketed search handles them, above it the binary search runs.
    d[100:100 + crowded, 0] = d[99, 0] + 2e-6 * np.arange(1, crowded + 1)
    x[50:60, 0] = d[99, 0] + 1e-6 * (np.arange(10) + 0.5)  # among them
    midpoints = tf.constant((d[1:, 0] + d[:-1, 0]) / 2)
    below = kmeans.midpoints_below_bins(midpoints)
    assert bool(kmeans.bins_fit(below)) == (
        crowded <= kmeans.BIN_CAPACITY)
    # Weights on a midpoint go to the lower entry, as in the binary search;
    # elsewhere the answer is the numpy reference's.
    want = kmeans.binary_search(tf.constant(x),
                                 midpoints[None, :]).numpy()
    np.testing.assert_array_equal(want[50:], reference.assign(x, d, 0)[50:])
    for jit in (False, True):
        assign = tf.function(kmeans.nearest_assignment, jit_compile=jit)
        np.testing.assert_array_equal(
            assign(tf.constant(x), tf.constant(d)).numpy(), want)


@pytest.mark.parametrize("values", [
    np.array([[0.5, -0.0, np.inf, -3e-38, 7.0]], np.float32),
    np.array([[-5, 0, 2**31 - 1, -2**31, 3]], np.int32),
])
def test_materialize_returns_its_input_bit_for_bit(values):
    for jit in (False, True):
        got = tf.function(kmeans.materialize, jit_compile=jit)(
            tf.constant(values)).numpy()
        assert got.dtype == values.dtype
        np.testing.assert_array_equal(got.view(np.int32),
                                      values.view(np.int32))


def test_pow2_default_range_does_not_clip_large_weights():
    # A stem conv with the x255 input scale folded in holds weights ~200.
    pow2 = constraints.PowerOfTwo()
    d = tf.constant([[231.6], [-70.0], [3e-6]])
    got = pow2.project(d, tf.ones_like(d), d, False).numpy().ravel()
    assert got.tolist() == [256.0, -64.0, 0.0]
