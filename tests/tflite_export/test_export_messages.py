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


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="float32", weight_quantization="per_channel"),
     r"weight_quantization='per_channel' applies to int8 weights only.*Drop "
     "weight_quantization"),
    # Given explicitly, the default value too: only leaving it unset is quiet.
    (dict(quantize="float32", weight_quantization="auto"),
     "weight_quantization='auto' applies to int8"),
    (dict(quantize="float32", shared_tables=True),
     "shared_tables=True applies to int8 per-channel weights only"),
    (dict(weight_quantization="per_tensor", shared_tables=False),
     "shared_tables=False applies to per-channel weights only"),
    (dict(verify=False, min_agreement=0.9),
     r"min_agreement=0.9 set how the export is verified, but verify=False"),
    (dict(verify=False, max_verify_samples=100),
     r"max_verify_samples=100 set how the export is verified, but verify=False"),
    (dict(verify=False, min_agreement=0.5, max_verify_samples=10),
     "min_agreement=0.5 and max_verify_samples=10"),
    (dict(verify=False, shared_tables="auto"),
     r"shared_tables='auto' keeps shared tables only if .*verify=False"),
    (dict(max_decode_bytes=1024, ram_bytes=65536),
     "give max_decode_bytes or ram_bytes, not both"),
    (dict(quantize="float32", target="cortex-m4-ref"),
     r"target='cortex-m4-ref' judges an int8 export.*quantize='float32'"),
    (dict(decode="always"), r"decode='always' chooses by firmware flash on a target"),
    # The explicit default too: without a target it would change nothing.
    (dict(decode="auto"), "decode='auto' chooses .* but no target is given"),
])
def test_options_the_export_would_ignore_are_refused(tmp_path, kwargs, message):
    model, data = _tiny()
    with pytest.raises(ValueError, match=message):
        tflite_export.export(model, tmp_path / "m.tflite", data, **kwargs)
    assert os.listdir(tmp_path) == []


def test_min_agreement_without_an_output_of_classes_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1, name="score")])
    data = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    with pytest.raises(ValueError, match=r"min_agreement=0.9 bounds top-1.*no output"):
        tflite_export.export(model, tmp_path / "m.tflite", data, min_agreement=0.9)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_min_agreement_of_a_subclassed_model_without_classes_writes_nothing(tmp_path):
    # Its output shape is known only once verification has run.
    class Score(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras.layers.Dense(1, name="fc")

        def call(self, x):
            return self.fc(x)

    data = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    model = Score()
    model(data[:1])
    with pytest.raises(ValueError, match=r"min_agreement=0.5 bounds top-1.*no output"):
        tflite_export.export(model, tmp_path / "m.tflite", data, quantize="float32",
                             min_agreement=0.5)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_unset_options_are_never_refused_and_random_inputs_honour_the_limit(tmp_path):
    model, data = _tiny()
    result = tflite_export.export(model, tmp_path / "a.tflite", quantize="float32",
                                  verify=False)
    assert result.verification is None and result.weight_quantization == "float"
    # Without representative data a float32 export verifies on random
    # inputs: at most max_verify_samples of them.
    result = tflite_export.export(model, tmp_path / "b.tflite", quantize="float32",
                                  max_verify_samples=2)
    assert result.verification.samples == 2


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "float32", "--weight_quantization", "per_channel"],
     "weight_quantization='per_channel' applies to int8 weights only"),
    (["--quantize", "float32", "--shared_tables", "false"],
     "shared_tables=False applies to int8 per-channel weights only"),
    (["--noverify", "--min_agreement", "0.5"],
     "min_agreement=0.5 set how the export is verified, but verify=False"),
    (["--noverify", "--shared_tables", "auto"], "shared_tables='auto' keeps"),
    (["--max_decode_bytes", "1024", "--ram_bytes", "65536"],
     "give max_decode_bytes or ram_bytes, not both"),
    (["--decode", "always"], "decode='always' chooses by firmware flash on a target"),
    (["--target", "cortex-m4-ref", "--quantize", "float32"],
     "target='cortex-m4-ref' judges an int8 export"),
    (["--target", "cortex-m7"], "--target 'cortex-m7' is neither a profile"),
    (["--target", "board.json"], "--target board.json: no such file"),
])
def test_cli_refuses_the_same_combinations_before_loading(tmp_path, flags, message):
    from test_export_cli import run_cli

    # Not even a model: the flags are refused before it is loaded.
    (tmp_path / "model.keras").write_bytes(b"not read")
    proc = run_cli("model.keras", "--out", "m.tflite", *flags, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"error: {message}" in proc.stderr.replace("\n", " ")
    assert os.listdir(tmp_path) == ["model.keras"]


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
