"""results.md is merged from every suite JSON in the results directory.

The suites themselves are replaced by fakes here (no training), so these
tests check the bookkeeping in seconds: which JSON a run replaces, which it
keeps, and what the merged markdown shows.
"""

import json
import os
import subprocess
import sys

import paths
import pytest

from benchmarks import accuracy_vs_bits
from benchmarks import report
from benchmarks import run_all
from experiments import pipeline

REPO = paths.REPO


def _row(variant, accuracy, flash, **fields):
    return pipeline.ResultRow(
        variant=variant, keras_accuracy=accuracy, tflm_accuracy=accuracy,
        tflm_samples=100, test_samples=100, flash_bytes=flash,
        baseline_bytes=2 * flash, arena_bytes=1000, export="int8",
        **fields)


def _suite_json(path, name, variant, seconds, command):
    """A suite JSON as `run_all` writes it, with one row."""
    row = {k: v for k, v in vars(_row(variant, 0.7659, 67696)).items()
           if k != "result"}
    with open(path, "w") as f:
        json.dump({"suite": name, "title": f"{name} title",
                   "description": f"{name} description",
                   "start_accuracy": 0.75, "start_seconds": 0.0,
                   "num_train": 50000, "num_test": 10000, "seconds": seconds,
                   "run": {"command": command, "date": "2000-01-02",
                           "environment": "test machine",
                           "seconds": seconds, "quick": False},
                   "rows": [row]}, f)


@pytest.fixture
def fake_suites(monkeypatch):
    """`run_suite` returns one row per call, named after the call count."""
    calls = []

    def run_suite(suite, work_dir, verbose=0):
        calls.append(suite.name)
        row = _row(f"{suite.name} run {len(calls)}", 0.9, 1000 * len(calls))
        return accuracy_vs_bits.SuiteResult(
            suite, [row], start_accuracy=0.8, start_seconds=0.0,
            num_train=10, num_test=100, seconds=120.0)

    monkeypatch.setattr(accuracy_vs_bits, "run_suite", run_suite)
    return calls


def _run_digits(out_dir, command):
    return run_all.run_benchmarks(
        str(out_dir), str(out_dir / "work"), suite_names=("digits",),
        tfmot=False, train_speed=False, command=command)


