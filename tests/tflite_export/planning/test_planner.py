"""The flash-budget planner: knapsack, byte estimate, plans, budgets, bad input."""

import dataclasses
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
from tflite_export import plan as plan_cli
from tflite_export.device import firmware
from tflite_export.device import target as targets
from tflite_export.exporter import check_combinations
from tflite_export.planning import knapsack
from tflite_export.planning import plan_costs
from tflite_export.planning import planner
from tflite_export.planning import sensitivity

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
    # One int8 scale for the tensor rounds a 10x smaller channel coarser.
    w[:, 0] *= 0.1
    per_channel = sensitivity.int8_distortion(w, (-1,), ones)
    assert sensitivity.int8_distortion(w, (-1,), ones, per_tensor=True) > per_channel
    assert (sensitivity.int8_distortion(w[:, :1], (-1,), ones[:, :1], per_tensor=True)
            == sensitivity.int8_distortion(w[:, :1], (-1,), ones[:, :1]))
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
    """A plan for the digits CNN whose numbers agree as a planned one's do:
    26,864 + (2,000 - 4,608) + (5,000 - 18,432) + (500 - 640) + 64 = 10,748."""
    rows = [
        planner.LayerPlan("conv1", "Conv2D", 144, None, "int8", 144, 0.0),
        planner.LayerPlan("conv2", "Conv2D", 4608, 3, "scaled", 2000, 0.1),
        planner.LayerPlan("fc1", "Dense", 18432, 2, "channel", 5000, 0.2),
        planner.LayerPlan("fc2", "Dense", 640, 4, "tensor", 500, 0.3),
    ]
    return planner.Plan(budget_bytes=12_000, estimate_bytes=10_748,
                        int8_bytes=26_864, min_bytes=7_000, layers=rows)


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
                 "12,000", "10,748"):
        assert word in text
    path = tmp_path / "plan.json"
    plan.save(path)
    assert planner.Plan.load(path) == plan
    assert json.load(open(path))["export_options"] == plan.export_options()


# -- plan files: every field checked on load (issue 24) -----------------------


def _edit(data, path, value):
    """`data` with the field at `path` (keys and indices) set to `value`, or
    deleted when `value` is `_DELETE`."""
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


def _assert_edit_refused(tmp_path, plan, path, value, words):
    """`plan` saved, the field at `path` edited (`_edit`), and `Plan.load`
    refusing the file with a message naming it and holding `words`."""
    source = tmp_path / "plan.json"
    plan.save(source)
    data = _edit(json.loads(source.read_text()), path, value)
    # Derived from the fields edited here.
    data.pop("export_options")
    data.pop("quantize_options", None)
    source.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        planner.Plan.load(source)
    message = str(info.value)
    assert message.startswith(f"{source}: ")
    for word in words:
        assert word in message


_DELETE = object()


@pytest.mark.parametrize("path, value, words", [
    # An edited mode used to load and quantise per tensor.
    (("layers", 3, "mode"), "fancy", ["layers[3] ('fc2').mode", "'fancy'"]),
    # An edited estimate used to print "estimated file 1 B".
    (("estimate_bytes",), 1, ["estimate_bytes", "10,748", "min_bytes 7,000"]),
    # bits: 9 used to load; quantize_model refused it later, unexplained.
    (("layers", 2, "bits"), 9, ["layers[2] ('fc1').bits", "1..7"]),
    (("layers", 2, "bits"), "2", ["layers[2] ('fc1').bits", "1..7"]),
    (("layers", 0, "bits"), 4, ["layers[0] ('conv1').bits", "null for an int8"]),
    (("min_bytes",), _DELETE, ["min_bytes", "missing"]),
    (("layers", 1, "weights"), "4608", ["layers[1] ('conv2').weights", "whole number"]),
    (("layers", 1, "bytes"), 900, ["layers[1] ('conv2').bytes", "at least 1,880"]),
    (("layers", 1, "sensitivity"), -1, ["layers[1] ('conv2').sensitivity"]),
    (("layers", 1, "extra"), 1, ["layers[1]", "unknown ['extra']"]),
    (("estimate_byte",), 1, ["estimate_byte:", "not a plan field"]),
    (("budget_bytes",), 10_000, ["budget_bytes", "exceeds the budget"]),
    (("schema",), 6, ["schema", "1 to 5"]),
    (("budget_includes_code",), "yes", ["budget_includes_code", "true or false"]),
    (("budget_includes_code",), True, ["budget_includes_code", "without a target"]),
    (("fisher",), "hessian", ["fisher"]),
    (("quantize_options", "overrides", "fc2", "bits"), 1, ["quantize_options"]),
    (("export_options", "shared_tables"), False, ["export_options"]),
])
def test_edited_plan_files_are_refused_naming_file_and_field(tmp_path, path, value,
                                                            words):
    source = tmp_path / "plan.json"
    _hand_plan().save(source)
    data = _edit(json.loads(source.read_text()), path, value)
    source.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        planner.Plan.load(source)
    message = str(info.value)
    assert message.startswith(f"{source}: ")
    for word in words:
        assert word in message


def test_truncated_or_binary_plan_files_name_the_file(tmp_path):
    source = tmp_path / "plan.json"
    _hand_plan().save(source)
    text = source.read_text()
    source.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=f"{source}: not a plan JSON file"):
        planner.Plan.load(source)
    source.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=f"{source}: not a plan JSON file"):
        planner.Plan.load(source)
    source.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a plan: expected a JSON object"):
        planner.Plan.load(source)


def test_plan_files_without_a_schema_load_as_before(tmp_path):
    """Files written before `schema` (1) have the same layer rows."""
    plan = _hand_plan()
    data = _old_schema(plan.to_dict())
    del data["schema"]
    del data["quantize_options"]["expected_weights"]
    source = tmp_path / "old.json"
    source.write_text(json.dumps(data))
    loaded = planner.Plan.load(source)
    assert loaded == plan
    assert loaded.quantize_options()["expected_weights"]["fc1"] == 18432


def _schema_4(data):
    """A schema 5 plan's data as schema 4 wrote it: no budget_includes_code."""
    del data["budget_includes_code"]
    data["schema"] = 4
    return data


def _schema_3(data):
    """A schema 5 plan's data as schema 3 wrote it: no representation, int4
    instructions or arena per layer, no weight quantisation, device totals
    or caps."""
    data = _schema_4(data)
    for key in ("weight_quantization", "dense_per_tensor_bytes", "int8_instructions",
                "instructions_growth",
                "arena_growth_bytes", "max_instructions_growth",
                "max_arena_growth_bytes"):
        del data[key]
    for row in data["layers"]:
        del row["representation"], row["int4_instructions"], row["arena_bytes"]
    data["schema"] = 3
    return data


def _old_schema(data):
    """A schema 4 plan's data as schema 2 wrote it: no target fields, no
    decode path or instructions per layer."""
    data = _schema_3(data)
    for key in ("target", "target_profile", "decode_code_bytes", "flash_change"):
        del data[key]
    for row in data["layers"]:
        del row["decode_path"], row["decode_instructions"]
    data["schema"] = 2
    return data


