"""Runs an exported .tflite classifier on TFLite Micro over a whole test set.

`export` verifies a model on at most a hundred inputs; to measure the
exported model's accuracy on a whole test set, use these. They reuse the
exporter's own TFLM runner
(`tflite_export.verify.run_tflm`, one sample at a time on TFLM's Python
interpreter, with the same input quantisation), so what is measured here is
what `export` verified.

    result = tflite_export.export(model, "m.tflite", representative_data=x)
    acc = tflm_accuracy("m.tflite", x_test, y_test, result.arena_bytes)
"""

import os

import numpy as np

from tflite_export import verify as _verify  # the exporter's runner

# Head-room over the measured minimum arena (the exporter's verification
# uses the same kind of margin): the bisection's minimum is exact for the
# zero input it was probed with.
ARENA_MARGIN = 4096


def _model_bytes(model):
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .tflite file at {path!r}.")
    with open(path, "rb") as f:
        return f.read()


def tflm_predict(model, x, arena_bytes, batch=1000):
    """Outputs of a one-input, one-output .tflite model run on TFLM.

    Args:
        model: path of a .tflite file, or its bytes.
        x: float32 inputs `(N,) + input shape`, scaled as in training
            (int8 models quantise them with the input tensor's scale).
        arena_bytes: the model's arena (`ExportResult.arena_bytes`);
            `ARENA_MARGIN` is added.
        batch: inputs per interpreter (a fresh interpreter per chunk keeps
            memory flat; TFLM itself runs one sample at a time).

    Returns:
        float64 array `(N,) + output shape` (without the export's batch
        axis of 1), dequantised.
    """
    data = _model_bytes(model)
    x = np.asarray(x, dtype=np.float32)
    outputs = []
    for start in range(0, len(x), batch):
        _, real, _ = _verify.run_tflm(
            data, x[start:start + batch], int(arena_bytes) + ARENA_MARGIN
        )
        outputs.append(real)
    outputs = np.concatenate(outputs)
    # Exports have batch 1: drop that axis from each sample's output.
    if outputs.ndim > 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    return outputs


def tflm_accuracy(model, x, y, arena_bytes):
    """Top-1 accuracy of a .tflite classifier on TFLM.

    Args:
        model: path of a .tflite file, or its bytes.
        x: float32 inputs `(N,) + input shape`.
        y: int labels `(N,)`.
        arena_bytes: the model's arena (`ExportResult.arena_bytes`).

    Returns:
        Accuracy as a float in [0, 1].
    """
    scores = tflm_predict(model, x, arena_bytes)
    predicted = np.argmax(scores.reshape(len(x), -1), axis=-1)
    return float(np.mean(predicted == np.asarray(y).reshape(-1)))
