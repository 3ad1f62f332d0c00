"""benchmarks.recipe: flags, the search's choices, the report, the schedules
(also on the tf_keras side when the compare venv is there), and a smoke run of
each task (slow; tiny data, a one-rate search)."""

import json
import math
import os
import subprocess
import types

from absl import app
import numpy as np
import paths
import pytest

from benchmarks import recipe
from benchmarks.record import save_record

_REPO = paths.REPO
_SHARED = paths.SHARED
_H5 = os.path.join(_SHARED, "models", "mlperf_tiny_resnet8.h5")
_CIFAR = os.path.join(_SHARED, "data", "cifar10_jpeg.tgz")
_MNIST = os.path.join(_SHARED, "data", "mnist.npz")
_COMPARE = os.environ.get("LUTQ_COMPARE_PYTHON", "/work/venv-compare/bin/python")
_NO_COMPARE = "needs the compare venv (tf_keras, tfmot): set LUTQ_COMPARE_PYTHON"


def _flags(**values):
    f = dict(task="lenet", cifar10=None, resnet8_h5=None, mnist="mnist.npz",
             variants=list(recipe.VARIANTS), epochs=1, seeds=1, pretrain_epochs=1,
             limit=None, out=None)
    f.update(values)
    return types.SimpleNamespace(**f)


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------


def test_default_rows_are_the_headline_rows_and_tfmot_is_opt_in():
    # The ResNet-8 record's plan depends on the default list.
    assert list(recipe.VARIANTS) == ["float", "lutq4", "lutq3", "lutq2", "pow2-4",
                                     "lutq4-pruned50", "lutq4-pruned50-erk"]
    assert list(recipe.COMPARISON) == ["tfmot4", "lutq-t4", "tfmot16", "lutq-t16",
                                       "tfmot256", "lutq-t256"]
    assert recipe.COMPARISON["lutq-t16"] == {"bits": 4, "per_channel": False}
    assert recipe.COMPARISON["tfmot256"] == {"tfmot": 256}


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(app.UsageError, match=r"unknown tfmot8; known: float, lutq4, .*"
                       r"tfmot4, lutq-t4, .*lutq-t256"):
        recipe.validate(_flags(variants=["float", "tfmot8"]))


def test_each_task_needs_its_data():
    with pytest.raises(app.UsageError, match="--task=resnet8 needs --cifar10 and --resnet8_h5"):
        recipe.validate(_flags(task="resnet8", cifar10="c.tgz"))
    with pytest.raises(app.UsageError, match="--task=lenet needs --mnist"):
        recipe.validate(_flags(mnist=None))
    with pytest.raises(app.UsageError, match="unknown 'vgg'"):
        recipe.validate(_flags(task="vgg"))
    recipe.validate(_flags())


def test_tfmot_rows_need_the_compare_python(monkeypatch):
    monkeypatch.setenv("LUTQ_COMPARE_PYTHON", "/nonexistent/python")
    recipe.validate(_flags(variants=["lutq-t4"]))  # LUT-Q rows alone do not
    with pytest.raises(app.UsageError, match="LUTQ_COMPARE_PYTHON"):
        recipe.validate(_flags(variants=["lutq-t4", "tfmot4"]))


def test_a_record_of_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "r")
    save_record({"runs": [], "settings": {"task": "lenet", "limit": 100,
                                                 "pretrain_epochs": 1}}, out + ".json")
    with pytest.raises(app.UsageError, match="give another --out"):
        recipe.run(_flags(limit=200, out=out), "cmd")


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------

# Each variant's best rate in the fake search below.
_BEST = {"float": 1e-4, "lutq2": 1e-3, "lutq4": 3e-4, "tfmot4": 3e-3, "lutq-t4": 1e-4,
         "lutq-t16": 3e-5, "lutq4-pruned50": 1e-3, "int4-c": 3e-4, "int4-t": 1e-3}