def test_schema_2_plan_files_load_as_plans_without_a_target(tmp_path):
    plan = _hand_plan()
    source = tmp_path / "old.json"
    source.write_text(json.dumps(_old_schema(plan.to_dict())))
    loaded = planner.Plan.load(source)
    assert loaded == plan and loaded.target is None
    # Target fields are schema 3's: a schema 2 file holding one is refused.
    data = _old_schema(plan.to_dict())
    data["target"] = "cortex-m4-cmsis-nn"
    source.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="target: a schema 2 plan has no target fields"):
        planner.Plan.load(source)


def test_saving_an_inconsistent_plan_writes_nothing(tmp_path):
    plan = _hand_plan()
    plan.estimate_bytes = 1
    target = tmp_path / "plan.json"
    with pytest.raises(ValueError, match="estimate_bytes"):
        plan.save(target)
    assert not target.exists()


def test_an_unknown_mode_in_memory_is_refused_not_quantised_per_tensor():
    plan = _hand_plan()
    plan.layers[3].mode = "fancy"
    with pytest.raises(ValueError, match="layer 'fc2': mode 'fancy'"):
        lutq_tf.quantize_model(_digits_model(), **plan)


def test_min_bytes_counts_all_int8_when_compression_saves_less_than_decode():
    """A layer saving 8 B by compression cannot pay DECODE's 64 B: the
    smallest file is all int8, and the plan of that budget loads back."""
    facts = plan_costs.TensorFacts("fc", "kernel", size=200, channels=1,
                                   shareable=True, negated=False, dead=False)
    byte_model = plan_costs.ByteModel(int8_bytes=1000, tensors={"fc": [facts]})
    cost = byte_model.layer_bytes("fc", 1, "tensor")
    # 25 B of indices and 18 B of DCM + table, each padded to 16 B, + 128.
    assert cost == 192
    found = planner.Choices(byte_model=byte_model,
                            offers={"fc": [(None, "int8", 200, 1.0),
                                           (1, "tensor", cost, 0.5)]},
                            layer_types={"fc": "Dense"}, bits=[1],
                            modes=["tensor"], fisher="labels")
    assert found.min_bytes == 1000
    for budget in (1000, 1035, 2000):
        plan = found.plan(budget)
        assert planner.Plan.from_dict(plan.to_dict()) == plan


# -- a plan applied to another model with the same layer names (issue 24) -----


