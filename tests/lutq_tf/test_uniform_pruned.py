"""Uniform grids with pruning at K=2: the one non-zero entry keeps the sign
of the weights it serves."""

import numpy as np
import pytest

import lutq_tf
from lutq_tf import kmeans


@pytest.mark.parametrize("power_of_two_step", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_uniform_two_values_with_pruning_keeps_the_sign(sign,
                                                        power_of_two_step):
    # K=2 with pruning: the grid {0, v}; v has the kept weights' sign
    # (it was always -s, flipping every kept positive weight).
    rng = np.random.default_rng(0)
    x = (sign * np.abs(rng.normal(size=(200, 3)))).astype("float32")
    constraint = lutq_tf.constraints.Uniform(power_of_two_step)
    d = np.array([[0.0] * 3, [-0.5 * sign] * 3], "float32")  # wrong sign
    d, a, q, finite = kmeans.kmeans_step(x, d, constraint, num_pruned=100)
    assert bool(finite)
    d, a, q = d.numpy(), a.numpy(), q.numpy()
    np.testing.assert_array_equal(d[0], 0.0)
    assert np.all(np.sign(d[1]) == sign)
    assert np.all(q * x >= 0)  # no weight changes sign
    kept_mean = np.array([x[a[:, c] == 1, c].mean() for c in range(3)])
    if power_of_two_step:
        assert np.all(np.frexp(np.abs(d[1]))[0] == 0.5)
        np.testing.assert_allclose(d[1], kept_mean, rtol=0.5)
    else:
        np.testing.assert_allclose(d[1], kept_mean, rtol=1e-5)