def _fake_search(monkeypatch, warmup_gain, dictionary_gain=0.04, callback_gains=None):
    calls = []
    callback_gains = callback_gains or {}

    def fake_run(record, path, key, f, stage, variant, peak, schedule, epochs, seed,
                 dictionary_rate=1.0, callbacks=()):
        calls.append(key)
        gain = {"cosine": 0.0, "constant": -0.01, "warmup": warmup_gain}[schedule]
        gain += sum(callback_gains.get((variant, c), 0.0) for c in callbacks)
        return (0.9 - 0.01 * abs(math.log10(peak / _BEST[variant])) + gain
                + (dictionary_gain if dictionary_rate == 0.1 else 0.0) + 0.001 * epochs)

    monkeypatch.setattr(recipe, "run_variant", fake_run)
    return calls


def test_search_chooses_a_schedule_then_every_rows_rate(tmp_path, monkeypatch):
    calls = _fake_search(monkeypatch, warmup_gain=0.05)
    # 100 validation images: one accuracy's SE is 3 pp, below warm-up's 5 and the
    # dictionary rate 0.1's 4.
    stage = recipe.Stage("validation", None, (None, np.zeros(100)), "start")
    record = {"runs": []}
    path = str(tmp_path / "r.json")
    recipe.search(record, path, _flags(variants=["float", "tfmot4", "lutq-t4"]), stage)
    assert record["schedule"] == "warmup"
    # Per-tensor rows asked for: their dictionary rate is chosen on lutq-t4/16.
    assert record["learning_rates"] == {"float": 1e-4, "tfmot4": 3e-3, "lutq-t4": 1e-4,
                                        "lutq4": 3e-4, "lutq2": 1e-3, "lutq-t16": 3e-5}
    assert record["dictionary_rate"] == record["tensor_dictionary_rate"] == 0.1
    assert "search/lutq-t16/warmup/3e-05/d0" in calls
    assert recipe.dictionary_rate(record, "lutq-t4") == record["tensor_dictionary_rate"]
    # The schedule is chosen on float and 2-bit only; the ladder climbs while
    # its largest rate wins (tfmot4: up to 1e-2, lutq2: to 3e-3).
    tfmot = [k for k in calls if k.startswith("search/tfmot4/")]
    assert {k.split("/")[2] for k in tfmot} == {"warmup"}
    assert "search/tfmot4/warmup/0.01" in tfmot and "search/lutq2/cosine/0.003" in calls
    assert "search/lutq2/cosine/0.01" not in calls
    assert "search/lutq4/warmup/0.0003/d0" in calls
    # A later run for more rows keeps the rates already chosen.
    recipe.search(record, path, _flags(variants=["lutq-t16"]), stage)
    assert record["learning_rates"]["float"] == 1e-4
    assert record["learning_rates"]["lutq-t16"] == 3e-5
    with open(path) as f:
        assert json.load(f)["schedule"] == "warmup"


def test_int4_rows_are_opt_in_and_take_their_dictionary_modes_rate(tmp_path, monkeypatch):
    assert not set(recipe.INT4) & set(recipe.VARIANTS)
    assert recipe.INT4["int4-c"] == {"bits": 4, "per_channel": True, "constraint": "int4"}
    recipe.validate(_flags(variants=["float", "int4-c", "int4-t"]))
    calls = _fake_search(monkeypatch, warmup_gain=0.0, dictionary_gain=0.0)
    stage = recipe.Stage("validation", None, (None, np.zeros(100)), "start")
    record = {"runs": []}
    recipe.search(record, str(tmp_path / "r.json"), _flags(variants=["int4-t"]), stage)
    # A per-tensor int4 row alone brings the per-tensor dictionary rate's choice.
    assert "tensor_dictionary_rate" in record
    assert record["learning_rates"]["int4-t"] == 1e-3
    assert not [k for k in calls if k.startswith("search/int4-t/") and "/+" in k]
    assert "int4-t" not in record["callbacks"]
    record["dictionary_rate"], record["tensor_dictionary_rate"] = 1.0, 0.0
    assert recipe.dictionary_rate(record, "int4-t") == 0.0
    assert recipe.dictionary_rate(record, "int4-c") == 1.0
    assert not recipe.per_tensor("float") and not recipe.per_tensor("tfmot16")


