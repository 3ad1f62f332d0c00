"""LUT-Q `fit` under tf.distribute matches single-device training.

Each run is a `tests/lutq_tf/distributed_run.py` process: logical devices and the
multi-worker runtime must be set up before TensorFlow initialises, which
pytest's process has long done. All runs train the same LUT-Q MLP (no
BatchNormalization) for 20 steps with a global batch of 32. The four
processes (the single-device reference, the mirrored run and two workers)
start together: each spends most of its time on one core, tracing and
compiling. The last test runs, in a process of its own, models made outside
the strategy's scope, which must fail with a clear error.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import paths
import pytest

RUN = os.path.join(os.path.dirname(__file__), "distributed_run.py")
LAYERS = ("fc1", "fc2")
TIMEOUT = 600


def _start(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(
        [sys.executable, RUN, *map(str, args)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(process):
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class _Runs:
    """The started processes; `result(name)` waits for one and loads its
    output (once)."""

    def __init__(self, root):
        ports = ",".join(map(str, _free_ports(2)))
        self.outputs = {}
        self.processes = {}
        for name, args in (("reference", ("reference",)),
                           ("mirrored", ("mirrored",)),
                           ("worker0", ("worker", 0, ports)),
                           ("worker1", ("worker", 1, ports))):
            out = root / f"{name}.npz"
            workdir = root / name
            workdir.mkdir()
            self.outputs[name] = out
            self.processes[name] = _start(
                *args, out, *(() if name == "reference" else (workdir,)))
        self.results = {}

    def result(self, name):
        if name not in self.results:
            _wait(self.processes[name])
            self.results[name] = dict(np.load(self.outputs[name]))
        return self.results[name]

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = _Runs(tmp_path_factory.mktemp("distributed"))
    yield started
    started.stop()


def _assert_matches_single_device(got, reference, prefix=""):
    for layer in LAYERS:
        for name in ("W", "d"):
            # All-reduce sums gradients in another order: ulp-level
            # differences, measured against the tensor's scale (elementwise
            # ratios of near-zero weights say nothing).
            got_value = got[f"{prefix}{layer}_{name}"]
            want = reference[f"{layer}_{name}"]
            error = np.max(np.abs(got_value - want)) / np.max(np.abs(want))
            assert error <= 1e-5, (layer, name, error)
        same = np.mean(got[f"{prefix}{layer}_A"] == reference[f"{layer}_A"])
        assert same >= 0.999, (layer, same)
    # Training moved d away from its start (the k-means step ran).
    assert got["loss"] < 1.0
    # The logged figures: the replicas' mean of identical measurements.
    np.testing.assert_allclose(got["figure_quantization_error"],
                               got["state_quantization_error"], rtol=1e-5)
    np.testing.assert_allclose(got["figure_quantization_error"],
                               reference["figure_quantization_error"],
                               rtol=1e-4)
    np.testing.assert_allclose(got["figure_assignments_changed"],
                               reference["figure_assignments_changed"],
                               atol=1e-3)


def _assert_replicas_identical(got):
    for layer in LAYERS:
        for name in ("W", "d", "A"):
            first = got[f"replica0_{layer}_{name}"]
            for r in range(1, int(got["replicas"])):
                np.testing.assert_array_equal(
                    got[f"replica{r}_{layer}_{name}"], first,
                    err_msg=f"{layer} {name}, replica {r}")


def _assert_checkpoints(got):
    for layer in LAYERS:
        for name in ("W", "d", "A"):
            # A .keras file saved under the strategy loads back exactly.
            np.testing.assert_array_equal(got[f"loaded_{layer}_{name}"],
                                          got[f"{layer}_{name}"])
            # BackupAndRestore resumed as if never interrupted.
            np.testing.assert_allclose(
                got[f"resumed_{layer}_{name}"],
                got[f"{layer}_{name}"], rtol=1e-6, atol=1e-7,
                err_msg=f"resumed {layer} {name}")


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(runs):
    got = runs.result("mirrored")
    assert int(got["replicas"]) == 2
    _assert_replicas_identical(got)
    _assert_matches_single_device(got, runs.result("reference"))
    _assert_checkpoints(got)


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_on_two_processes(runs):
    results = [runs.result(f"worker{i}") for i in range(2)]
    for got in results:
        assert int(got["replicas"]) == 2
        _assert_matches_single_device(got, runs.result("reference"))
        _assert_checkpoints(got)
    # Both workers hold the same state.
    for key, value in results[0].items():
        np.testing.assert_array_equal(results[1][key], value, err_msg=key)


# Models made outside the strategy's scope: each case prints the error
# `fit` (or `train_on_batch`) raised, or "trained". Models made inside
# train in the tests above.
_SCOPE_CASES = """
import os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
sys.path.insert(0, sys.argv[1])
import lutq_tf

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.ones((4, 3), "float32")

def quantized():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return lutq_tf.quantize_model(model, bits=1)

def compile_inside():
    model = quantized()
    with strategy.scope():
        model.compile("sgd", "mse")
    return model

def fit_inside():
    model = quantized()
    model.compile("sgd", "mse")
    with strategy.scope():
        model.fit(x, x[:, :2], batch_size=4, verbose=0)

for name, case in (
        ("compile_inside", lambda: compile_inside().fit(
            x, x[:, :2], batch_size=4, verbose=0)),
        ("train_on_batch", lambda: compile_inside().train_on_batch(
            x, x[:, :2])),
        ("fit_inside", fit_inside)):
    try:
        case()
        print(name, "trained")
    except Exception as error:
        print(name, type(error).__name__, str(error).replace(chr(10), " "))
"""


@pytest.mark.slow
def test_a_model_made_outside_the_strategy_scope_gets_a_clear_error():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    root = paths.REPO
    done = subprocess.run([sys.executable, "-c", _SCOPE_CASES, root], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    # Quantised (so built) outside, compiled inside: the optimizer is the
    # strategy's, the variables are not (Keras: a bare AssertionError).
    for case in ("compile_inside", "train_on_batch"):
        assert results[case].startswith("ValueError"), results[case]
        assert "its optimizer was made under a MirroredStrategy" in results[case]
    # Built outside, fitted inside the scope.
    assert results["fit_inside"].startswith("ValueError")
    assert ("was made outside any strategy.scope(), but fit runs under a "
            "MirroredStrategy") in results["fit_inside"]
    for case in ("compile_inside", "train_on_batch", "fit_inside"):
        assert ("Quantize the model (lutq_tf.quantize_model or "
                "lutq_tf.load_model, which also build it) and compile it "
                "inside one `with strategy.scope():`") in results[case]