def _small_cnn(filters=4, units=32):
    """Conv2D -> Flatten -> fc1 Dense(units) -> fc2 Dense(10) on 8x8x1."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(filters, 3, name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(units, activation="relu", name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc2")(x))


def _small_plan():
    """A plan of `_small_cnn()`: conv 36, fc1 4,608, fc2 320 weights."""
    rows = [planner.LayerPlan("conv", "Conv2D", 36, None, "int8", 36, 0.0),
            planner.LayerPlan("fc1", "Dense", 4608, 2, "tensor", 1320, 0.1),
            planner.LayerPlan("fc2", "Dense", 320, None, "int8", 320, 0.0)]
    return planner.Plan(budget_bytes=6_000, estimate_bytes=2_970,
                        int8_bytes=6_194, min_bytes=2_900, layers=rows)


@pytest.mark.parametrize("filters, units, words", [
    (4, 64, ["'fc1' has 9,216 weights, expected 4,608"]),
    # A layer the plan keeps int8 counts too: its bytes are in the estimate.
    (8, 32, ["'conv' has 72 weights, expected 36", "'fc1' has 9,216"]),
])
def test_a_plan_refuses_a_model_whose_layers_differ(filters, units, words):
    plan = planner.Plan.from_dict(_small_plan().to_dict())
    lutq_tf.quantize_model(_small_cnn(), **plan)  # the planned model: fine
    with pytest.raises(ValueError) as info:
        lutq_tf.quantize_model(_small_cnn(filters, units), **plan)
    for word in words + ["plan_budget"]:
        assert word in str(info.value)


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


# Labels are checked against the loss and the model's output before any
# conversion (issue 24: these failed inside the Fisher estimate).
@pytest.mark.parametrize("labels, loss, words", [
    (np.eye(10)[np.arange(4)], None,
     ["shape (4, 10)", "class indices", "argmax", "categorical_crossentropy"]),
    (np.array(["cat", "dog", "cat", "dog"]), None, ["numbers", "<U3"]),
    (np.arange(50, 54), None, ["class indices in 0..9", "50..53"]),
    (np.array([0.5, 1, 2, 3]), None, ["whole class indices", "0.5"]),
    (np.array([0, 1, np.nan, 3]), None, ["NaN"]),
    (np.arange(4), "categorical_crossentropy", ["one-hot", "sparse_categorical"]),
    (np.arange(4), "crossentropy_of_my_own", ["not a Keras loss"]),
])
def test_labels_that_do_not_fit_the_loss_are_named(labels, loss, words):
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError) as info:
        planner.plan_budget(_digits_model(), 10_000, x, labels=labels, loss=loss)
    for word in words:
        assert word in str(info.value)


def test_cli_names_bad_bits_and_modes_before_loading_anything(tmp_path, capsys):
    for flag, text in (("--bits", "2,x"), ("--bits", "9"), ("--modes", "tensor,rows")):
        code = plan_cli.main([str(tmp_path / "m.keras"), "--budget", "8KiB",
                              "--data", str(tmp_path / "x.npy"), flag, text])
        assert code == 2
        assert f"{flag}='{text}'" in capsys.readouterr().err
    assert plan_cli.MAX_BITS == plan_costs.MAX_BITS
    assert plan_cli.MODES == plan_costs.MODES


@pytest.fixture
def cli_files(tmp_path):
    """A compiled small CNN saved as .keras, 4 inputs and labels as .npy."""
    model = _small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    paths = {n: str(tmp_path / n) for n in ("m.keras", "x.npy", "y.npy")}
    model.save(paths["m.keras"])
    np.save(paths["x.npy"], np.zeros((4, 8, 8, 1), np.float32))
    np.save(paths["y.npy"], np.arange(4))
    return paths


def test_cli_names_data_files_that_are_not_one_npy_array(cli_files, tmp_path, capsys):
    text, archive = str(tmp_path / "x.csv"), str(tmp_path / "x.npz")
    with open(text, "w") as f:
        f.write("1,2,3\n")
    np.savez(archive, x=np.zeros((4, 8, 8, 1)), y=np.arange(4))
    for data, words in ((text, ["not a .npy array file"]),
                        (archive, ["an .npz archive", "['x', 'y']"])):
        code = plan_cli.main([cli_files["m.keras"], "--budget", "8KiB",
                              "--data", data])
        assert code == 2
        err = capsys.readouterr().err
        for word in [f"--data={data}"] + words:
            assert word in err


def test_cli_takes_the_loss_the_model_was_compiled_with(cli_files, tmp_path, capsys):
    # The README's command, without --loss: the file's loss checks the
    # labels (here out of range, so that no conversion runs).
    np.save(cli_files["y.npy"], np.arange(50, 54))
    code = plan_cli.main([cli_files["m.keras"], "--budget", "8KiB", "--data",
                          cli_files["x.npy"], "--labels", cli_files["y.npy"]])
    assert code == 1
    err = capsys.readouterr().err
    assert "class indices in 0..9" in err and "no loss" not in err
    # A model saved without compile: the flag to use is named.
    plain = str(tmp_path / "plain.keras")
    _small_cnn().save(plain)
    code = plan_cli.main([plain, "--budget", "8KiB", "--data", cli_files["x.npy"],
                          "--labels", cli_files["y.npy"]])
    assert code == 2
    err = capsys.readouterr().err
    assert "--labels needs a loss" in err and "pass --loss" in err


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
            if mode == plan_costs.INT8 or not plan_costs.fits(facts, bits, mode):
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


def test_padded_buffers_are_counted_in_a_compressed_tensor():
    """TFLM's aligner starts each buffer on 16 bytes: 880 weights at 3 bits
    in 5 per-channel tables are 330 B of indices (336 padded) and 56 B of
    DCM + tables (64 padded), 14 B more than the unpadded data."""
    facts = plan_costs.TensorFacts("head5", "kernel", size=880, channels=5,
                                   shareable=True, negated=False, dead=False)
    assert plan_costs.padded_lut_bytes(880, 5, 8) == 336 + 64
    assert facts.lut_bytes(3, "channel") == 336 + 64 + 128
    # The floor a plan file's layer bytes are checked against stays unpadded
    # (a lower bound still), so plans saved before load as they did.
    assert plan_costs.smallest_layer_bytes(880, 3) == 330 + 24 + 128


@pytest.mark.slow
def test_estimate_bounds_a_dense5_head_with_per_channel_tables(tmp_path):
    """Fuzzer seeds 43 and 44: a Dense(5) head at 3 bits with per-channel
    dictionaries wrote a file 14-16 B above the estimate, the padding of
    its two buffers (indices, DCM + tables) to 16 bytes not counted."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 2))
    left = keras.layers.Conv1D(4, 3, padding="same", name="branch1")(inputs)
    right = keras.layers.Conv1D(7, 3, padding="same", name="branch2")(inputs)
    flat = keras.layers.Flatten()(keras.layers.Concatenate()([left, right]))
    model = keras.Model(inputs, keras.layers.Dense(5, name="head5")(flat))
    x = np.random.default_rng(0).standard_normal((16, 16, 2)).astype(np.float32)
    # Unpadded, the estimate was 2,818 B for this 2,832 B file.
    byte_model = plan_costs.measure(model, x, layers=["head5"])
    estimate = byte_model.estimate({"head5": (3, "channel")})
    q = lutq_tf.quantize_model(model, layer_names=["head5"],
                               overrides={"head5": {"bits": 3, "per_channel": True}})
    result = tflite_export.export(q, str(tmp_path / "head5.tflite"), representative_data=x,
                                  verify=False, **plan_costs.EXPORT_OPTIONS)
    [tensor] = [t for t in result.tensors if t.compressed]
    size = result.size_bytes
    assert size <= estimate <= size + _slack(size), (estimate, size, tensor)


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
    # Planned numbers pass the checks of `Plan.load`.
    for plan in (small, large):
        assert planner.Plan.from_dict(plan.to_dict()) == plan


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
    # No --loss: the model's compiled one (logits), as in the README.
    code = plan_cli.main([model_path, "--budget", "10KiB", "--data", data,
                          "--labels", labels, "--bits", "1,2,4",
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


# -- plans for a device target (issue 22, section 3) ----------------------------

_M4 = "cortex-m4-cmsis-nn"
_DECODE_CODE = targets.PROFILES[_M4].decode_code_bytes  # 21,408 B
_LINKED = dataclasses.replace(targets.PROFILES[_M4], name="board-with-decode",
                              decode_linked=True)


def _facts(layer, size, channels, alternate_axis=False):
    return plan_costs.TensorFacts(layer, "kernel", size=size, channels=channels,
                                  shareable=True, negated=False, dead=False,
                                  alternate_axis=alternate_axis)


def _choices(layers, int8_bytes, lut_sensitivity=2.0, bits=(1, 2), step=0.1):
    """Hand-made `Choices`: each `(name, size, channels)` layer offers int8
    (sensitivity 1) and per-tensor `bits` at `lut_sensitivity` less `step`
    per bit above 1 (below 1: compression looks more accurate than int8, so
    only the target keeps a budget above the int8 file from being spent on
    it)."""
    tensors = {name: [_facts(name, size, channels)] for name, size, channels in layers}
    byte_model = plan_costs.ByteModel(int8_bytes=int8_bytes, tensors=tensors)
    offers = {}
    for name, size, _ in layers:
        offers[name] = [(None, "int8", size, 1.0)] + [
            (b, "tensor", byte_model.layer_bytes(name, b, "tensor"),
             lut_sensitivity - step * (b - 1)) for b in bits]
    return planner.Choices(byte_model=byte_model, offers=offers,
                           layer_types={name: "Dense" for name, _, _ in layers},
                           bits=list(bits), modes=["tensor"], fisher="labels")


def test_a_target_keeps_int8_when_the_saving_is_below_decodes_code():
    """Compressing 16,000 weights saves ~12 KB of file, less than DECODE's
    21,408 B: on the M4 the plan is all int8 and says why; with DECODE
    linked anyway (no code added) it compresses as without a target."""
    found = _choices([("fc", 16_000, 16)], int8_bytes=20_000, lut_sensitivity=0.5)
    plain = found.plan(30_000)
    assert plain.compressed and plain.target is None
    plan = found.plan(30_000, target=_M4)
    assert not plan.compressed
    assert plan.estimate_bytes == plan.int8_bytes == 20_000
    assert plan.flash_change == 0 and plan.decode_code_bytes == _DECODE_CODE
    saving = 20_000 - found.min_bytes
    assert 0 < saving < _DECODE_CODE
    text = plan.table()
    assert f"compressing would save at most {saving:,} B of file" in text
    assert "21,408 B of code DECODE adds" in text
    assert plan.export_options() == dict(plan_costs.EXPORT_OPTIONS, target=_M4)
    linked = found.plan(30_000, target=_LINKED)
    assert [r.bits for r in linked.layers] == [r.bits for r in plain.layers]
    assert linked.flash_change == linked.file_change < 0
    assert linked.decode_code_bytes == 0 and not linked.target_profile
    # A custom Target is left out of the export options: the user passes it.
    assert "target" not in linked.export_options()


def test_a_target_compresses_when_the_saving_pays_for_decode():
    found = _choices([("fc", 64_000, 64)], int8_bytes=66_000, lut_sensitivity=0.5)
    # A budget the int8 file meets: no DECODE, however accurate the LUT.
    assert not found.plan(70_000, target=_M4).compressed
    plan = found.plan(40_000, target=_M4)
    assert plan.compressed
    assert plan.flash_change == plan.file_change + _DECODE_CODE < 0
    assert plan.notes() == [] and "decode" not in plan.export_options()
    # Without the (artificial) gain in accuracy, all int8 is the most
    # accurate plan, and the note says from which file compressing pays.
    found = _choices([("fc", 64_000, 64)], int8_bytes=66_000)
    plan = found.plan(70_000, target=_M4)
    assert not plan.compressed
    assert f"file below {66_000 - _DECODE_CODE:,} B" in plan.table()


def test_a_budget_below_int8_forces_compression_and_names_the_growth():
    found = _choices([("fc", 16_000, 16)], int8_bytes=20_000)
    plain = found.plan(10_000)
    plan = found.plan(10_000, target=_M4)
    assert [r.bits for r in plan.layers] == [r.bits for r in plain.layers]
    assert plan.estimate_bytes == plain.estimate_bytes <= 10_000
    assert plan.flash_change - plan.file_change == _DECODE_CODE
    assert plan.forced_growth and plan.flash_change > 0
    text = plan.table()
    assert f"the firmware grows by {plan.flash_change:,} B" in text
    assert ("meets the file budget 10,000 B (below the int8 file, 20,000 B)"
            in text)
    options = plan.export_options()
    assert options["target"] == _M4 and options["decode"] == "always"
    check_combinations(**options)  # export takes this combination
    assert planner.Plan.from_dict(plan.to_dict()) == plan
    # DECODE linked: the same compression, no growth, nothing forced.
    linked = found.plan(10_000, target=_LINKED)
    assert [r.bits for r in linked.layers] == [r.bits for r in plain.layers]
    assert linked.flash_change == linked.file_change and not linked.forced_growth


def test_equal_sensitivities_go_to_the_faster_decode_path():
    """1-bit tables take DECODE's per-weight loop; at equal sensitivity a
    target's plan takes 2 bits' block path where the budget allows."""
    found = _choices([("fc", 16_000, 16)], int8_bytes=20_000, step=0)
    plain = found.plan(10_000)
    assert plain.layers[0].bits == 1  # the first of equals, without a target
    plan = found.plan(10_000, target=_M4)
    row = plan.layers[0]
    assert row.bits == 2 and row.decode_path == "width2_16"
    one_bit = found.byte_model.decode_cost(targets.PROFILES[_M4], "fc", 1)
    assert one_bit[0] == "width_any" and one_bit[1] > 5 * row.decode_instructions
    assert "width2_16" in plan.table() and "decode instr." in plan.table()
    # A budget that only 1 bit fits: the slow path, and a note about it.
    tight = found.plan(found.byte_model.estimate({"fc": (1, "tensor")}), target=_M4)
    assert tight.layers[0].decode_path == "width_any"
    assert "fc: DECODE's per-weight path" in tight.table()


def test_knapsack_breaks_ties_by_the_second_cost():
    groups = [[(0, 1.0, 0.0), (5, 1.0, 3.0), (9, 1.0, 1.0)], [(0, 2.0), (4, 2.0)]]
    assert knapsack.solve(groups, 20, grid=1) == [0, 0]
    groups[0][0] = (0, 1.0, 7.0)
    assert knapsack.solve(groups, 20, grid=1) == [2, 0]
    assert knapsack.solve(groups, 8, grid=1) == [1, 0]
    # The first cost comes first.
    groups[0][2] = (9, 1.5, 0.0)
    assert knapsack.solve(groups, 20, grid=1) == [1, 0]


def _target_plan():
    """`_hand_plan` planned for the M4: its budget (12,000 B) is below the int8
    file (26,864 B), so it compresses although the firmware grows by
    -16,116 + 21,408 = 5,292 B."""
    plan = _hand_plan()
    paths = {"conv2": ("width3_32", 1_000.0), "fc1": ("width2_16", 6_000.5),
             "fc2": ("width4_16", 300.0)}
    for row in plan.layers:
        row.decode_path, row.decode_instructions = paths.get(row.layer, (None, None))
    return dataclasses.replace(plan, target=_M4, target_profile=True,
                               decode_code_bytes=_DECODE_CODE, flash_change=5_292)


def test_plan_json_round_trip_with_a_target(tmp_path):
    plan = _target_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema"] == 5 and data["target"] == _M4
    assert data["flash_change"] == 5_292 and data["decode_code_bytes"] == _DECODE_CODE
    assert data["layers"][2]["decode_path"] == "width2_16"
    assert data["export_options"]["decode"] == "always"
    loaded = planner.Plan.load(path)
    assert loaded == plan and loaded.decode_instructions == 7_300.5
    assert "grows by 5,292 B" in loaded.table()


@pytest.mark.parametrize("path, value, words", [
    (("target",), "", ["target:", "target name or null"]),
    (("target_profile",), "yes", ["target_profile", "true or false"]),
    (("target",), "my-board", ["target_profile", "not a shipped profile"]),
    (("decode_code_bytes",), 6_144, ["decode_code_bytes", "counts 21,408 B"]),
    (("decode_code_bytes",), -1, ["decode_code_bytes", "whole number >= 0"]),
    (("flash_change",), 5_000, ["flash_change", "give +5,292 B"]),
    (("flash_change",), None, ["flash_change", "give +5,292 B"]),
    (("layers", 2, "decode_path"), "width4_16", ["layers[2] ('fc1').decode_path",
                                                "2-bit tables"]),
    (("layers", 2, "decode_instructions"), -3, ["layers[2] ('fc1').decode_instructions"]),
    (("layers", 2, "decode_instructions"), None, ["layers[2] ('fc1').decode_path",
                                                 "together"]),
    (("layers", 0), {"layer": "conv1", "layer_type": "Conv2D", "weights": 144,
                     "bits": None, "mode": "int8", "bytes": 144, "sensitivity": 0.0,
                     "decode_path": "width_any", "decode_instructions": 10.0,
                     "representation": "int8", "int4_instructions": None,
                     "arena_bytes": None},
     ["layers[0] ('conv1').decode_path", "without DECODE"]),
    (("layers", 2, "decode_instructions"), _DELETE, ["layers[2]", "missing"]),
    # An edited budget above the int8 file: the plan would compress at a loss.
    (("budget_bytes",), 30_000, ["flash_change", "compresses only when"]),
])
def test_plan_files_with_bad_target_fields_are_refused(tmp_path, path, value, words):
    _assert_edit_refused(tmp_path, _target_plan(), path, value, words)


def test_target_fields_without_a_target_are_refused():
    data = _hand_plan().to_dict()
    data["decode_code_bytes"] = 0
    with pytest.raises(ValueError, match="decode_code_bytes: 0 without a target"):
        planner.Plan.from_dict(data)
    data = _target_plan().to_dict()
    data["target"] = None
    for key in ("target_profile", "decode_code_bytes", "flash_change"):
        data[key] = None
    with pytest.raises(ValueError, match="layers .* have device costs"):
        planner.Plan.from_dict(data)


def test_an_unknown_target_is_refused_before_any_conversion():
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="target='m7' is not a known profile"):
        planner.plan_budget(_digits_model(), 10_000, x, target="m7")


@pytest.mark.parametrize("value, words", [
    ("m7", ["--target 'm7' is neither a profile"]),
    ("missing.json", ["--target ", "missing.json: no such file"]),
    ("bad.json", ["--target", "bad.json", "is not a JSON target profile"]),
])
def test_cli_names_a_bad_target_before_loading_anything(tmp_path, capsys, value, words):
    (tmp_path / "bad.json").write_text("{")
    out = tmp_path / "plan.json"
    code = plan_cli.main([str(tmp_path / "m.keras"), "--budget", "8KiB", "--data",
                          str(tmp_path / "x.npy"), "--target", str(tmp_path / value)
                          if value.endswith(".json") else value, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not out.exists()


def _depthwise_cnn():
    """DepthwiseConv2D (8 channels on the kernel's last axis) -> 1x1 Conv2D
    -> fc1 Dense(32) -> fc2 Dense(10) on 8x8x2."""
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=4, name="dw")(inputs)
    x = keras.layers.Conv2D(8, 1, name="pw")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc2")(x))


@pytest.fixture(scope="module")
def depthwise():
    """The model, its inputs and its choices (one reference conversion)."""
    keras.utils.set_random_seed(0)
    model = _depthwise_cnn()
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 2)).astype(np.float32)
    return model, x, planner.choices(model, x, max_batches=1, kmeans_iterations=2)


