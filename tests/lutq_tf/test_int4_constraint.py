"""`lutq_tf.constraints.Int4`: dictionaries s * k with distinct integer codes
k in [-8, 7] (or [-7, 7]) and a fitted step s per table, checked against a
numpy reference (exhaustive least squares, and a grid test written from the
definition)."""

import itertools

import keras
import numpy as np
import pytest

import lutq_tf
from lutq_tf import constraints
from lutq_tf import kmeans

EMPTY_WEIGHT = 1e-3  # what an empty cluster weighs in the fit (documented)


def codes_range(symmetric):
    return (-7 if symmetric else -8), 7


def reference_grid(column, low, high):
    """`(s, k)` with column == s * k (to 1e-5 of a code), s > 0 and k
    distinct integers in [low, high]; None if there is no such grid.

    Written from the definition: s is |d_j| / j for some entry and code.
    """
    column = np.asarray(column, np.float64)
    for value in np.abs(column[column != 0]):
        for code in range(1, max(high, -low) + 1):
            step = value / code
            ratio = column / step
            k = np.round(ratio)
            if (np.all(np.abs(ratio - k) <= 1e-5) and k.min() >= low
                    and k.max() <= high and len(set(k)) == len(k)):
                return step, k.astype(int)
    return None


def exhaustive_error(means, counts, low, high, fixed_zero):
    """The least error sum_j w_j (m_j - s k_j)^2 over s > 0 and increasing
    integer codes in range (0 for row 0 and excluded elsewhere with
    `fixed_zero`), by trying every set of codes."""
    weights = counts + EMPTY_WEIGHT
    if fixed_zero:
        means, weights = means[1:], weights[1:]
    levels = [v for v in range(low, high + 1) if not (fixed_zero and v == 0)]
    best = np.inf
    for chosen in itertools.combinations(levels, len(means)):
        k = np.array(chosen, np.float64)
        numerator = np.sum(weights * means * k)
        if numerator <= 0:
            continue
        step = numerator / np.sum(weights * k * k)
        best = min(best, np.sum(weights * (means - step * k) ** 2))
    return best


def random_means(rng, num_values, channels, fixed_zero, positive=False):
    means = rng.normal(size=(num_values, channels)) * rng.uniform(0.01, 3)
    if positive:
        means = np.abs(means)
    means = np.sort(means, axis=0).astype(np.float32)
    if fixed_zero:
        means[0] = 0
        means[1:] = np.sort(means[1:], axis=0)
    return means


def test_int4_fit_is_near_the_exhaustive_least_squares():
    # The fit is a local search (documented): it finds the optimum almost
    # always, and is never far off.
    rng = np.random.default_rng(0)
    found = total = 0
    for symmetric, fixed_zero in itertools.product([False, True], repeat=2):
        constraint = constraints.Int4(symmetric)
        low, high = codes_range(symmetric)
        for num_values in (2, 3, 4):
            for trial in range(6):
                means = random_means(rng, num_values, 1, fixed_zero,
                                     positive=trial % 2 == 1)
                counts = rng.integers(1, 50, means.shape).astype(np.float32)
                d = constraint.project(means, counts, means, fixed_zero)
                weights = counts.astype(np.float64) + EMPTY_WEIGHT
                error = np.sum(weights * (means - d.numpy()) ** 2)
                best = exhaustive_error(means[:, 0].astype(np.float64),
                                        counts[:, 0].astype(np.float64),
                                        low, high, fixed_zero)
                assert error <= 1.5 * best + 1e-9
                found += error <= best * (1 + 1e-4) + 1e-9
                total += 1
    assert found >= 0.9 * total


def test_int4_sixteen_values_take_every_code():
    # K=16 on [-8, 7]: the codes are all of them, the step the closed-form
    # least-squares fit.
    rng = np.random.default_rng(1)
    means = random_means(rng, 16, 3, False)
    counts = rng.integers(1, 30, means.shape).astype(np.float32)
    d = constraints.Int4().project(means, counts, means, False).numpy()
    k = np.arange(-8, 8, dtype=np.float64)[:, None]
    w = counts + EMPTY_WEIGHT
    step = (w * means * k).sum(0) / (w * k * k).sum(0)
    np.testing.assert_allclose(d, k * step[None, :], rtol=1e-5)