def test_int4_rows_are_reported_against_float_and_free_4_bit():
    record = _record()
    record["settings"] = {"task": "resnet8", "limit": None}
    assert "Int4-exact" not in recipe.markdown(record)
    tests = {"lutq4": (0.99, 0.99), "int4-c": (0.986, 0.99), "int4-t": (0.95, 0.95)}
    for variant, values in tests.items():
        record["runs"] += [{"key": f"test/{variant}/e2/seed{s}", "accuracy": a}
                           for s, a in enumerate(values)]
    text = recipe.markdown(record)
    assert ("| int4-c | 98.80 +- 0.20 (n=2) | float | 99.10 +- 0.06 (n=3) "
            "| -0.30 +- 0.21 pp | >= -0.3 pp: met |") in text
    assert ("| int4-c | 98.80 +- 0.20 (n=2) | lutq4 | 99.00 +- 0.00 (n=2) "
            "| -0.20 +- 0.20 pp |  |") in text
    assert ("| lutq-t16 | 96.50 +- 0.29 (n=3) | -1.50 +- 0.29 pp "
            "| >= -1 pp: missed by 0.50 pp |") in text
    record["settings"]["task"] = "lenet"  # the targets are ResNet-8's
    assert "| -0.30 +- 0.21 pp |  |" in recipe.markdown(record)


def test_choices_within_the_noise_keep_the_defaults(tmp_path, monkeypatch):
    _fake_search(monkeypatch, warmup_gain=0.02, dictionary_gain=0.02)
    stage = recipe.Stage("validation", None, (None, np.zeros(100)), "start")
    record = {"runs": []}
    recipe.search(record, str(tmp_path / "r.json"), _flags(variants=["float"]), stage)
    assert record["schedule"] == "cosine" and record["dictionary_rate"] == 1.0


def test_each_lutq_row_keeps_the_callback_that_gains_more_than_the_noise(tmp_path,
                                                                       monkeypatch):
    # 100 validation images: the noise is 3 pp.
    calls = _fake_search(monkeypatch, warmup_gain=0.0, dictionary_gain=0.0, callback_gains={
        ("lutq4-pruned50", "pruning-ramp"): 0.05, ("lutq4-pruned50", "freeze-last"): 0.04,
        ("lutq2", "kmeans-warmup"): 0.02})
    stage = recipe.Stage("validation", None, (None, np.zeros(100)), "start")
    record = {"runs": []}
    recipe.search(record, str(tmp_path / "r.json"),
                  _flags(task="resnet8", variants=["float", "lutq2", "lutq4-pruned50"]), stage)
    assert record["callbacks"] == {"lutq2": [], "lutq4-pruned50": ["pruning-ramp"]}
    # Each against the same run without it: freezing the last epoch over two.
    assert {"search/lutq2/cosine/0.001/+kmeans-warmup", "search/lutq2/cosine/0.001/e2",
            "search/lutq2/cosine/0.001/e2/+freeze-last"} <= set(calls)
    assert "search/lutq2/cosine/0.001/+pruning-ramp" not in calls  # lutq2 does not prune
    assert "search/lutq2/cosine/0.001/+bn-reestimate" in calls
    assert not [k for k in calls if k.startswith("search/float/") and "+" in k]
    assert recipe.row(record, "lutq4-pruned50") == "lutq4-pruned50+pruning-ramp"
    assert recipe.row(record, "lutq2") == "lutq2"
    # LeNet-5 has no batch norm to re-estimate.
    assert not recipe.callbacks_apply("bn-reestimate", "lutq2", "lenet")
    assert recipe.callbacks_apply("freeze-last", "lutq2", "lenet")


