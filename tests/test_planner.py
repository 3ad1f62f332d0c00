"""The flash-budget planner: knapsack, byte estimate, plans, budgets, bad input."""

import itertools
import json
import os

import keras
import numpy as np
import pytest

from experiments import datasets
from experiments import models
import lutq_tf
import tflite_export
from tflite_export import knapsack
from tflite_export import plan as plan_cli
from tflite_export import plan_costs
from tflite_export import planner
from tflite_export import sensitivity

# -- knapsack ----------------------------------------------------------------


def _brute_force(groups, capacity):
    best = None
    for combo in itertools.product(*[range(len(g)) for g in groups]):
        size = sum(groups[i][j][0] for i, j in enumerate(combo))
        cost = sum(groups[i][j][1] for i, j in enumerate(combo))
        if size <= capacity and (best is None or cost < best - 1e-12):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups = [
        [(int(rng.integers(0, 60)), float(rng.uniform(0, 10)))
         for _ in range(rng.integers(1, 5))]
        for _ in range(rng.integers(1, 6))
    ]
    capacity = int(rng.integers(0, 200))
    expected = _brute_force(groups, capacity)
    picks = knapsack.solve(groups, capacity, grid=1)
    if expected is None:
        assert picks is None
        return
    size = sum(groups[i][j][0] for i, j in enumerate(picks))
    cost = sum(groups[i][j][1] for i, j in enumerate(picks))
    assert size <= capacity
    assert cost == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(10))
def test_knapsack_on_a_coarse_grid_stays_within_capacity(seed):
    rng = np.random.default_rng(100 + seed)
    groups = [[(int(rng.integers(100, 5000)), float(rng.uniform(0, 1)))
               for _ in range(6)] for _ in range(8)]
    capacity = int(sum(min(b for b, _ in g) for g in groups) + rng.integers(0, 8000))
    picks = knapsack.solve(groups, capacity, max_cells=50)
    size = sum(groups[i][j][0] for i, j in enumerate(picks))
    assert size <= capacity
    # Never worse than taking the smallest option everywhere.
    floor_cost = sum(min(g, key=lambda o: o[0])[1] for g in groups)
    cost = sum(groups[i][j][1] for i, j in enumerate(picks))
    assert cost <= floor_cost + 1e-12


# -- sensitivity -------------------------------------------------------------


def test_distortion_falls_with_bits_and_follows_the_fisher_weights():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    ones = np.ones_like(w, np.float64)
    errors = [sensitivity.kmeans_distortion(w, (-1,), b, "tensor", ones, 4)
              for b in (1, 2, 4)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert sensitivity.int8_distortion(w, (-1,), ones) < errors[2]
    # Zero Fisher weight: the tensor does not matter.
    assert sensitivity.kmeans_distortion(w, (-1,), 1, "channel", 0 * ones, 4) == 0


# -- the plan and quantize_model ---------------------------------------------


def _digits_model():
    model = models.digits_cnn(classifier_activation=None)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _hand_plan():
    rows = [
        planner.LayerPlan("conv1", "Conv2D", 144, None, "int8", 144, 0.0),
        planner.LayerPlan("conv2", "Conv2D", 4608, 3, "scaled", 2000, 0.1),
        planner.LayerPlan("fc1", "Dense", 18432, 2, "channel", 5000, 0.2),
        planner.LayerPlan("fc2", "Dense", 640, 4, "tensor", 500, 0.3),
    ]
    return planner.Plan(budget_bytes=10_000, estimate_bytes=9_000,
                        int8_bytes=26_864, min_bytes=6_000, layers=rows)


def test_plan_is_usable_as_quantize_model_arguments():
    plan = _hand_plan()
    q = lutq_tf.quantize_model(_digits_model(), **plan)
    wrapped = {layer.name: layer.quantizer for layer in lutq_tf.lutq_layers(q)}
    assert set(wrapped) == {"conv2", "fc1", "fc2"}  # conv1 stays int8
    assert wrapped["conv2"].num_values == 8 and wrapped["conv2"].channel_scales
    assert wrapped["fc1"].num_values == 4 and wrapped["fc1"].per_channel
    assert wrapped["fc2"].num_values == 16 and wrapped["fc2"].mode == "tensor"
    assert plan.quantize_options() == dict(plan)


def test_plan_table_and_json_round_trip(tmp_path):
    plan = _hand_plan()
    text = plan.table()
    for word in ("layer", "K", "mode", "bytes", "sensitivity", "conv2", "scaled",
                 "10,000"):
        assert word in text
    path = tmp_path / "plan.json"
    plan.save(path)
    assert planner.Plan.load(path) == plan
    assert json.load(open(path))["export_options"] == plan.export_options()


# -- bad input (nothing heavy runs before these checks) ------------------------


@pytest.mark.parametrize("budget, error, words", [
    (64.5, TypeError, ["budget_bytes", "int number of bytes", "64"]),
    ("64KB", TypeError, ["budget_bytes", "64 * 1024"]),
    (True, TypeError, ["budget_bytes"]),
    (0, ValueError, ["budget_bytes", "positive"]),
    (-5, ValueError, ["budget_bytes", "positive"]),
])
def test_budget_of_wrong_type_or_sign_is_refused(budget, error, words):
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(error) as info:
        planner.plan_budget(_digits_model(), budget, x)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 8, 8, 3), (4, 64)])
