"""The benchmark harness end to end on a tiny configuration, so it can't rot."""

import json
import os

import pytest

from benchmarks import report
from benchmarks import run_all


@pytest.mark.slow
def test_quick_harness_writes_markdown_json_and_plots(tmp_path):
    out_dir, work_dir = tmp_path / "results", tmp_path / "work"
    path = run_all.run_benchmarks(
        str(out_dir), str(work_dir), quick=True,
        suite_names=("digits", "mnist"),
        mnist=str(tmp_path / "missing" / "mnist.npz"),
        variant_keys=["int8", "lutq2"], epochs=1, pretrain_epochs=1,
        tfmot=False, train_speed=False)

    text = open(path).read()
    assert "| float + int8 post-training | int8 |" in text
    assert "| LUT-Q 2-bit / tensor | int8 |" in text
    # Two variant rows in the digits table, no failed variant.
    assert text.count("| int8 |") == 2
    assert "failed" not in text
    # The missing MNIST file is reported, not fatal.
    assert "**mnist**: data not found" in text
    assert "tfmot" not in text  # the comparison lives in the recipe's records
    assert "Not rerun by this command (--notrain_speed)" in text

    for png in ("accuracy_vs_bytes.png", "weights_digits.png"):
        data = open(out_dir / png, "rb").read()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    with open(out_dir / "digits.json") as f:
        rows = json.load(f)["rows"]
    lutq = rows[1]
    assert lutq["bits"] == 2
    # The 2-bit LUT-Q export is smaller than its uncompressed twin and the
    # int8 baseline, and TFLM ran the whole 450-image test set.
    assert lutq["flash_bytes"] < lutq["baseline_bytes"]
    assert lutq["flash_bytes"] < rows[0]["flash_bytes"]
    assert lutq["tflm_samples"] == 450
    assert 0.1 < lutq["tflm_accuracy"] <= 1.0
    assert os.path.exists(work_dir / "digits" / "lutq2.tflite")

    # The report and plot can be rebuilt from the JSON alone.
    os.remove(out_dir / "accuracy_vs_bytes.png")
    report.write_report(str(out_dir), "python -m benchmarks.run_all --report_only")
    assert (out_dir / "accuracy_vs_bytes.png").stat().st_size > 5000