def _table_rows(text, heading):
    """The body rows of the markdown table right under `heading`."""
    section = text[text.index(heading) + len(heading):]
    section = section[:section.index("\n#")]
    return [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| variant", "| ---"))]


def test_a_suite_json_left_in_out_dir_survives_a_run_of_another(
        tmp_path, fake_suites):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    _suite_json(out_dir / "cifar10.json", "cifar10", "LUT-Q 4-bit / tensor",
                1500.0, "python -m benchmarks.run_all --suites=cifar10")
    before = (out_dir / "cifar10.json").read_bytes()
    (out_dir / "weights_cifar10.png").write_bytes(b"png")

    path = _run_digits(out_dir, "python -m benchmarks.run_all --suites=digits")

    assert fake_suites == ["digits"]
    assert (out_dir / "cifar10.json").read_bytes() == before
    text = open(path).read()
    # Both suites' rows are in the one report, each under its own heading
    # with the command and date of its own run.
    cifar = _table_rows(text, "### cifar10 title")
    assert len(cifar) == 1 and cifar[0].startswith("| LUT-Q 4-bit / tensor |")
    assert "| 76.59% |" in cifar[0] and "67,696" in cifar[0]
    assert ("From `python -m benchmarks.run_all --suites=cifar10` on "
            "2000-01-02 (test machine); suite time 25.0 min.") in text
    digits = _table_rows(text, "### scikit-learn digits")
    assert [r.split(" | ")[0] for r in digits] == ["| digits run 1"]
    # Time table: one line per part and the total of both.
    assert ("| cifar10 title | `python -m benchmarks.run_all --suites=cifar10`"
            " | 2000-01-02 | 25.0 |") in text
    assert "| **total** | | | **27.0** |" in text
    assert "**mnist**: no results (no JSON in this directory)" in text
    assert "![weights](weights_cifar10.png)" in text
    # The plot has a panel per suite: wider than a one-panel plot.
    from PIL import Image
    width, _ = Image.open(out_dir / "accuracy_vs_bytes.png").size
    assert width > 2 * 6.5 * 120 * 0.9

    saved = json.load(open(out_dir / "digits.json"))
    assert saved["run"]["command"] == "python -m benchmarks.run_all --suites=digits"
    assert saved["run"]["seconds"] == 120.0
    assert saved["run"]["environment"].count("CPU cores") == 1


def test_a_rerun_suite_replaces_its_old_rows(tmp_path, fake_suites):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    _suite_json(out_dir / "digits.json", "digits", "OLD digits row", 60.0,
                "old command")
    (out_dir / "weights_digits.png").write_bytes(b"older run's layer")

    path = _run_digits(out_dir, "new command")
    text = open(path).read()
    assert "OLD digits row" not in text and "old command" not in text
    assert _table_rows(text, "### scikit-learn digits")[0].startswith(
        "| digits run 1 |")
    # The fake run drew no histogram: the stale one is gone, not linked.
    assert not (out_dir / "weights_digits.png").exists()
    assert "weights_digits.png" not in text

    text = open(_run_digits(out_dir, "newer command")).read()
    rows = _table_rows(text, "### scikit-learn digits")
    assert len(rows) == 1 and rows[0].startswith("| digits run 2 |")
    assert json.load(open(out_dir / "digits.json"))["rows"][0]["variant"] \
        == "digits run 2"


def test_report_only_rebuilds_the_report_from_the_jsons(tmp_path):
    _suite_json(tmp_path / "mnist.json", "mnist", "LUT-Q 1-bit / tensor",
                600.0, "mnist command")
    with open(tmp_path / "train_speed.json", "w") as f:
        json.dump({"config": {"quick": True}, "ms_per_step": {}}, f)
    (tmp_path / "train_speed.md").write_text("# speed\n")

    text = open(run_all.report_only(str(tmp_path), "report command")).read()
    assert text.startswith("# LUT-Q benchmark results\n\nWritten by "
                           "`report command`")
    assert "| LUT-Q 1-bit / tensor | int8 | 76.59% |" in text
    # train_speed.json without a run record: shown, not counted.
    assert ("| train-step time | `python -m benchmarks.train_speed --quick` | "
            "not recorded | not recorded |") in text
    assert "| **total** | | | **10.0** |" in text
    assert ("leaves out the parts whose time was not recorded: "
            "train-step time.") in text
    assert "[train_speed.md](train_speed.md)" in text
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_report_only_rejects_an_empty_dir_and_names_a_malformed_json(tmp_path):
    with pytest.raises(ValueError, match="--report_only: no results JSON"):
        run_all.report_only(str(tmp_path))
    with pytest.raises(ValueError, match="--report_only"):
        run_all.report_only(str(tmp_path / "missing"))
    (tmp_path / "cifar10.json").write_text("{not json")
    with pytest.raises(ValueError, match="cifar10.json: not valid JSON"):
        run_all.report_only(str(tmp_path))
    (tmp_path / "cifar10.json").write_text('{"suite": "cifar10"}')
    with pytest.raises(ValueError, match="cifar10.json: no 'rows' list"):
        run_all.report_only(str(tmp_path))


def test_report_only_command_line_fails_clearly_without_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--report_only",
         f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
        timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode != 0
    assert "--report_only: no results JSON" in proc.stderr
    assert not (tmp_path / "results.md").exists()


def test_run_record_and_generated_line_name_the_command_and_machine():
    record = report.run_record("python -m x --flag", 90.0, quick=True)
    assert record["command"] == "python -m x --flag"
    assert record["seconds"] == 90.0 and record["quick"] is True
    assert len(record["date"]) == 10 and record["date"][4] == "-"
    assert f"{os.cpu_count()} CPU cores" in record["environment"]
    line = report.generated_line("python -m y", 150.0)
    assert line.startswith("Generated by `python -m y` on ")
    assert line.endswith(f"({report.environment()}) in 2.5 minutes.")