def test_calibration_batches_of_the_wrong_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"calibration_data must have shape \(N, 8, 8, 1\)"):
        planner.plan_budget(_digits_model(), 10_000, np.zeros(shape, np.float32))


def test_labels_must_match_and_need_a_loss():
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="one entry per calibration example"):
        planner.plan_budget(_digits_model(), 10_000, x, labels=np.zeros(3))
    with pytest.raises(ValueError, match="no loss"):
        planner.plan_budget(models.digits_cnn(), 10_000, x, labels=np.zeros(4))


@pytest.mark.parametrize("bits, modes", [((0, 2), ("tensor",)), ((8,), ("tensor",)),
                                         ((2,), ("rows",)), ((), ("tensor",))])
def test_bad_choices_are_refused(bits, modes):
    with pytest.raises(ValueError, match="bits|modes"):
        planner.plan_budget(_digits_model(), 10_000, np.zeros((4, 8, 8, 1)),
                            bits=bits, modes=modes)


@pytest.mark.parametrize("text, expected", [
    ("65536", 65536), ("64KiB", 65536), ("64K", 65536), ("64 KB", 65536),
    ("1.5k", 1536), ("2MiB", 2 * 1024**2), ("100B", 100)])
def test_cli_budget_units(text, expected):
    assert plan_cli.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["64 kg", "-1", "0", "1.3", "lots", ""])
def test_cli_refuses_budgets_in_unknown_units(text):
    with pytest.raises(ValueError, match="--budget"):
        plan_cli.parse_budget(text)


def test_cli_usage_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = plan_cli.main([str(tmp_path / "missing.keras"), "--budget", "8KiB",
                          "--data", str(tmp_path / "x.npy"), "--out", str(out)])
    assert code == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()


# -- on the digits model (conversions, so slow) --------------------------------


@pytest.fixture(scope="module")
def digits():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    model = _digits_model()
    model.fit(x_train, y_train, epochs=5, batch_size=32, verbose=0)
    return model, (x_train, y_train), (x_test, y_test)


@pytest.fixture(scope="module")
def digits_choices(digits):
    """The digits model's choices, measured once for every budget below:
    `plan_budget(model, budget, x, ...)` is `choices(model, x, ...).plan(budget)`."""
    model, (x, y), _ = digits
    return planner.choices(model, x[:256], labels=y[:256], kmeans_iterations=4)


@pytest.fixture(scope="module")
def byte_model(digits_choices):
    # The choices' reference conversion: plan_costs.measure(model, x[:64]).
    return digits_choices.byte_model


def _slack(file_bytes):
    return max(0.01 * file_bytes, 256)