@pytest.mark.slow
def test_a_small_model_planned_for_the_m4(depthwise):
    # With int4 on offer, a budget between the smallest and the int8 file
    # is met without DECODE.
    budget = (depthwise[2].byte_model.int8_bytes + depthwise[2].min_bytes) // 2
    plan = depthwise[2].plan(budget, target=_M4)
    assert plan.int4_layers and not plan.compressed and plan.flash_change < 0
    # LUTs only, as before int4.
    found = depthwise[2].without_int4()
    facts = found.byte_model.tensors
    # Per-channel depthwise kernels have their channels on the last axis.
    assert facts["dw"][0].alternate_axis and not facts["fc1"][0].alternate_axis
    int8_file, minimum = found.byte_model.int8_bytes, found.min_bytes
    assert int8_file - minimum < _DECODE_CODE
    # A budget above the int8 file: all int8, and the note says why.
    plan = found.plan(int8_file + 1_000, target=_M4)
    assert not plan.compressed and plan.flash_change == 0
    text = plan.table()
    assert f"save at most {int8_file - minimum:,} B of file" in text
    assert f"{_DECODE_CODE:,} B of code DECODE adds" in text
    # Below it: compressed, the firmware change is the file change plus
    # DECODE's code, each layer's path and instructions are reported.
    plan = found.plan((int8_file + minimum) // 2, target=_M4)
    assert plan.compressed and plan.estimate_bytes <= plan.budget_bytes
    assert plan.flash_change == plan.file_change + _DECODE_CODE
    for row in plan.layers:
        if row.mode == "int8":
            assert row.decode_path is None
            continue
        path, count = firmware.decode_instructions(
            targets.PROFILES[_M4], row.weights, row.bits,
            facts[row.layer][0].channels, facts[row.layer][0].alternate_axis)
        assert (row.decode_path, row.decode_instructions) == (path, count)
        assert row.decode_path in plan.table()
    assert planner.Plan.from_dict(plan.to_dict()) == plan
    # The depthwise kernel decodes on the per-weight path at any width.
    assert found.byte_model.decode_cost(targets.PROFILES[_M4], "dw", 2)[0] == "width_any"


@pytest.mark.slow
def test_a_forced_plan_exports_compressed_on_its_target(depthwise, tmp_path):
    """export(**plan.export_options()) writes the compressed file that the
    budget needs although the firmware grows (decode='always'); 'auto'
    would write the int8 file, over the budget."""
    model, x, found = depthwise
    found = found.without_int4()
    plan = found.plan((found.byte_model.int8_bytes + found.min_bytes) // 2, target=_M4)
    assert plan.forced_growth
    q = lutq_tf.quantize_model(model, **plan)
    path = str(tmp_path / "forced.tflite")
    result = tflite_export.export(q, path, representative_data=x, verify=False,
                                  **plan.export_options())
    assert os.path.getsize(path) <= plan.estimate_bytes <= plan.budget_bytes
    assert result.device.target.name == _M4
    assert result.device.flash_change > 0 and result.device.declined is None


@pytest.mark.slow
def test_cli_plans_for_a_target_by_name_and_by_json(cli_files, tmp_path, capsys):
    out = str(tmp_path / "plan.json")
    np.save(cli_files["x.npy"],
            np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype(np.float32))
    code = plan_cli.main([cli_files["m.keras"], "--budget", "64KiB", "--data",
                          cli_files["x.npy"], "--target", _M4, "--out", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"on {_M4}: firmware flash +0 B" in printed
    assert f"--target {_M4}" in printed and "--decode" not in printed
    plan = planner.Plan.load(out)
    assert plan.target == _M4 and plan.target_profile and not plan.compressed
    # A JSON profile with DECODE linked, and a budget below the int8 file.
    profile = str(tmp_path / "board.json")
    with open(profile, "w") as f:
        json.dump(_LINKED.to_dict(), f)
    budget = str(plan.int8_bytes - 1_000)
    code = plan_cli.main([cli_files["m.keras"], "--budget", budget, "--data",
                          cli_files["x.npy"], "--target", profile, "--out", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert "on board-with-decode: firmware flash -" in printed
    assert f"--target {profile}" in printed
    plan = planner.Plan.load(out)
    assert plan.target == "board-with-decode" and not plan.target_profile
    assert plan.compressed and plan.flash_change == plan.file_change < 0


# -- int8, native int4 or LUT per layer (issue 23, item 4) ---------------------


def _int4_choices(lut_sensitivity=0.3, int4_sensitivity=0.5, macs=2_000_000,
                  size=40_000):
    """Hand-made `Choices` of two conv layers of `size` weights (64 channels)
    in a file of 10,000 B plus their int8 bytes: int8 (sensitivity 1), a
    per-tensor 4-bit LUT and a per-channel int4 dictionary, `macs` each."""
    layers = ("conv1", "conv2")
    tensors = {name: [plan_costs.TensorFacts(
        name, "kernel", size=size, channels=64, shareable=True, negated=False,
        dead=False, op="CONV_2D", macs=macs,
        int4_scratch={"reference": size, "cmsis-nn": 0})] for name in layers}
    byte_model = plan_costs.ByteModel(int8_bytes=10_000 + 2 * size, tensors=tensors,
                                      macs={"CONV_2D": 2 * macs})
    offers = {name: [
        planner.Offer(None, "int8", size, 1.0),
        planner.Offer(4, "tensor", byte_model.layer_bytes(name, 4, "tensor"),
                      lut_sensitivity, "lut"),
        planner.Offer(4, "channel", byte_model.int4_layer_bytes(name),
                      int4_sensitivity, "int4"),
    ] for name in layers}
    return planner.Choices(byte_model=byte_model, offers=offers,
                           layer_types={name: "Conv2D" for name in layers},
                           bits=[4], modes=["tensor", "channel"], fisher="labels")


def test_a_target_takes_int4_where_it_meets_the_budget_without_decode():
    """Two layers of 16,000 weights: LUTs save ~15.7 KB of file, less than
    DECODE's code; int4 saves 16,000 B and adds no code."""
    found = _int4_choices(size=16_000)
    # int4 on both layers: 42,000 - 2 x (8,000 - 16) = 26,032 B (16 B each
    # for the buffer's entry).
    budget = 30_000
    plain = found.plan(budget)
    # Without a target the file alone counts: the more accurate LUTs.
    assert [r.representation for r in plain.layers] == ["lut", "lut"]
    plan = found.plan(budget, target=_M4)
    assert [r.representation for r in plan.layers] == ["int4", "int4"]
    assert not plan.compressed and plan.int4_layers == ["conv1", "conv2"]
    assert plan.estimate_bytes == 42_000 - 2 * (8_000 - 16) <= budget
    assert plan.flash_change == plan.file_change == -15_968
    assert all(r.decode_path is None for r in plan.layers)
    # CMSIS-NN: (1.75 - 1) x 2.15 instructions per MAC, no unpack, no arena.
    expected = 0.75 * 2.15 * 2_000_000
    assert [r.int4_instructions for r in plan.layers] == [pytest.approx(expected)] * 2
    assert plan.instructions_growth == pytest.approx(0.75)
    assert plan.arena_growth_bytes == 0
    assert plan.export_options() == dict(plan_costs.EXPORT_OPTIONS, int4="always",
                                         target=_M4)
    overrides = plan.quantize_options()["overrides"]
    assert overrides["conv1"] == {"bits": 4, "per_channel": True,
                                  "channel_scales": False, "constraint": "int4"}
    text = plan.table()
    assert "int4" in text and "no DECODE op: 2 int4 layer(s)" in text
    # Reference kernels unpack each int4 filter into a scratch buffer.
    ref = found.plan(budget, target="cortex-m4-ref")
    assert ref.arena_growth_bytes == 16_000
    assert ref.layers[0].int4_instructions == pytest.approx(4.5 * 16_000)
    # Even where the LUTs' saving pays for DECODE's code, a plan without
    # DECODE comes first; where int4 cannot meet the budget, LUTs.
    found = _int4_choices()
    assert found.plan(60_000, target=_M4).int4_layers == ["conv1", "conv2"]
    plan = found.without_int4().plan(60_000, target=_M4)
    assert plan.compressed and plan.flash_change < 0 and not plan.decode_forced
    # DECODE linked anyway (no code): the more accurate plan.
    assert found.plan(60_000, target=_LINKED).compressed


def test_an_instruction_cap_takes_luts_over_int4():
    """int4 is the more accurate here, but costs +75 % instructions on
    CMSIS-NN; a 4-bit LUT decodes 40,000 weights in ~3.4 each (+3.4 %)."""
    found = _int4_choices(lut_sensitivity=0.5, int4_sensitivity=0.3)
    budget = 60_000
    free = found.plan(budget, target=_LINKED)
    assert [r.representation for r in free.layers] == ["int4", "int4"]
    plan = found.plan(budget, target=_LINKED, max_instructions_growth=0.05)
    assert [r.representation for r in plan.layers] == ["lut", "lut"]
    assert plan.instructions_growth <= 0.05 and plan.max_instructions_growth == 0.05
    assert plan.estimate_bytes <= budget
    # Room for one int4 layer: one of each.
    plan = found.plan(budget, target=_LINKED, max_instructions_growth=0.4)
    assert sorted(r.representation for r in plan.layers) == ["int4", "lut"]
    assert "(cap +40.0%)" in plan.table()
    assert planner.Plan.from_dict(plan.to_dict()) == plan
    # An arena cap below a decoded kernel (40,000 B) leaves int4 only.
    plan = found.plan(budget, target=_LINKED, max_arena_growth_bytes=10_000)
    assert [r.representation for r in plan.layers] == ["int4", "int4"]
    assert plan.arena_growth_bytes == 0


def test_caps_no_plan_meets_give_the_least_achievable():
    found = _int4_choices()
    with pytest.raises(ValueError) as info:
        found.plan(60_000, target=_LINKED, max_instructions_growth=0.01)
    message = str(info.value)
    # Both layers must compress; the LUTs are the cheapest: 2 x ~3.4 x
    # 40,000 over 2 x 2.15 x 2,000,000.
    least = sum(found.byte_model.decode_cost(_LINKED, n, 4)[1]
                for n in ("conv1", "conv2")) / (2.15 * 4_000_000)
    assert "max_instructions_growth=0.01" in message
    assert f"is {least:.4g}" in message and "Raise the cap" in message
    with pytest.raises(ValueError, match=r"max_arena_growth_bytes=100: the least arena "
                                         r"growth .* cortex-m4-ref .* is 40,000 B"):
        found.plan(60_000, target="cortex-m4-ref", max_arena_growth_bytes=100)
    # Within the int8 file's budget all int8 meets any cap.
    assert not found.plan(90_000, target=_M4, max_instructions_growth=0.0,
                          max_arena_growth_bytes=0).int4_layers


@pytest.mark.parametrize("caps, error, words", [
    ({"max_instructions_growth": "2%"}, TypeError, ["max_instructions_growth", "0.02"]),
    ({"max_instructions_growth": -0.1}, ValueError, ["max_instructions_growth", ">= 0"]),
    ({"max_instructions_growth": float("nan")}, ValueError, ["max_instructions_growth"]),
    ({"max_instructions_growth": True}, TypeError, ["max_instructions_growth"]),
    ({"max_arena_growth_bytes": 1.5}, TypeError, ["max_arena_growth_bytes", "int"]),
    ({"max_arena_growth_bytes": -1}, ValueError, ["max_arena_growth_bytes", ">= 0"]),
])
def test_bad_caps_are_refused_naming_the_argument(caps, error, words):
    with pytest.raises(error) as info:
        _int4_choices().plan(60_000, target=_M4, **caps)
    for word in words:
        assert word in str(info.value)


def test_caps_need_a_target():
    with pytest.raises(ValueError, match="max_arena_growth_bytes needs a target"):
        _int4_choices().plan(60_000, max_arena_growth_bytes=1_000)
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="max_instructions_growth needs a target"):
        planner.plan_budget(_digits_model(), 10_000, x, max_instructions_growth=0.02)


def test_a_budget_only_all_int8_per_tensor_meets_is_planned_so():
    """Dense kernels per tensor drop their per-channel scales: all int8 that
    way is the smallest file here (no DECODE operator to pay), and a budget
    below the per-channel int8 file gets it, within the budget (the
    planner used to fall back to per-channel int8, over it)."""
    tensors = {"fc": [_facts("fc", 64, 4)]}
    byte_model = plan_costs.ByteModel(int8_bytes=800, tensors=tensors,
                                      dense_per_tensor_bytes=-32)
    offers = {"fc": [(None, "int8", 64, 1.0, "int8", False),
                     (None, "int8", 64, 1.5, "int8", True),
                     (1, "tensor", 60, 3.0, "lut", False)]}
    found = planner.Choices(byte_model=byte_model, offers=offers,
                            layer_types={"fc": "Dense"}, bits=[1], modes=["tensor"],
                            fisher="labels")
    assert found.min_bytes == 768
    plan = found.plan(777)
    assert plan.estimate_bytes == 768 <= 777
    assert plan.weight_quantization == "dense_per_tensor" and not plan.compressed
    assert plan.layers[0].sensitivity == 1.5
    assert found.plan(800).estimate_bytes == 800  # per channel, more accurate


def test_a_budget_that_counts_decodes_code():
    """AD's case in small: at 45,000 B a file budget takes 4-bit LUTs; a
    budget for the file and DECODE's 21,408 B of code leaves 23,592 B of
    file, so 2 bits."""
    found = _choices([("fc", 64_000, 64)], int8_bytes=66_000, lut_sensitivity=0.5,
                     bits=(1, 2, 3, 4))
    file_only = found.plan(45_000, target=_M4)
    plan = found.plan(45_000, target=_M4, budget_includes_code=True)
    assert file_only.layers[0].bits == 4 and not file_only.budget_includes_code
    assert file_only.estimate_bytes + _DECODE_CODE > 45_000
    assert plan.layers[0].bits == 2 and plan.budget_includes_code
    assert plan.counted_bytes == plan.estimate_bytes + _DECODE_CODE <= 45_000
    assert "+ DECODE code 21,408 B" in plan.table()
    assert "of budget 45,000 B (file and code)" in plan.table()
    assert planner.Plan.from_dict(plan.to_dict()) == plan
    # All int8 needs no code: a budget it meets stays int8.
    assert not found.plan(66_000, target=_M4, budget_includes_code=True).compressed
    # The least budget counts the code: the 1-bit file plus 21,408 B.
    least = found.byte_model.estimate({"fc": (1, "tensor")}) + _DECODE_CODE
    assert found.least_budget(_DECODE_CODE) == least
    assert found.plan(least, target=_M4, budget_includes_code=True).layers[0].bits == 1
    with pytest.raises(ValueError, match=f"plus DECODE's code .*: {least:,} bytes"):
        found.plan(least - 1, target=_M4, budget_includes_code=True)
    found.plan(least - 1, target=_M4)  # a file budget: fits
    # Where the firmware links DECODE anyway, there is no code to count.
    linked = found.plan(45_000, target=_LINKED, budget_includes_code=True)
    assert linked.layers[0].bits == 4 and linked.counted_bytes == linked.estimate_bytes


def test_a_budget_that_counts_code_needs_a_target(cli_files, capsys):
    found = _choices([("fc", 64_000, 64)], int8_bytes=66_000)
    with pytest.raises(ValueError, match="budget_includes_code=True needs a target"):
        found.plan(45_000, budget_includes_code=True)
    with pytest.raises(TypeError, match="budget_includes_code must be True or False"):
        found.plan(45_000, target=_M4, budget_includes_code="yes")
    code = plan_cli.main([cli_files["m.keras"], "--budget", "8KiB", "--data",
                          cli_files["x.npy"], "--budget_includes_code"])
    assert code == 2
    assert "--budget_includes_code needs --target" in capsys.readouterr().err


def test_plan_files_whose_file_and_code_exceed_the_budget_are_refused(tmp_path):
    found = _choices([("fc", 64_000, 64)], int8_bytes=66_000, lut_sensitivity=0.5,
                     bits=(1, 2, 3, 4))
    plan = found.plan(45_000, target=_M4, budget_includes_code=True)
    _assert_edit_refused(tmp_path, plan, ("budget_bytes",), plan.counted_bytes - 1,
                         ["budget_bytes", "DECODE's 21,408 B of code exceed"])
    # A schema 4 file has no such field.
    data = plan.to_dict()
    data["schema"] = 4
    with pytest.raises(ValueError, match="budget_includes_code: a schema 4 plan"):
        planner.Plan.from_dict(data)


def _int4_plan():
    """A schema 4 plan with an int4 Dense layer (so FULLY_CONNECTED per
    tensor), an int4 conv, a LUT and an int8 layer, for the M4:
    26,864 + (2,000 - 4,608) + (9,232 - 18,432) + (336 - 640) + 64 = 14,816
    (an int4 tensor: half its weights, and 16 B for its buffer's entry)."""
    rows = [
        planner.LayerPlan("conv1", "Conv2D", 144, None, "int8", 144, 0.0,
                          arena_bytes=0),
        planner.LayerPlan("conv2", "Conv2D", 4608, 3, "tensor", 2000, 0.1,
                          decode_path="width3_32", decode_instructions=1_000.0,
                          representation="lut", arena_bytes=4_808),
        planner.LayerPlan("fc1", "Dense", 18432, 4, "tensor", 9232, 0.2,
                          representation="int4", int4_instructions=5_000.0,
                          arena_bytes=0),
        planner.LayerPlan("fc2", "Conv2D", 640, 4, "channel", 336, 0.3,
                          representation="int4", int4_instructions=500.0,
                          arena_bytes=0),
    ]
    return planner.Plan(
        budget_bytes=15_000, estimate_bytes=14_816, int8_bytes=26_864,
        min_bytes=7_000, layers=rows, target=_M4, target_profile=True,
        decode_code_bytes=_DECODE_CODE, flash_change=14_816 - 26_864 + _DECODE_CODE,
        weight_quantization="dense_per_tensor", int8_instructions=1e6,
        instructions_growth=6_500 / 1e6, arena_growth_bytes=4_808,
        max_instructions_growth=0.01)


def test_schema_4_plan_round_trip_with_int4_layers(tmp_path):
    plan = _int4_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema"] == 5 and data["weight_quantization"] == "dense_per_tensor"
    assert [r["representation"] for r in data["layers"]] == ["int8", "lut", "int4", "int4"]
    options = data["export_options"]
    assert options["int4"] == "auto" and options["weight_quantization"] == "dense_per_tensor"
    # The LUT saves 2,544 B of file, less than DECODE's code: export must
    # write it anyway.
    assert plan.decode_forced and options["decode"] == "always"
    check_combinations(**options)  # export takes this combination
    loaded = planner.Plan.load(path)
    assert loaded == plan
    assert loaded.quantize_options()["overrides"]["fc1"]["constraint"] == "int4"
    text = loaded.table()
    assert "dense_per_tensor" in text and "+0.7%" in text and "(cap +1.0%)" in text
    # A schema 3 file (no representation) still loads: int8 and LUT layers.
    old = _schema_3(_target_plan().to_dict())
    source = tmp_path / "old.json"
    source.write_text(json.dumps(old))
    loaded = planner.Plan.load(source)
    assert [r.representation for r in loaded.layers] == ["int8", "lut", "lut", "lut"]
    assert loaded.weight_quantization == "per_channel" and not loaded.int4_layers
    # ... but not with a schema 4 field.
    old["weight_quantization"] = "per_channel"
    source.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="weight_quantization: a schema 3 plan has no"):
        planner.Plan.load(source)


@pytest.mark.parametrize("path, value, words", [
    (("layers", 2, "representation"), "int2", ["layers[2] ('fc1').representation",
                                               "not one of"]),
    (("layers", 2, "bits"), 5, ["layers[2] ('fc1').bits", "K <= 16"]),
    (("layers", 2, "bytes"), 9_000, ["layers[2] ('fc1').bytes", "takes at least 9,232 B"]),
    (("layers", 2, "mode"), "channel", ["layers[2] ('fc1').mode", "per tensor only"]),
    (("layers", 2, "mode"), "int8", ["layers[2] ('fc1').mode", "representation 'int4'"]),
    (("weight_quantization",), "per_channel", ["layers[2] ('fc1').representation",
                                               "dense_per_tensor"]),
    (("weight_quantization",), "per_tensor", ["weight_quantization", "one of"]),
    (("layers", 2, "int4_instructions"), -1, ["layers[2] ('fc1').int4_instructions"]),
    (("layers", 1, "int4_instructions"), 3.0, ["layers[1] ('conv2').int4_instructions",
                                              "null for a lut layer"]),
    (("layers", 2, "decode_path"), "width4_16", ["layers[2] ('fc1').decode_path",
                                                "together"]),
    (("instructions_growth",), 0.002, ["instructions_growth", "give 0.0065"]),
    (("max_instructions_growth",), 0.005, ["instructions_growth", "exceeds the plan's cap"]),
    (("max_arena_growth_bytes",), 4_000, ["arena_growth_bytes", "exceeds the plan's cap"]),
    (("arena_growth_bytes",), 100, ["arena_growth_bytes", "largest layer"]),
    (("layers", 3, "arena_bytes"), None, ["layers:", "['fc2']"]),
])
def test_schema_4_plan_files_with_bad_int4_fields_are_refused(tmp_path, path, value,
                                                              words):
    _assert_edit_refused(tmp_path, _int4_plan(), path, value, words)


def _int4_model():
    """conv (Conv2D 8x3x3 on 8x8x2) -> fc1 Dense(32) -> fc2 Dense(10)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc2")(x))


@pytest.mark.slow
def test_an_int4_plan_exports_int4_weights_within_its_estimate(tmp_path):
    """plan_budget on a small model for the M4 at a budget that int4 meets:
    no DECODE; quantize_model(**plan) and export(**plan.export_options())
    write INT4 weight tensors where the plan says, within the estimate."""
    from tensorflow.lite.python import schema_py_generated as schema

    from tflite_export.pipeline import flatbuffer

    model = _int4_model()
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 2)).astype(np.float32)
    found = planner.choices(model, x, max_batches=1, kmeans_iterations=2)
    facts = found.byte_model.tensors
    assert [f[0].op for f in facts.values()] == ["CONV_2D", "FULLY_CONNECTED",
                                                  "FULLY_CONNECTED"]
    kinds = {n: sorted({o.kind for o in opts}) for n, opts in found.offers.items()}
    assert kinds["fc1"] == ["int4", "int8", "lut"]
    # A Dense layer's int8 is offered per channel and per tensor (what it
    # becomes beside an int4 Dense layer), each with its own rounding.
    int8 = {n: {o.dense_per_tensor: o.sensitivity for o in opts if o.kind == "int8"}
            for n, opts in found.offers.items()}
    assert set(int8["fc1"]) == {False, True} and set(int8["conv"]) == {None}
    assert int8["fc1"][True] > int8["fc1"][False] > 0
    # Half of fc1's 9,216 weights beyond what int4 on every layer needs.
    int4_file = found.byte_model.estimate({n: (4, "tensor", "int4") for n in facts})
    budget = int4_file + 2_000
    assert budget < found.byte_model.int8_bytes
    plan = found.plan(budget, target=_M4)
    assert not plan.compressed and "fc1" in plan.int4_layers
    assert plan.flash_change == plan.file_change < 0
    assert plan.weight_quantization == "dense_per_tensor"
    for row in plan.layers:
        if row.mode == "int8" and row.layer_type == "Dense":
            assert row.sensitivity == int8[row.layer][True]
    assert planner.Plan.from_dict(plan.to_dict()) == plan
    q = lutq_tf.quantize_model(model, **plan)
    path = str(tmp_path / "int4.tflite")
    result = tflite_export.export(q, path, representative_data=x, **plan.export_options())
    size = os.path.getsize(path)
    assert size <= plan.estimate_bytes <= budget
    # The per-channel scales the Dense kernels drop are credited, and the
    # bias quantisation TFLM may need counted.
    assert plan.estimate_bytes <= size + _slack(size), (plan.estimate_bytes, size)
    with open(path, "rb") as f:
        written = f.read()
    parsed = schema.ModelT.InitFromPackedBuf(bytearray(written), 0)
    subgraph = parsed.subgraphs[0]
    int4_ops = sorted(
        flatbuffer.op_name(parsed, op) for op in subgraph.operators
        if flatbuffer.op_name(parsed, op) in ("CONV_2D", "FULLY_CONNECTED")
        and subgraph.tensors[op.inputs[1]].type == schema.TensorType.INT4)
    ops = {"conv": "CONV_2D", "fc1": "FULLY_CONNECTED", "fc2": "FULLY_CONNECTED"}
    assert int4_ops == sorted(ops[n] for n in plan.int4_layers)
    assert firmware.DECODE_OP not in firmware.op_names(written)
    assert result.verification.bit_exact
    assert result.device.flash_change < 0


@pytest.mark.parametrize("text, expected", [("2%", 0.02), ("0.02", 0.02), ("0", 0.0),
                                            ("150%", 1.5)])
def test_cli_instruction_caps(text, expected):
    assert plan_cli.parse_instructions_cap(text) == pytest.approx(expected)


@pytest.mark.parametrize("flags, words", [
    (["--max_instructions_growth", "2%"], ["--max_instructions_growth needs --target"]),
    (["--target", _M4, "--max_instructions_growth=-1%"],
     ["--max_instructions_growth='-1%'", "fraction (0.02)"]),
    (["--target", _M4, "--max_arena_growth_bytes", "lots"],
     ["--max_arena_growth_bytes='lots'", "bytes >= 0"]),
])
def test_cli_names_bad_caps_before_loading_anything(tmp_path, capsys, flags, words):
    out = tmp_path / "plan.json"
    code = plan_cli.main([str(tmp_path / "m.keras"), "--budget", "8KiB", "--data",
                          str(tmp_path / "x.npy"), "--out", str(out)] + flags)
    assert code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not out.exists()
    assert plan_cli.parse_arena_cap("0") == 0 and plan_cli.parse_arena_cap("4KiB") == 4096


@pytest.mark.slow
def test_an_int4_tensor_whose_bias_buffer_was_shared_stays_within_its_estimate(tmp_path):
    """Untrained convs have equal (zero) biases, which the converter keeps in
    one buffer; an int4 tensor's requantised bias needs a buffer of its own
    (fuzz seed 1: a file 52 B over its estimate)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))
    data = np.random.default_rng(0).standard_normal((16, 8, 8, 2)).astype(np.float32)
    found = planner.choices(model, data, max_batches=1, kmeans_iterations=2)
    facts = found.byte_model.tensors
    assert [f.shared_bias for n in ("conv_a", "conv_b", "fc") for f in facts[n]] == [16, 16, 0]
    for layers in (["conv_a"], ["conv_a", "conv_b"]):
        estimate = found.byte_model.estimate({n: (4, "channel", "int4") for n in layers})
        q = lutq_tf.quantize_model(model, layer_names=layers, bits=4, constraint="int4",
                                   per_channel=True)
        result = tflite_export.export(q, str(tmp_path / "m.tflite"),
                                      representative_data=data, int4="always")
        assert result.size_bytes <= estimate, (layers, result.size_bytes, estimate)


@pytest.mark.slow
def test_dense_per_tensor_bytes_bound_the_file(tmp_path):
    """All int8 with per-tensor Dense kernels (a plan the int4 offers make
    possible): the per-channel scales go, but the alignment of the int64
    zero points may move by 4 B a kernel (fuzz seeds 13 and 29: files 4 B
    over the estimate)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((14,)), keras.layers.Dense(5),
                              keras.layers.Dense(9), keras.layers.Dense(10),
                              keras.layers.Dense(5)])
    data = np.random.default_rng(0).standard_normal((32, 14)).astype(np.float32)
    byte_model = plan_costs.measure(model, data)
    result = tflite_export.export(model, str(tmp_path / "m.tflite"), representative_data=data,
                                  weight_quantization="dense_per_tensor")
    estimate = byte_model.int8_bytes + byte_model.dense_per_tensor_bytes
    assert result.size_bytes <= estimate < byte_model.int8_bytes
