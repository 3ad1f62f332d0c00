"""benchmarks.train_speed's tfmot timing and report, without timing."""

from benchmarks import tfmot_runner
from benchmarks import train_speed

_CONFIG = {"quick": False, "tfmot": True, "tfmot_epochs": 4,
           "machine": "2 CPU cores", "tf": "2.x", "keras": "3.x",
           "batch_size": 64, "steps": 60, "epochs": 6, "jit_compile": False}


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


def test_markdown_puts_lutq_and_tfmot_ratios_side_by_side():
    results = {"mlp": {"float": (5.0, 8.0), "LUT-Q K=4": (6.0, 9.0),
                       "LUT-Q K=16": (6.5, 9.5)},
               "cnn": {"float": (20.0, 30.0)}}
    tfmot = {"mlp": {4: {"tfmot": 20.0, "float": 8.0},
                     256: {"tfmot": 296.0, "float": 8.0}},
             "cnn": "not run: no tfmot"}
    text = train_speed._markdown(results, _CONFIG, tfmot)
    assert "`python -m benchmarks.train_speed --tfmot`" in text
    assert "| mlp | LUT-Q K=16 | 6.50 | 1.30x | 9.50 | 1.19x |" in text
    assert "| mlp | 4 | 1.20x | 20.0 | 8.0 | 2.5x |" in text
    # No LUT-Q row at K=256 in this run: its cell stays empty.
    assert "| mlp | 256 |  | 296.0 | 8.0 | 37.0x |" in text
    assert "| cnn | | | not run: no tfmot | | |" in text
    assert "tfmot" not in train_speed._markdown(
        results, dict(_CONFIG, tfmot=False))
