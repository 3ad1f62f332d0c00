"""The shared example/benchmark helpers: tables, Pareto front, variants."""

import numpy as np
import pytest

from benchmarks import suites
from experiments import pipeline
import lutq_tf


def _row(variant, acc, tflm=None, flash=None, **fields):
    return pipeline.ResultRow(variant=variant, keras_accuracy=acc,
                              tflm_accuracy=tflm, flash_bytes=flash, **fields)


def test_format_table_aligns_columns_and_formats_cells():
    rows = [
        _row("float", 0.98, 0.9777, 99000, export="float32", tflm_samples=450,
             arena_bytes=11232, train_seconds=9.4),
        _row("LUT-Q 2-bit / tensor", 0.9756, None, None, export="int8"),
    ]
    lines = pipeline.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("variant")
    # Every column starts at the same offset in every line.
    tflm_column = lines[0].index("TFLM acc")
    assert lines[2][tflm_column:].startswith("97.77%")
    assert lines[3][tflm_column:].startswith("-")
    assert "99,000" in lines[2] and "11,232" in lines[2]
    assert lines[2].rstrip().endswith("9")  # train seconds, rounded
    assert "LUT-Q 2-bit / tensor" in lines[3]


def test_markdown_table_has_header_separator_and_one_line_per_row():
    rows = [_row("a", 0.5, 0.25, 1234), _row("b", 1.0)]
    lines = pipeline.markdown_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("| --- | ---: |")
    assert lines[2].split("|")[1].strip() == "a"
    assert "| 25.00% |" in lines[2] and "1,234" in lines[2]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(10, 0.5)], [0]),
    # (20, 0.4) is bigger and worse than (10, 0.5): dominated.
    ([(20, 0.4), (10, 0.5), (30, 0.9)], [1, 2]),
    # Same size: only the more accurate one; identical points: the first.
    ([(10, 0.5), (10, 0.7), (10, 0.7), (5, 0.1)], [3, 1]),
    # Equal accuracy at a larger size is not an improvement.
    ([(5, 0.8), (50, 0.8), (60, 0.85)], [0, 2]),
])
def test_pareto_front(points, expected):
    assert pipeline.pareto_front(points) == expected


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    points = [(int(b), float(a)) for b, a in
              zip(rng.integers(1, 20, 60), rng.integers(0, 10, 60) / 10)]
    front = set(pipeline.pareto_front(points))
    for i, (b, a) in enumerate(points):
        dominated = any(
            (b2 <= b and a2 >= a) and ((b2, a2) != (b, a) or j < i)
            for j, (b2, a2) in enumerate(points) if j != i)
        assert (i in front) == (not dominated), (i, points[i])


def test_variant_label():
    assert pipeline.variant_label(4) == "LUT-Q 4-bit / tensor"
    assert (pipeline.variant_label(4, "pow2", 0.5, per_channel=True)
            == "LUT-Q 4-bit pow2 50% pruned / channel")


def test_subset_is_fixed_sorted_and_spans_the_set():
    x = np.arange(1000)
    y = x // 100  # ordered by class, like image-folder test sets
    xs, ys = pipeline.subset((x, y), 100)
    xs2, _ = pipeline.subset((x, y), 100)
    np.testing.assert_array_equal(xs, xs2)
    assert len(xs) == 100 and np.all(np.diff(xs) > 0)
    assert len(np.unique(ys)) == 10  # a prefix would hold one class
    assert pipeline.subset((x, y), None)[0] is x
    assert pipeline.subset((x, y), 5000)[0] is x


def test_variants_cover_the_benchmark_grid():
    keys = suites.VARIANT_KEYS
    assert keys[:2] == ("float", "int8")
    for suffix in ("", "_pc"):
        for key in ("lutq1", "lutq2", "lutq3", "lutq4", "pow2_4",
                    "prune50_4", "prune75_4"):
            assert key + suffix in keys
    assert len(keys) == len(set(keys)) == 16
    chosen = suites.select_variants(["lutq4_pc", "float"])
    assert [v.key for v in chosen] == ["float", "lutq4_pc"]  # canonical order
    assert chosen[1].options["per_channel"] is True
    with pytest.raises(ValueError, match="--variants.*lutq9"):
        suites.select_variants(["lutq9"])


def test_suite_reports_missing_data(tmp_path):
    made = suites.make_suites(False, mnist=str(tmp_path / "none.npz"))
    assert "not found" in made["mnist"].missing_data()
    assert "--resnet8_h5" in made["cifar10"].missing_data()
    assert made["digits"].missing_data() is None


def test_subset_column_only_when_tflm_ran_on_a_subset():
    full = _row("a", 0.9, 0.9, 10, tflm_samples=450, test_samples=450,
                keras_accuracy_tflm_samples=0.9)
    assert "Keras acc, TFLM n" not in pipeline.format_table([full])
    part = _row("b", 0.8, 0.7, 10, tflm_samples=100, test_samples=1000,
                keras_accuracy_tflm_samples=0.75)
    table = pipeline.format_table([full, part])
    header, _, _, row_b = table.splitlines()
    column = header.index("Keras acc, TFLM n")
    assert row_b[column:].startswith("75.00%")


def test_full_suites_run_every_variant_on_all_training_data():
    for quick in (False, True):
        for suite in suites.make_suites(quick).values():
            assert "subset" not in suite.describe()
    full = suites.make_suites(False)
    assert tuple(v.key for v in full["cifar10"].variants) == \
        suites.VARIANT_KEYS
    assert full["cifar10"].tflm_samples == 1000
    assert full["mnist"].tflm_samples == 2000


def test_cifar10_suite_fine_tunes_with_the_recipes_float_rate():
    cifar10 = suites.make_suites(False)["cifar10"]
    assert "Adam lr 0.0003, cosine decay" in cifar10.describe()
    rate = cifar10.fine_tuning_rate(640)  # 10 steps at batch 64
    assert float(rate(0)) == pytest.approx(3e-4)
    assert float(rate(10)) == pytest.approx(0.0, abs=1e-12)
    # The other suites keep a constant rate.
    assert suites.make_suites(False)["mnist"].fine_tuning_rate(640) == 5e-4


def test_lutq_finetune_spreads_the_prune_rate_by_erk():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1, name="stem"),
                              keras.layers.Conv2D(64, 3, name="big"),
                              keras.layers.Flatten(), keras.layers.Dense(10, name="fc")])
    x, y = np.zeros((4, 8, 8, 3), "float32"), np.zeros(4, "int32")
    q, _ = pipeline.lutq_finetune(model, (x, y), epochs=0, verbose=0, bits=2,
                                  per_channel=True, prune_rate=0.5, prune_allocation="erk")
    expected = lutq_tf.erk_prune_overrides(model, 0.5)
    zeros = {layer.name: np.mean(layer.quantized_tensors["kernel"][2] == 0)
             for layer in lutq_tf.lutq_layers(q)}
    # Each channel prunes a whole number of its weights ("big": 18 each).
    assert zeros == pytest.approx({n: o["prune_rate"] for n, o in expected.items()}, abs=1 / 18)
    assert zeros["stem"] == 0 and zeros["big"] > 0.6
