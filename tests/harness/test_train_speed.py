"""benchmarks.train_speed's tfmot timing and report, without timing."""

import json

import pytest

from benchmarks import tfmot_runner
from benchmarks import train_speed

_CONFIG = {"quick": False, "tfmot": True, "tfmot_epochs": 4,
           "machine": "2 CPU cores", "tf": "2.x", "keras": "3.x",
           "batch_size": 64, "steps": 60, "epochs": 6, "repeats": 2,
           "jit_compile": False}


def test_tfmot_runs_on_the_same_architectures(monkeypatch):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return {"ms_per_step": 40.0 * kwargs["num_clusters"],
                "float_ms_per_step": 8.0}

    monkeypatch.setattr(tfmot_runner, "run_tfmot_baseline", fake)
    got = train_speed.measure_tfmot("cnn", batch_size=64, epochs=3)
    assert [c["model"] for c in calls] == ["speed_cnn"] * 3
    assert [c["num_clusters"] for c in calls] == [4, 16, 256]
    assert {c["batch_size"] for c in calls} == {64}
    assert got[16] == {"tfmot": 640.0, "float": 8.0}


def test_tfmot_failure_is_reported_not_raised(monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("tfmot baseline failed (exit 1): no tfmot\nmore")

    monkeypatch.setattr(tfmot_runner, "run_tfmot_baseline", broken)
    got = train_speed.measure_tfmot("mlp", batch_size=64, epochs=3)
    assert got == "not run: tfmot baseline failed (exit 1): no tfmot"


def test_summary_takes_each_repeats_ratio_then_the_median():
    timings = {"float": {"wall": [5.0, 6.0, 8.0], "cpu": [8.0, 9.0, 8.0]},
               "LUT-Q K=16": {"wall": [6.0, 9.0, 8.8],
                              "cpu": [12.0, 9.0, 10.0]}}
    got = train_speed.summarize(timings)["LUT-Q K=16"]
    # Ratios per repeat: 1.2, 1.5, 1.1 (not median 8.8 / median 6.0).
    assert got["ratio"] == pytest.approx(1.2)
    assert got["ratio_min"] == pytest.approx(1.1)
    assert got["ratio_max"] == pytest.approx(1.5)
    assert got["wall"] == pytest.approx(8.8)
    assert got["cpu_ratio"] == pytest.approx(1.25)
    # Extra CPU ms/step per repeat: 4, 0, 2 -> median 2.
    assert got["extra_cpu"] == pytest.approx(2.0)
    assert "kmeans" not in got
    assert train_speed.summarize(timings)["float"]["ratio"] == 1.0


def test_repeats_collect_one_figure_per_process(monkeypatch):
    calls = iter([{"float": (5.0, 7.0, None, 0.5),
                   "LUT-Q K=4": (6.0, 8.0, 0.9, 0.5)},
                  {"float": (6.0, 7.5, None, 0.6),
                   "LUT-Q K=4": (6.6, 8.5, 1.0, 0.6)}])
    monkeypatch.setattr(train_speed, "measure", lambda *a: next(calls))
    variants = [("float", None), ("LUT-Q K=4", {"num_values": 4})]
    got = train_speed.measure_repeated("mlp", variants, 2, 10, 64, False, 1)
    assert got == {"float": {"wall": [5.0], "cpu": [7.0], "kmeans": [None],
                             "pass": [0.5]},
                   "LUT-Q K=4": {"wall": [6.0], "cpu": [8.0], "kmeans": [0.9],
                                 "pass": [0.5]}}


def test_markdown_puts_lutq_and_tfmot_ratios_side_by_side():
    results = {"mlp": train_speed.summarize({
        "float": {"wall": [5.0, 4.0], "cpu": [8.0, 8.0]},
        "LUT-Q K=4": {"wall": [6.0, 4.8], "cpu": [9.0, 9.0]},
        "LUT-Q K=16": {"wall": [6.5, 5.6], "cpu": [9.5, 9.5]}}),
        "cnn": train_speed.summarize(
            {"float": {"wall": [20.0], "cpu": [30.0]}})}
    tfmot = {"mlp": {4: {"tfmot": 20.0, "float": 8.0},
                     256: {"tfmot": 296.0, "float": 8.0}},
             "cnn": "not run: no tfmot"}
    text = train_speed.markdown(results, _CONFIG, tfmot)
    assert "`python -m benchmarks.train_speed --tfmot`" in text
    assert "in each of 2 processes" in text
    # K=16: ratios 1.30 and 1.40 -> median 1.35; wall median 6.05.
    assert ("| mlp | LUT-Q K=16 | 6.05 | 1.35x | 1.30-1.40x | 1.19x | 9.50 "
            "| 1.50 |  |") in text
    assert "| mlp | 4 | 1.20x | 20.0 | 8.0 | 2.5x |" in text
    # No LUT-Q row at K=256 in this run: its cell stays empty.
    assert "| mlp | 256 |  | 296.0 | 8.0 | 37.0x |" in text
    assert "| cnn | | | not run: no tfmot | | |" in text
    assert "tfmot" not in train_speed.markdown(
        results, dict(_CONFIG, tfmot=False))
    assert "--jit_compile" in train_speed.markdown(
        results, dict(_CONFIG, jit_compile=True))


def test_goals_say_met_or_why_not():
    timings = {"float": {"wall": [5.0], "cpu": [8.0], "kmeans": [None],
                         "pass": [0.5]},
               "LUT-Q K=16": {"wall": [6.0], "cpu": [12.0], "kmeans": [3.5],
                              "pass": [0.5]},
               "LUT-Q K=256": {"wall": [6.0], "cpu": [11.0], "kmeans": [2.8],
                               "pass": [0.5]}}
    lines = train_speed.goal_lines({"mlp": train_speed.summarize(timings)})
    k16, k256 = lines
    # 12 / 8 = 1.5x over the 1.3x goal: 2.4 ms allowed, 4 added.
    assert k16.startswith("- mlp, LUT-Q K=16: 1.50x CPU, goal <= 1.3x: "
                          "**not met**")
    assert "It allows 2.40 extra ms/step" in k16
    assert "k-means step alone costs 3.50 ms" in k16
    assert "two cost 1.00 ms" in k16
    assert k256 == "- mlp, LUT-Q K=256: 1.38x CPU, goal <= 1.5x: met."
    assert train_speed.goal_lines({"cnn": train_speed.summarize(
        {"float": timings["float"]})}) == []


def test_a_run_without_tfmot_keeps_the_earlier_tfmot_figures(tmp_path):
    path = str(tmp_path / "train_speed.json")
    assert train_speed.previous_tfmot(path) == ({}, None)
    earlier = {"command": "python -m benchmarks.train_speed --tfmot",
               "date": "2026-12-02"}
    with open(path, "w") as f:
        json.dump({"tfmot_ms_per_step": {"mlp": {"16": {"tfmot": 40.0,
                                                        "float": 8.0}},
                                         "cnn": "not run: no tfmot"},
                   "run": earlier}, f)
    tfmot, run = train_speed.previous_tfmot(path)
    assert tfmot == {"mlp": {16: {"tfmot": 40.0, "float": 8.0}},
                     "cnn": "not run: no tfmot"}
    assert run == earlier
    results = {"mlp": train_speed.summarize(
        {"float": {"wall": [5.0], "cpu": [8.0]},
         "LUT-Q K=16": {"wall": [6.0], "cpu": [9.0]}})}
    text = train_speed.markdown(results, dict(_CONFIG, tfmot=False), tfmot,
                                run)
    assert "(from `python -m benchmarks.train_speed --tfmot` on 2026-12-02)" in text
    assert "| mlp | 16 | 1.20x | 40.0 | 8.0 | 5.0x |" in text