def test_callbacks_are_built_for_the_run():
    from lutq_tf import callbacks

    warmup, ramp, freeze = recipe.make_callbacks(
        ["kmeans-warmup", "pruning-ramp", "freeze-last"], epochs=5, steps=1000)
    assert isinstance(warmup, callbacks.KMeansWarmup) and warmup.steps == 100
    assert isinstance(ramp, callbacks.PruningRamp) and ramp.steps == 500
    assert isinstance(freeze, callbacks.FreezeDictionaries) and freeze.epochs == 1
    with pytest.raises(ValueError, match="freeze-last needs a run of 2 epochs"):
        recipe.make_callbacks(["freeze-last"], epochs=1, steps=100)
    with pytest.raises(ValueError, match="bn-reestimate needs the training images"):
        recipe.make_callbacks(["bn-reestimate"], epochs=1, steps=100)


def test_bn_reestimate_sets_the_moving_statistics_as_fit_begins():
    import keras
    import numpy as np

    import lutq_tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    q = lutq_tf.quantize_model(model, bits=2)
    x = np.random.default_rng(0).normal(3.0, 2.0, (recipe.BATCH * 2, 4)).astype("float32")
    y = np.zeros(len(x), "int32")
    q.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    (callback,) = recipe.make_callbacks(["bn-reestimate"], epochs=1, steps=2, x=x)
    bn = next(layer for layer in q.layers if isinstance(layer, keras.layers.BatchNormalization))
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: seen.append(np.array(bn.moving_mean)))
    q.fit(x, y, batch_size=recipe.BATCH, epochs=1, verbose=0, callbacks=[callback, probe])
    hidden = np.asarray(q.layers[0](x))  # the quantised first layer's outputs
    np.testing.assert_allclose(seen[0], hidden.mean(axis=0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _record():
    runs = [{"key": "search/float/cosine/0.0003", "accuracy": 0.991},
            {"key": "search/tfmot4/cosine/0.001", "accuracy": 0.95}]
    tests = {"float": (0.990, 0.992, 0.991),
             "tfmot4": (0.97, 0.97, 0.97), "lutq-t4": (0.98, 0.98, 0.98),
             "tfmot16": (0.99, 0.99, 0.99), "lutq-t16": (0.96, 0.965, 0.97),
             "tfmot256": (0.99, 0.99, 0.99), "lutq-t256": (0.975, 0.985, 0.995),
             "lutq2": (0.99,)}
    for variant, values in tests.items():
        runs += [{"key": f"test/{variant}/e2/seed{s}", "accuracy": a}
                 for s, a in enumerate(values)]
    return {"runs": runs, "epochs": 2, "train_size": 60000, "command": "cmd",
            "settings": {"task": "lenet", "limit": None, "pretrain_epochs": 10}}


def test_report_shows_rows_gaps_and_the_tfmot_pairs():
    text = recipe.markdown(_record())
    assert text.startswith("# MNIST LeNet-5: the fine-tuning recipe\n")
    assert "trained here from seed 0 for 10 epochs" in text
    assert "| tfmot4 | cosine |  | 95.00% |" in text
    assert "after 2 epochs on all 60,000 training images" in text
    assert "| float | 99.10 +- 0.06 (n=3) |  |" in text
    assert "| lutq-t16 | 96.50 +- 0.29 (n=3) | -2.60 pp |" in text
    assert "| lutq2 | 99.00 (n=1) | -0.10 pp |" in text
    assert "| 4 | 97.00 +- 0.00 (n=3) | 98.00 +- 0.00 (n=3) | +1.00 +- 0.00 pp |  |" in text
    assert ("| 16 | 99.00 +- 0.00 (n=3) | 96.50 +- 0.29 (n=3) | -2.50 +- 0.29 pp "
            "| LUT-Q worse by > 2 SE |") in text
    assert "| 256 | 99.00 +- 0.00 (n=3) | 98.50 +- 0.58 (n=3) | -0.50 +- 0.58 pp |  |" in text


def test_tfmot_pairs_with_one_seed_show_no_spread():
    record = {"epochs": 5, "runs": [{"key": "test/tfmot4/e5/seed0", "accuracy": 0.97},
                                    {"key": "test/lutq-t4/e5/seed0", "accuracy": 0.98},
                                    {"key": "test/tfmot16/e5/seed0", "accuracy": 0.99}]}
    lines = recipe.tfmot_pairs(record)
    assert lines[-1] == "| 4 | 97.00 (n=1) | 98.00 (n=1) | +1.00 pp |  |"  # K=16: one side
    assert recipe.tfmot_pairs({"epochs": 5, "runs": record["runs"][:1]}) == []


def test_a_diagnostic_row_is_described_once_it_has_test_runs():
    record = _record()
    assert "tfmot16-frozen" not in recipe.markdown(record)
    record["runs"].append({"key": "test/tfmot16-frozen/e2/seed0", "accuracy": 0.985})
    text = recipe.markdown(record)
    assert "| tfmot16-frozen | 98.50 (n=1) | -0.60 pp |" in text
    assert "`tfmot16-frozen` (`--variants=tfmot16-frozen`): tfmot K=16 with its centroids" in text
    # The pairs table and its command stay the pairs'.
    assert "--variants=tfmot4,lutq-t4,tfmot16,lutq-t16,tfmot256,lutq-t256`" in text


def test_a_diagnostic_row_passes_its_centroids_to_tfmot(tmp_path, monkeypatch):
    from benchmarks import tfmot_runner

    seen = {}

    def fake_baseline(**kwargs):
        seen.update(kwargs)
        return {"num_train": 3, "num_evaluated": 2, "test_accuracy": 0.5}

    monkeypatch.setattr(tfmot_runner, "run_tfmot_baseline", fake_baseline)
    stage = recipe.Stage("test", (None, np.zeros(3)), (None, np.zeros(2)), "start.h5")
    record = {"runs": []}
    for variant, centroids in (("tfmot16-frozen", "freeze"), ("tfmot16", "train")):
        recipe.run_variant(record, str(tmp_path / "r.json"), f"test/{variant}",
                    _flags(variants=[variant]), stage, variant, 3e-4, "cosine", 1, 0)
        assert seen["num_clusters"] == 16
        assert f"--centroids={centroids}" in seen["extra_flags"]


def test_the_int4_anchor_runs_tfmot_qat_and_is_reported_against_int4_c(tmp_path,
                                                                       monkeypatch):
    from benchmarks import tfmot_runner

    assert recipe.runs_in_tfmot("tfmot-qat4") and not recipe.per_tensor("tfmot-qat4")
    assert not recipe.runs_in_tfmot("int4-c")
    seen = {}

    def fake_baseline(**kwargs):
        seen.update(kwargs)
        return {"num_train": 3, "num_evaluated": 2, "test_accuracy": 0.5}

    monkeypatch.setattr(tfmot_runner, "run_tfmot_baseline", fake_baseline)
    stage = recipe.Stage("validation", (None, np.zeros(3)), (None, np.zeros(2)), "start.h5")
    record = {"runs": []}
    assert recipe.run_variant(record, str(tmp_path / "r.json"), "search/tfmot-qat4",
                              _flags(variants=["tfmot-qat4"]), stage, "tfmot-qat4", 1e-3,
                              "cosine", 1, 0) == 0.5
    assert {"--method=qat", "--weight_bits=4", "--split=validation"} <= set(seen["extra_flags"])
    assert not [f for f in seen["extra_flags"] if f.startswith(("--bn", "--centroids"))]
    report = _record()
    report["settings"] = {"task": "resnet8", "limit": None}
    for variant, values in {"int4-c": (0.986, 0.99), "tfmot-qat4": (0.97, 0.98)}.items():
        report["runs"] += [{"key": f"test/{variant}/e2/seed{s}", "accuracy": a}
                           for s, a in enumerate(values)]
    text = recipe.markdown(report)
    assert ("| int4-c | 98.80 +- 0.20 (n=2) | tfmot-qat4 | 97.50 +- 0.50 (n=2) "
            "| +1.30 +- 0.54 pp |  |") in text
    assert "`tfmot-qat4` (`--variants=tfmot-qat4`" in text


def test_a_record_names_every_command_that_added_runs():
    assert recipe.commands({"runs": []}) == []
    assert recipe.commands({"command": "a"}) == ["a"]
    record = {"commands": ["a", "b --variants=tfmot-qat4"], "runs": [], "epochs": 5}
    assert recipe.markdown(record).splitlines()[2] == "`a`; `b --variants=tfmot-qat4`"


def test_report_shows_the_callback_search_and_the_chosen_rows():
    base = "search/lutq4-pruned50/cosine/0.001"
    runs = [{"key": base, "accuracy": 0.80}, {"key": base + "/+kmeans-warmup", "accuracy": 0.79},
            {"key": base + "/+pruning-ramp", "accuracy": 0.83},
            {"key": base + "/e2", "accuracy": 0.82}, {"key": base + "/e2/+freeze-last",
                                                     "accuracy": 0.825},
            {"key": "test/float/e5/seed0", "accuracy": 0.85},
            {"key": "test/lutq4-pruned50/e5/seed0", "accuracy": 0.82},
            {"key": "test/lutq4-pruned50+pruning-ramp/e5/seed0", "accuracy": 0.84}]
    record = {"runs": runs, "epochs": 5, "schedule": "cosine",
              "learning_rates": {"lutq4-pruned50": 1e-3},
              "callbacks": {"lutq4-pruned50": ["pruning-ramp"]}}
    text = recipe.markdown(record)
    assert ("| lutq4-pruned50 | 79.00% (-1.00) | 83.00% (+3.00) | 82.50% (+0.50) | "
            " | pruning-ramp |") in text
    rows = [line for line in text.splitlines() if line.startswith("| lutq4-pruned50")]
    # The chosen recipe's row first, the earlier one after it.
    assert rows[-2].startswith("| lutq4-pruned50+pruning-ramp | 84.00 (n=1) | -1.00 pp")
    assert rows[-1].startswith("| lutq4-pruned50 | 82.00 (n=1) | -3.00 pp")


def test_report_of_a_record_from_before_the_tasks():
    record = {"runs": [{"key": "test/float/e5/seed0", "accuracy": 0.8}], "epochs": 5}
    text = recipe.markdown(record)
    assert text.startswith("# CIFAR-10 ResNet-8: the fine-tuning recipe\n")
    assert "MLPerf Tiny .h5" in text and "all 50,000 training images" in text
    assert "LUT-Q - tfmot" not in text


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------

_STEPS = (0, 1, 5, 9, 10, 11, 55, 99, 100)


def _values(schedule):
    rate = recipe.learning_rate(1e-3, schedule, 100)
    return [float(rate(step)) for step in _STEPS]


def test_schedules():
    assert recipe.learning_rate(1e-3, "constant", 100) == 1e-3
    np.testing.assert_allclose(
        _values("cosine"), [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in _STEPS],
        rtol=1e-5, atol=1e-9)
    # 10 steps of linear warm-up, then cosine over the other 90.
    np.testing.assert_allclose(
        _values("warmup"), [1e-4 * s if s <= 10 else
                            1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
                            for s in _STEPS], rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(_COMPARE), reason=_NO_COMPARE)
def test_tf_keras_gets_the_same_schedules_and_validation_split():
    script = (
        "import json; import numpy as np; import tf_keras\n"
        "from benchmarks.recipe import learning_rate\n"
        "from experiments.datasets import validation_split\n"
        f"steps = {list(_STEPS)}\n"
        "out = {s: [float(learning_rate(1e-3, s, 100, tf_keras)(t)) for t in steps]\n"
        "       for s in ('cosine', 'warmup')}\n"
        "out['held'] = validation_split(np.arange(1000), np.arange(1000))[1][0].tolist()\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([_COMPARE, "-c", script], cwd=_REPO, capture_output=True,
                          text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    tf_keras_side = json.loads(proc.stdout.strip().splitlines()[-1])
    for schedule in ("cosine", "warmup"):
        np.testing.assert_allclose(tf_keras_side[schedule], _values(schedule), rtol=1e-6)
    from experiments import datasets

    held = datasets.validation_split(np.arange(1000), np.arange(1000))[1][0]
    assert tf_keras_side["held"] == held.tolist()


# ---------------------------------------------------------------------------
# Smoke runs: both tasks, a float, a LUT-Q and a tfmot row, one rate, one epoch
# ---------------------------------------------------------------------------


@pytest.fixture
def one_rate_search(monkeypatch):
    monkeypatch.setattr(recipe, "RATES", (1e-3,))
    monkeypatch.setattr(recipe, "FIRST_RATES", 1)
    monkeypatch.setattr(recipe, "SCHEDULES", ("cosine",))
    monkeypatch.setattr(recipe, "SCHEDULE_VARIANTS", ("float",))
    monkeypatch.setattr(recipe, "DICTIONARY_RATES", (1.0,))
    monkeypatch.setattr(recipe, "DICTIONARY_RATE_VARIANTS",
                        {"dictionary_rate": ("lutq-t4",), "tensor_dictionary_rate": ("lutq-t4",)})
    monkeypatch.setenv("LUTQ_COMPARE_PYTHON", _COMPARE)


def _smoke(f):
    recipe.validate(f)
    recipe.run(f, "smoke")
    with open(f.out + ".json") as r:
        record = json.load(r)
    assert [r["key"] for r in record["runs"]] == [
        "search/float/cosine/0.001", "search/lutq-t4/cosine/0.001",
        "search/tfmot4/cosine/0.001", "test/float/e1/seed0", "test/lutq-t4/e1/seed0",
        "test/tfmot4/e1/seed0"]
    assert all(0 <= r["accuracy"] <= 1 for r in record["runs"])
    with open(f.out + ".md") as md:
        assert "| 4 | " in md.read()
    recipe.run(f, "smoke")  # resumed: nothing left to run
    with open(f.out + ".json") as r:
        assert len(json.load(r)["runs"]) == 6


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(not (os.path.exists(_COMPARE) and os.path.exists(_MNIST)),
                    reason=f"{_NO_COMPARE}; and ../shared's mnist.npz")
def test_lenet_smoke(one_rate_search, tmp_path, monkeypatch):
    """Extended (`make test-all`; needs ../shared and the compare venv,
    which CI lacks). The default tests cover the pieces this runs end to
    end: the search and its choices
    (test_search_chooses_a_schedule_then_every_rows_rate), the report
    (test_report_shows_rows_gaps_and_the_tfmot_pairs), the record's
    settings on a rerun (test_a_record_of_other_settings_is_refused) and
    the tf_keras side's schedules
    (test_tf_keras_gets_the_same_schedules_and_validation_split)."""
    monkeypatch.setenv("LUTQ_TF_CACHE_DIR", str(tmp_path / "cache"))
    _smoke(_flags(mnist=_MNIST, variants=["float", "lutq-t4", "tfmot4"], limit=256,
                  out=str(tmp_path / "r")))
    # Two float starts (90 % and all), reused by the rerun.
    assert len(os.listdir(tmp_path / "cache" / "recipe")) == 2


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(not (os.path.exists(_COMPARE) and os.path.exists(_H5)
                         and os.path.exists(_CIFAR)),
                    reason=f"{_NO_COMPARE}; and ../shared's ResNet-8 .h5 and CIFAR-10")
def test_resnet8_smoke(one_rate_search, tmp_path):
    """Extended (`make test-all`): as test_lenet_smoke, on the ResNet-8 task
    (its flags: test_each_task_needs_its_data; its report:
    test_report_of_a_record_from_before_the_tasks)."""
    _smoke(_flags(task="resnet8", cifar10=_CIFAR, resnet8_h5=_H5, mnist=None,
                  variants=["float", "lutq-t4", "tfmot4"], limit=128,
                  out=str(tmp_path / "r")))

