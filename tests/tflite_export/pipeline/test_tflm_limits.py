"""Graphs TFLM cannot run are refused early, with what to change."""

import os

import keras
import numpy as np
import pytest

import tflite_export


@pytest.mark.slow
def test_concatenation_of_more_than_ten_inputs_names_the_layer(tmp_path):
    inp = keras.Input((4, 4, 2))
    branches = [keras.layers.Conv2D(2, 1, name=f"b{i}")(inp)
                for i in range(11)]
    x = keras.layers.Concatenate(name="wide")(branches)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    data = np.random.default_rng(0).normal(size=(16, 4, 4, 2))
    with pytest.raises(tflite_export.UnsupportedModelError,
                       match=r"CONCATENATION has 11 inputs.*at most 10.*wide"):
        tflite_export.export(model, tmp_path / "m.tflite",
                             representative_data=data.astype("float32"))
    assert os.listdir(tmp_path) == []


def test_unsupported_model_error_is_an_export_error():
    # Callers catching ExportError keep catching TFLM refusals.
    assert issubclass(tflite_export.UnsupportedModelError,
                      tflite_export.ExportError)
