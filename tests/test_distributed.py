"""LUT-Q `fit` under tf.distribute matches single-device training.

Each run is a `tests/distributed_run.py` process: logical devices and the
multi-worker runtime must be set up before TensorFlow initialises, which
pytest's process has long done. All runs train the same LUT-Q MLP (no
BatchNormalization) for 20 steps with a global batch of 32. The four
processes (the single-device reference, the mirrored run and two workers)
start together: each spends most of its time on one core, tracing and
compiling.
"""

import os
import socket
import subprocess
import sys

import numpy as np
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
