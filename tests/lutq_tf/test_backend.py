"""lutq_tf runs on Keras' TensorFlow backend only, and says so."""

import os
import subprocess
import sys

import keras
import pytest

import lutq_tf


def test_import_under_another_backend_says_what_to_do():
    # No other backend is installed here (Keras' numpy backend imports jax),
    # so a fresh process reports another one.
    code = ("import keras; keras.backend.backend = lambda: 'jax'; "
            "import lutq_tf")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode != 0
    assert ("ImportError: lutq_tf needs Keras' TensorFlow backend, but "
            "Keras is running on 'jax'") in result.stderr
    assert "KERAS_BACKEND=tensorflow" in result.stderr


def test_wrapper_checks_the_backend_at_first_use(monkeypatch):
    # keras.config.set_backend can switch the backend after the import.
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ImportError, match="LUTQWrapper needs Keras' "
                                          "TensorFlow backend.*'jax'"):
        lutq_tf.LUTQWrapper(keras.layers.Dense(3))