@pytest.mark.slow
def test_byte_estimate_bounds_the_written_file_for_random_plans(digits, byte_model, tmp_path):
    model, (x, _), _ = digits
    rng = np.random.default_rng(0)
    layers = list(byte_model.tensors)
    # The planner's defaults (1-4 bits, per tensor or per channel): within
    # max(1 %, 256 B); the last trial offers everything (scaled, 5-7 bits),
    # where the estimate only bounds the file.
    for trial in range(6):
        loose = trial == 5
        choices = {}
        for name in layers:
            bits = int(rng.integers(1, 8 if loose else 5))
            modes = plan_costs.MODES if loose else planner.DEFAULT_MODES
            mode = str(rng.choice(tuple(modes) + (plan_costs.INT8,)))
            facts = byte_model.tensors[name]
            if mode == plan_costs.INT8 or not planner._fits(facts, bits, mode):
                continue
            if byte_model.layer_bytes(name, bits, mode) is not None:
                choices[name] = (bits, mode)
        estimate = byte_model.estimate(choices)
        overrides = {name: {"bits": b, "per_channel": m == "channel",
                            "channel_scales": m == "scaled"}
                     for name, (b, m) in choices.items()}
        q = lutq_tf.quantize_model(model, layer_names=list(choices),
                                   overrides=overrides)
        result = tflite_export.export(q, str(tmp_path / f"r{trial}.tflite"),
                                      representative_data=x[:64], verify=False,
                                      **plan_costs.EXPORT_OPTIONS)
        assert result.size_bytes <= estimate, (choices, estimate, result.size_bytes)
        if not loose:
            assert estimate <= result.size_bytes + _slack(result.size_bytes), (
                choices, estimate, result.size_bytes)
        assert sum(t.compressed for t in result.tensors) == len(choices)


@pytest.mark.slow
def test_budgets_met_on_the_digits_model(digits, digits_choices, tmp_path):
    model, (x, y), (x_test, y_test) = digits
    for budget in (12_000, 7_000):
        plan = digits_choices.plan(budget)
        assert plan.estimate_bytes <= budget
        assert "sensitivity" in str(plan)
        q = lutq_tf.quantize_model(model, **plan)
        q.compile(keras.optimizers.Adam(3e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
        q.fit(x, y, epochs=1, batch_size=32, verbose=0)
        path = str(tmp_path / f"b{budget}.tflite")
        result = tflite_export.export(q, path, representative_data=x[:64],
                                      **plan.export_options())
        size = os.path.getsize(path)
        assert size <= budget
        assert size <= plan.estimate_bytes <= size + _slack(size)
        assert result.verification.bit_exact
        # The planner spends the budget: at least 90 % of it here, where
        # a few layers give coarse steps.
        assert size >= 0.9 * budget


@pytest.mark.slow
def test_budget_below_the_smallest_file_names_the_minimum(digits):
    model, (x, _), _ = digits
    with pytest.raises(ValueError) as info:
        planner.plan_budget(model, 7, x[:64])
    message = str(info.value)
    assert "budget_bytes=7 is below the smallest file" in message
    assert "7 KiB, pass 7168" in message


@pytest.mark.slow
def test_more_budget_never_costs_sensitivity(digits_choices):
    small = digits_choices.plan(8_000)
    large = digits_choices.plan(16_000)
    assert large.sensitivity <= small.sensitivity
    assert small.estimate_bytes <= 8_000 < large.estimate_bytes <= 16_000


def test_weighting_must_be_known():
    with pytest.raises(ValueError, match="weighting"):
        planner.choices(_digits_model(), np.zeros((4, 8, 8, 1)), weighting="hessian")


@pytest.mark.slow
def test_cli_writes_the_plan_and_the_lutq_model(digits, tmp_path, capsys):
    model, (x, y), _ = digits
    model_path, data, labels = (str(tmp_path / n) for n in ("f.keras", "x.npy", "y.npy"))
    model.save(model_path)
    np.save(data, x[:64])
    np.save(labels, y[:64])
    out, quantized = str(tmp_path / "plan.json"), str(tmp_path / "q.keras")
    code = plan_cli.main([model_path, "--budget", "10KiB", "--data", data,
                          "--labels", labels, "--loss",
                          "sparse_categorical_crossentropy", "--bits", "1,2,4",
                          "--modes", "tensor,channel", "--out", out,
                          "--quantized", quantized])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sensitivity" in printed and "--shared_tables true" in printed
    plan = planner.Plan.load(out)
    assert plan.budget_bytes == 10 * 1024 and plan.estimate_bytes <= 10 * 1024
    loaded = lutq_tf.load_model(quantized)
    assert sorted(layer.name for layer in lutq_tf.lutq_layers(loaded)) == sorted(
        plan.quantize_options()["layer_names"])
    # A budget below the minimum: exit code 1, the minimum named, no plan.
    os.remove(out)
    code = plan_cli.main([model_path, "--budget", "1KiB", "--data", data, "--out", out])
    assert code == 1
    assert "below the smallest file" in capsys.readouterr().err
    assert not os.path.exists(out)
