"""tflite_export.tflm_predict / tflm_accuracy on a whole test set."""

import keras
import numpy as np
import pytest

import lutq_tf
import tflite_export


@pytest.mark.slow
def test_tflm_accuracy_matches_the_exported_models_own_predictions(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(
        16, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    quantized = lutq_tf.quantize_model(model, bits=2)
    result = tflite_export.export(quantized, str(tmp_path / "m.tflite"),
                                  representative_data=x)
    scores = tflite_export.tflm_predict(result.path, x, result.arena_bytes,
                                        batch=16)  # several interpreters
    assert scores.shape == (40, 2)
    keras_scores = quantized.predict(x, verbose=0)
    # int8 outputs dequantised: close to Keras, same top-1 almost always.
    assert np.abs(scores - keras_scores).max() < 0.05
    accuracy = tflite_export.tflm_accuracy(result.path, x, y,
                                           result.arena_bytes)
    assert accuracy == np.mean(np.argmax(scores, axis=1) == y)
    with pytest.raises(FileNotFoundError, match="no .tflite file"):
        tflite_export.tflm_predict(str(tmp_path / "missing.tflite"), x, 1)
