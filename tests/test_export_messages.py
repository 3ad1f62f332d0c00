"""Bad input to export and to the TFLM runners: messages that name the
argument and the expected form."""

import os

import keras
import numpy as np
import pytest

import tflite_export


def _tiny():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(3, name="fc")])
    data = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    return model, data


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(min_agreement="0.5"), TypeError,
     r"min_agreement must be None or a number in \[0, 1\].*'0.5' \(str\)"),
    (dict(min_agreement=float("nan")), ValueError, r"min_agreement must be in \[0, 1\]"),
    (dict(max_verify_samples="abc"), TypeError,
     r"max_verify_samples must be an int >= 1.*'abc' \(str\)"),
    (dict(max_verify_samples=2.5), TypeError, "max_verify_samples must be an int"),
    (dict(max_verify_samples=0), ValueError, "max_verify_samples must be >= 1"),
])
def test_export_arguments_name_the_expected_form(tmp_path, kwargs, error, message):
    model, data = _tiny()
    with pytest.raises(error, match=message):
        tflite_export.export(model, tmp_path / "m.tflite", data, **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, data = _tiny()
    path = tmp_path_factory.mktemp("m") / "m.tflite"
    result = tflite_export.export(model, path, quantize="float32")
    return result, data


@pytest.mark.slow
def test_tflm_predict_on_a_wrong_input_shape(exported):
    result, data = exported
    with pytest.raises(ValueError, match=r"x has shape \(8, 10\).*\(1, 16\).*\(N, 16\)"):
        tflite_export.tflm_predict(result.path, data[:, :10], result.arena_bytes)
    with pytest.raises(ValueError, match="x holds 2 input arrays, but the model has 1"):
        tflite_export.tflm_predict(result.path, [data, data], result.arena_bytes)
    with pytest.raises(ValueError, match="x must hold numbers"):
        tflite_export.tflm_predict(result.path, np.array(["a"] * 16), result.arena_bytes)


@pytest.mark.slow
def test_tflm_predict_on_junk_and_truncated_files(exported, tmp_path):
    result, data = exported
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a model at all")
    with pytest.raises(ValueError, match="is not a .tflite model.*'TFL3'"):
        tflite_export.tflm_predict(junk, data, result.arena_bytes)
    with open(result.path, "rb") as f:
        model_bytes = f.read()
    for cut in (len(model_bytes) // 2, len(model_bytes) - 16, 12):
        with pytest.raises(ValueError, match="is not a .tflite model.*(truncated|identifier)"):
            tflite_export.tflm_predict(model_bytes[:cut], data, result.arena_bytes)
    with pytest.raises(TypeError, match="path of a .tflite file or its bytes"):
        tflite_export.tflm_predict(None, data, result.arena_bytes)


@pytest.mark.slow
def test_tflm_accuracy_with_labels_of_the_wrong_length(exported):
    result, data = exported
    with pytest.raises(ValueError,
                       match=r"y must hold one int label per sample of x \(8\).*\(7,\)"):
        tflite_export.tflm_accuracy(result.path, data, np.zeros(7, int), result.arena_bytes)
    accuracy = tflite_export.tflm_accuracy(result.path, data, np.zeros(8, int), result.arena_bytes)
    assert 0.0 <= accuracy <= 1.0
