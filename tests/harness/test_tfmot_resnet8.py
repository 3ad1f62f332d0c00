"""benchmarks.tfmot_resnet8: the BN switch, resumption, the report; tfmot's
BN behaviour itself when the compare venv is there."""

import json
import os
import subprocess

import keras
import numpy as np
import paths
import pytest

from benchmarks import tfmot_resnet8

_REPO = paths.REPO
_SHARED = paths.SHARED
_H5 = os.path.join(_SHARED, "models", "mlperf_tiny_resnet8.h5")
_CIFAR = os.path.join(_SHARED, "data", "cifar10_jpeg.tgz")
_COMPARE = os.environ.get("LUTQ_COMPARE_PYTHON", "/work/venv-compare/bin/python")


def _tiny():
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def test_bn_inference_mode_keeps_moving_statistics_and_trains_gamma():
    x = np.random.default_rng(0).random((32, 4, 4, 2)).astype("float32") * 3 + 2
    y = np.arange(32) % 2
    with tfmot_resnet8.bn_inference_mode():
        model = _tiny()
        bn = model.layers[2]
        mean, gamma = bn.moving_mean.numpy(), bn.gamma.numpy()
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(x, y, epochs=1, verbose=0)
        np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
        assert not np.allclose(bn.gamma.numpy(), gamma)
    # Restored on exit: a new train function moves the statistics again.
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(bn.moving_mean.numpy(), mean)


def _fake(cell_accuracy):
    def run(*args):
        return {"accuracy": cell_accuracy, "before": 0.1, "fit_seconds": 1,
                "bn_moving_mean_max_change": 0.0}
    return run


def test_runs_are_appended_skipped_on_rerun_and_reported(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tfmot_resnet8, "lutq_run",
                        lambda *a: calls.append(a) or _fake(0.5)())
    monkeypatch.setattr(tfmot_resnet8, "tfmot_run",
                        lambda *a: calls.append(a) or _fake(0.6)())
    monkeypatch.setattr("experiments.datasets.load_cifar10", lambda path: ("train", "test"))
    out = str(tmp_path / "r")
    for _ in range(2):
        tfmot_resnet8.run("c", "h", ["lutq", "tfmot"], [4], [0, 1], out)
    assert len(calls) == 4  # the second pass skips all four
    with open(out + ".json") as f:
        record = json.load(f)
    assert sorted((r["cell"], r["seed"]) for r in record["runs"]) == [
        ("lutq", 0), ("lutq", 1), ("tfmot", 0), ("tfmot", 1)]
    with open(out + ".md") as f:
        text = f.read()
    assert "| `lutq`: LUT-Q as shipped (BN trains) | 50.00 +- 0.00 (n=2) |" in text
    assert "| `tfmot`: tfmot as shipped" in text and "60.00 +- 0.00 (n=2)" in text


_NEEDS_COMPARE = pytest.mark.skipif(
    not (os.path.exists(_COMPARE) and os.path.exists(_H5) and os.path.exists(_CIFAR)),
    reason="needs the compare venv (tfmot, LUTQ_COMPARE_PYTHON) and ../shared's "
           "ResNet-8 .h5 and CIFAR-10")


def _baseline(tmp_path, *flags):
    """`tfmot_baseline.py` on ResNet-8 and 128 CIFAR-10 images, one epoch of
    batch 64, with `flags`; its result."""
    out = tmp_path / "result.json"
    subprocess.run(
        [_COMPARE, os.path.join(_REPO, "benchmarks", "tfmot_baseline.py"),
         "--model=resnet8", f"--resnet8_h5={_H5}", f"--data={_CIFAR}", "--epochs=1",
         "--batch_size=64", "--limit=128", *flags, f"--out={out}"],
        check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
@_NEEDS_COMPARE
def test_tfmot_cluster_weights_runs_batchnorm_in_inference_mode(tmp_path):
    r = _baseline(tmp_path, "--num_clusters=4", "--centroids=kmeans")
    assert r["bn_moving_mean_max_change"] == 0.0  # BN never in training mode
    assert len(r["clustered_layers"]) == 10
    assert all(n <= 4 for n in r["distinct_values_per_kernel"].values())


@pytest.mark.slow
@_NEEDS_COMPARE
def test_tfmot_qat_4_bit_trains_every_kernel_on_a_4_bit_grid(tmp_path):
    # The int4 anchor of benchmarks.recipe (`tfmot-qat4`).
    r = _baseline(tmp_path, "--method=qat", "--weight_bits=4", "--split=validation")
    assert (r["method"], r["weight_bits"], r["num_train"]) == ("qat", 4, 115)
    assert len(r["grid_levels"]) == 10  # 9 Conv2D and the Dense
    assert all(2 <= n <= 15 for n in r["grid_levels"].values())