@pytest.mark.parametrize("num_values", [2, 5, 15])
@pytest.mark.parametrize("fixed_zero", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_projection_properties(symmetric, fixed_zero, num_values):
    rng = np.random.default_rng(num_values)
    constraint = constraints.Int4(symmetric)
    low, high = codes_range(symmetric)
    means = random_means(rng, num_values, 6, fixed_zero)
    counts = rng.integers(0, 40, means.shape).astype(np.float32)
    d = constraint.project(means, counts, means, fixed_zero).numpy()
    first = 1 if fixed_zero else 0
    if fixed_zero:
        np.testing.assert_array_equal(d[0], 0.0)
    assert np.all(np.diff(d[first:], axis=0) > 0)  # sorted, distinct
    for c in range(d.shape[1]):
        grid = reference_grid(d[:, c], low, high)
        assert grid is not None, d[:, c]
        step, k = grid
        assert step > 0
        if fixed_zero:
            assert k[0] == 0 and np.all(k[1:] != 0)
    # Idempotent: a dictionary on the grid stays (to rounding).
    again = constraint.project(d, counts, d, fixed_zero).numpy()
    np.testing.assert_allclose(again, d, rtol=1e-6, atol=0)
    # The exporter's view: codes and steps that give d bit for bit.
    codes, steps = constraint.codes_and_steps(d, fixed_zero)
    assert codes.dtype == np.int8 and steps.dtype == np.float32
    assert codes.min() >= low and codes.max() <= high and np.all(steps > 0)
    np.testing.assert_array_equal(
        (steps[None, :] * codes.astype(np.float32)).astype(np.float32), d)


def test_int4_codes_and_steps_rejects_a_dictionary_off_the_grid():
    with pytest.raises(ValueError, match="column 0 .* not s \\* k"):
        constraints.Int4().codes_and_steps(
            np.array([[0.1], [0.25], [0.33]], np.float32))


def test_int4_keeps_sorted_dictionaries_through_kmeans_steps():
    # Per channel with pruning, through the k-means step itself.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    constraint = constraints.Int4()
    d = kmeans.seed_dictionary(x, 8, constraint, num_pruned=60)
    for _ in range(3):
        d, a, q, finite = kmeans.kmeans_step(x, d, constraint, num_pruned=60)
    d, a, q = d.numpy(), a.numpy(), q.numpy()
    assert bool(finite)
    np.testing.assert_array_equal(d[0], 0.0)
    assert np.all(np.diff(d[1:], axis=0) > 0)
    np.testing.assert_array_equal(q, np.take_along_axis(d, a, axis=0))
    assert np.all((q == 0).sum(0) == 60)


def test_int4_too_many_values_fail_when_the_quantizer_is_made():
    with pytest.raises(ValueError, match="K=32 .* Use bits<=4"):
        lutq_tf.LUTQuantizer(bits=5, constraint="int4")
    with pytest.raises(ValueError, match="K=16 .* symmetric=False"):
        lutq_tf.LUTQuantizer(num_values=16,
                             constraint=constraints.Int4(symmetric=True))
    lutq_tf.LUTQuantizer(num_values=15,
                         constraint=constraints.Int4(symmetric=True))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    with pytest.raises(ValueError, match="K=32"):
        lutq_tf.quantize_model(model, bits=5, constraint="int4")
    with pytest.raises(ValueError, match="overrides\\['dense'\\]: .*K=32"):
        lutq_tf.quantize_model(model, bits=4, constraint="int4",
                               overrides={"dense": {"bits": 5}})
    # The projection checks too (a constraint used on its own).
    with pytest.raises(ValueError, match="K=17"):
        constraints.Int4().project(np.zeros((17, 1), np.float32),
                                   np.ones((17, 1), np.float32),
                                   np.zeros((17, 1), np.float32), False)


def test_int4_names_and_configs():
    assert constraints.get("int4") == constraints.Int4()
    assert constraints.get("INT4") == constraints.Int4(symmetric=False)
    symmetric = constraints.Int4(symmetric=True)
    assert constraints.get(constraints.serialize(symmetric)) == symmetric
    assert symmetric.get_config() == {"symmetric": True}
    assert repr(symmetric) == "Int4(symmetric=True)"
    quantizer = lutq_tf.LUTQuantizer(bits=4, constraint=symmetric.__class__())
    assert lutq_tf.LUTQuantizer.from_config(quantizer.get_config()) == quantizer
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        constraints.Int4(symmetric="yes")


def tiny_model():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(24, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def assert_int4_tables(model, symmetric=False, fixed_zero=False,
                       layers=None):
    """Every table's Q is s_c * k with integer codes k in range."""
    low, high = codes_range(symmetric)
    for layer in layers or lutq_tf.lutq_layers(model):
        for name, (d, a, q) in layer.quantized_tensors.items():
            matrix_q = q.reshape(-1, q.shape[-1])
            matrix_a = a.reshape(-1, a.shape[-1]).astype(np.int64)
            for c in range(matrix_q.shape[1]):
                column = d[:, min(c, d.shape[1] - 1)]
                grid = reference_grid(column, low, high)
                assert grid is not None, (layer.name, name, c, column)
                step, k = grid
                np.testing.assert_array_equal(matrix_q[:, c],
                                              column[matrix_a[:, c]])
                np.testing.assert_allclose(matrix_q[:, c],
                                           step * k[matrix_a[:, c]],
                                           rtol=1e-5, atol=1e-12)
                if fixed_zero:
                    assert column[0] == 0 and k[0] == 0


def test_int4_training_smoke(tmp_path):
    # "hidden" per tensor, "out" per channel with pruning: one model, so
    # the test compiles each layer's step once.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32)
    model = lutq_tf.quantize_model(
        tiny_model(), bits=4, constraint="int4",
        overrides={"out": {"per_channel": True, "prune_rate": 0.25}})
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    hidden, out = lutq_tf.lutq_layers(model)
    assert hidden.quantized_tensors["kernel"][0].shape == (16, 1)
    assert out.quantized_tensors["kernel"][0].shape == (16, 3)
    assert_int4_tables(model, fixed_zero=False, layers=[hidden])
    assert_int4_tables(model, fixed_zero=True, layers=[out])
    # Save and load: the constraint and the tables come back.
    path = str(tmp_path / "int4.keras")
    model.save(path)
    loaded = lutq_tf.load_model(path)
    for before, after in zip(lutq_tf.lutq_layers(model),
                             lutq_tf.lutq_layers(loaded)):
        assert after.quantizer.constraint == constraints.Int4()
        for (d0, a0, _), (d1, a1, _) in zip(
                before.quantized_tensors.values(),
                after.quantized_tensors.values()):
            np.testing.assert_array_equal(d0, d1)
            np.testing.assert_array_equal(a0, a1)
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  loaded.predict(x, verbose=0))
