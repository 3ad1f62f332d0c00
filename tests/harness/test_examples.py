"""The examples run from the command line and fail clearly on bad flags."""

import os
import subprocess
import sys

import paths
import pytest

REPO = paths.REPO


def _run(module, *flags, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.slow
def test_quickstart_runs_with_tiny_flags_and_prints_its_table(tmp_path):
    proc = _run("examples.quickstart", "--float_epochs=1", "--lutq_epochs=1",
                f"--out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert stage in out
    table = out[out.index("variant "):].splitlines()
    assert table[2].startswith("float ")
    assert table[3].startswith("float + int8 post-training ")
    assert table[4].startswith("LUT-Q 2-bit / tensor + int8 ")
    assert "bit-exact" in out
    # The LUT file is judged on a Cortex-M4: on this small model DECODE's code
    # outweighs what compression saves, and the verdict says so.
    assert "device (cortex-m4-cmsis-nn" in out and "verdict: compression LOSES" in out
    for name in ("float32.tflite", "int8.tflite", "lutq.tflite",
                 "lutq_model_data.cc", "lutq_model_data.h", "lutq_model_data_ops.h",
                 "results.md"):
        assert (tmp_path / name).exists(), name
    sizes = {name: os.path.getsize(tmp_path / f"{name}.tflite")
             for name in ("float32", "int8", "lutq")}
    assert sizes["lutq"] < sizes["int8"] < sizes["float32"]


@pytest.mark.parametrize("module, flag, message", [
    ("examples.quickstart", "--bits=9", "--bits must be in 1..7"),
    ("examples.mnist", "--prune_rate=1.5", "--prune_rate must be in [0, 1)"),
    ("examples.cifar10_resnet8", "--epochs=1", "--pretrained is required"),
])
def test_bad_flags_name_the_flag(module, flag, message):
    proc = _run(module, flag, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


SHARED = os.path.join(os.path.dirname(REPO), "shared")
MNIST = os.path.join(SHARED, "data", "mnist.npz")


def _check_table(proc, out_dir, label):
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert stage in proc.stdout
    table = proc.stdout[proc.stdout.index("variant "):].splitlines()
    assert [line.split("  ")[0] for line in table[2:5]] == [
        "float", "float + int8 post-training", label]
    text = (out_dir / "results.md").read_text()
    assert f"| {label} | int8 |" in text
    assert (out_dir / "lutq_model_data.cc").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MNIST), reason=f"no {MNIST}")
def test_mnist_example_runs_on_a_subset(tmp_path):
    proc = _run("examples.mnist", f"--data_dir={MNIST}", "--limit=600",
                "--float_epochs=1", "--lutq_epochs=1", "--bits=3",
                "--constraint=pow2", "--tflm_samples=50",
                f"--out_dir={tmp_path}")
    _check_table(proc, tmp_path, "LUT-Q 3-bit pow2 / tensor + int8")
    assert "3/5 LUT-Q 3-bit pow2 / tensor fine-tuning, 1 epochs" in proc.stdout
