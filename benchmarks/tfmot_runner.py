"""Runs the tfmot clustering baseline in its own process (Keras 3 side).

`benchmarks/tfmot_baseline.py` needs tf_keras + tfmot, which switch the
whole process to Keras 2, so it must never be imported here. This module
only launches it with `subprocess` and parses its JSON; it imports neither
tfmot nor tf_keras (nor Keras).

The interpreter is, in order: the `python` argument, the environment
variable `LUTQ_COMPARE_PYTHON` (e.g. `/work/venv-compare/bin/python`), or
the current interpreter.

Example (Keras 3 side):

    model = experiments.models.digits_cnn()
    np.savez("/tmp/init.npz", *model.get_weights())  # the order --weights_in reads
    result = run_tfmot_baseline(
        model="digits", num_clusters=16, epochs=2, data="digits",
        weights_in="/tmp/init.npz")
    result["test_accuracy"], result["ms_per_step"]
"""

import json
import os
import subprocess
import sys
import tempfile

_TF_LOG_PREFIXES = ("I0000", "W0000", "E0000", "WARNING: All log messages")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfmot_baseline.py")


def compare_python():
    """The interpreter used for the baseline (see module doc)."""
    return os.environ.get("LUTQ_COMPARE_PYTHON") or sys.executable


def check_compare_python(python=None):
    """The baseline's interpreter, checked to have tf_keras and tfmot.

    Looks the packages up without importing them (no TensorFlow start-up),
    so a long benchmark can check before its first run.

    Args:
        python: interpreter to check; see `compare_python()`.

    Returns:
        The interpreter's path.

    Raises:
        RuntimeError: it is missing or lacks the packages; the message names
            `LUTQ_COMPARE_PYTHON`.
    """
    python = python or compare_python()
    probe = ("import importlib.util, sys; sys.exit(not all(importlib.util.find_spec(m) for m "
             "in ('tf_keras', 'tensorflow_model_optimization')))")
    try:
        ok = subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise RuntimeError(
            f"the tfmot baseline needs a python with tf-keras and "
            f"tensorflow-model-optimization; {python} is missing or has none "
            f"(LUTQ_COMPARE_PYTHON={os.environ.get('LUTQ_COMPARE_PYTHON')!r}). Set "
            "LUTQ_COMPARE_PYTHON to such a python, e.g. /work/venv-compare/bin/python "
            "(see benchmarks/tfmot_baseline.py).")
    return python


def run_tfmot_baseline(
    model="digits",
    num_clusters=16,
    epochs=2,
    batch_size=32,
    data="digits",
    weights_in=None,
    learning_rate=None,
    pretrain_epochs=None,
    seed=None,
    out=None,
    python=None,
    timeout=None,
    extra_flags=(),
):
    """Runs `tfmot_baseline.py` in a subprocess and returns its result.

    Args:
        model: `"mlp"`, `"lenet"`, `"digits_cnn"` (aliases `"digits"`,
            `"cnn"`), `"speed_cnn"`, or `"resnet8"` (give `--resnet8_h5=`
            in `extra_flags` and the CIFAR-10 path as `data`). With
            `--pretrained` in `extra_flags` (implied for resnet8), only the
            clustering run of a pretrained model (`run_pretrained`).
        num_clusters: clusters per kernel (K).
        epochs: epochs of the timed float and clustering runs.
        batch_size: batch size.
        data: `"digits"`, `"synthetic"` or a path to `mnist.npz`.
        weights_in: optional .npz of initial weights
            (`np.savez(path, *model.get_weights())`).
        learning_rate, pretrain_epochs, seed: passed on when not None.
        out: where the script writes its JSON; a temporary file if None.
        python: interpreter to use; see `compare_python()`.
        timeout: seconds before the subprocess is killed (None: no limit).
        extra_flags: further `--flag=value` strings.

    Returns:
        The result dict (keys `test_accuracy`, `ms_per_step`,
        `float_ms_per_step`, `distinct_values_per_kernel`, ...).

    Raises:
        RuntimeError: if the script fails; the message holds the end of its
            stderr (e.g. tfmot missing: point `LUTQ_COMPARE_PYTHON` at the
            compare venv's python).
    """
    python = python or compare_python()
    flags = [
        f"--model={model}",
        f"--num_clusters={int(num_clusters)}",
        f"--epochs={int(epochs)}",
        f"--batch_size={int(batch_size)}",
        f"--data={data}",
    ]
    if weights_in is not None:
        flags.append(f"--weights_in={os.fspath(weights_in)}")
    if learning_rate is not None:
        flags.append(f"--learning_rate={learning_rate}")
    if pretrain_epochs is not None:
        flags.append(f"--pretrain_epochs={int(pretrain_epochs)}")
    if seed is not None:
        flags.append(f"--seed={int(seed)}")
    flags.extend(extra_flags)

    with tempfile.TemporaryDirectory(prefix="lutq_tfmot_") as tmp:
        out_path = os.fspath(out) if out else os.path.join(tmp, "result.json")
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # The child picks its own Keras; don't leak a choice from here.
        env.pop("TF_USE_LEGACY_KERAS", None)
        proc = subprocess.run(
            [python, SCRIPT, *flags, f"--out={out_path}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0:
            # Drop TensorFlow's C++ start-up chatter, keep the traceback.
            lines = [
                line
                for line in proc.stderr.strip().splitlines()
                if not line.startswith(_TF_LOG_PREFIXES)
            ]
            tail = "\n".join(lines[-20:])
            raise RuntimeError(
                f"tfmot baseline failed (exit {proc.returncode}) with "
                f"{python}. If tfmot/tf_keras are missing, set "
                "LUTQ_COMPARE_PYTHON to the python of a venv with "
                "tensorflow, tf-keras and tensorflow-model-optimization "
                f"(see benchmarks/tfmot_baseline.py).\n{tail}"
            )
        with open(out_path) as f:
            return json.load(f)
