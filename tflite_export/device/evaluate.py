"""Runs an exported .tflite classifier on TFLite Micro over a whole test set.

`export` verifies a model on at most a hundred inputs; to measure the
exported model's accuracy on a whole test set, use these. They reuse the
exporter's own TFLM runner
(`tflite_export.pipeline.verify.run_tflm`, one sample at a time on TFLM's Python
interpreter, with the same input quantisation), so what is measured here is
what `export` verified.

    result = tflite_export.export(model, "m.tflite", representative_data=x)
    acc = tflm_accuracy("m.tflite", x_test, y_test, result.arena_bytes)
"""

import os

import numpy as np

from tflite_export.pipeline import verify as _verify  # the exporter's runner
from tflite_export.pipeline.arena import MARGIN as ARENA_MARGIN


def _model_bytes(model):
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        where = "model (bytes)"
    else:
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                "model must be the path of a .tflite file or its bytes, got "
                f"{type(model).__name__}."
            )
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no .tflite file at {path!r}.")
        with open(path, "rb") as f:
            data = f.read()
        where = f"model {path!r}"
    _check_tflite(data, where)
    return data


def _check_tflite(data, where):
    """Refuses bytes that are not a whole .tflite flatbuffer.

    TFLM trusts the file: junk or a truncated file gives confusing errors
    (or reads past the end). Every table and vector the interpreter reads
    must lie inside the bytes.
    """
    bad = ValueError(
        f"{where} is not a .tflite model: expected a TFLite flatbuffer "
        f"(file identifier 'TFL3' at byte 4), e.g. the file `export` wrote; "
        f"got {len(data)} bytes"
    )
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(str(bad) + " without that identifier.")
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
        subgraph = model.subgraphs[0]
        count = len(subgraph.tensors)
        for index in list(subgraph.inputs) + list(subgraph.outputs):
            if not 0 <= index < count:
                raise IndexError(index)
        for buffer in model.buffers or []:
            if buffer.offset and buffer.offset + buffer.size > len(data):
                raise IndexError("buffer past the end")
    except Exception as e:  # struct.error, IndexError, TypeError, ...
        raise ValueError(
            str(bad) + f" that do not parse ({type(e).__name__}): truncated "
            "or damaged? Export it again."
        ) from None


def tflm_predict(model: str | os.PathLike | bytes, x, arena_bytes: int,
                 batch: int = 1000) -> np.ndarray | list[np.ndarray]:
    """Outputs of a .tflite model run on TFLM.

    Args:
        model: path of a .tflite file, or its bytes.
        x: inputs `(N,) + input shape`, scaled as in training (int8 models
            quantise them with the input tensor's scale); float32 for float
            inputs, integers for integer inputs. For a model of several
            inputs, a list of such arrays in model input order (the Keras
            model's order: `export` writes the file so).
        arena_bytes: the model's arena (`ExportResult.arena_bytes`);
            `ARENA_MARGIN` is added.
        batch: inputs per interpreter (a fresh interpreter per chunk keeps
            memory flat; TFLM itself runs one sample at a time).

    Returns:
        float64 array `(N,) + output shape` (without the export's batch
        axis of 1), dequantised; for a model of several outputs, a list of
        such arrays in model output order.

    Raises:
        ValueError: x does not fit the model's inputs, or the file is not a
            .tflite model (the message says what was expected).
    """
    data = _model_bytes(model)
    inputs = _inputs(x)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}.")
    count = len(inputs[0])
    if count == 0:
        raise ValueError("x holds no samples: pass at least one input.")
    outputs = None
    for start in range(0, count, batch):
        _, real, _ = _verify.run_tflm_all(
            data, [a[start:start + batch] for a in inputs],
            int(arena_bytes) + ARENA_MARGIN,
        )
        outputs = [[r] for r in real] if outputs is None else [
            o + [r] for o, r in zip(outputs, real)
        ]
    result = []
    for chunks in outputs:
        output = np.concatenate(chunks)
        # Exports have batch 1: drop that axis from each sample's output.
        if output.ndim > 2 and output.shape[1] == 1:
            output = output[:, 0]
        result.append(output)
    return result[0] if len(result) == 1 else result


def _inputs(x):
    """`x` as a list of arrays (one per model input), numbers only."""
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    result = []
    for i, a in enumerate(arrays):
        try:
            array = np.asarray(a)
        except ValueError as e:
            raise ValueError(f"x[{i}] is not an array: {e}") from e
        if array.dtype.kind not in "fiub":
            raise ValueError(
                f"x{'' if len(arrays) == 1 else f'[{i}]'} must hold numbers "
                f"(float32 inputs, or integers for integer inputs), got dtype "
                f"{array.dtype}."
            )
        result.append(array.astype(np.float32) if array.dtype.kind in "fb" else array)
    if any(len(a) != len(result[0]) for a in result):
        raise ValueError(
            "every input array of x needs the same number of samples, got "
            f"{[len(a) for a in result]}."
        )
    return result


def tflm_accuracy(model: str | os.PathLike | bytes, x, y, arena_bytes: int,
                  output: int = 0) -> float:
    """Top-1 accuracy of a .tflite classifier on TFLM.

    Args:
        model: path of a .tflite file, or its bytes.
        x: inputs `(N,) + input shape` (a list of arrays, one per input, for
            a model of several inputs).
        y: int labels `(N,)`.
        arena_bytes: the model's arena (`ExportResult.arena_bytes`).
        output: which output holds the class scores, for a model of several
            outputs.

    Returns:
        Accuracy as a float in [0, 1].

    Raises:
        ValueError: y does not hold one int label per sample of x.
    """
    labels = np.asarray(y)
    count = len(_inputs(x)[0])
    integral = labels.dtype.kind in "iu" or (
        labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)
    )
    if not integral or labels.size != count:
        raise ValueError(
            f"y must hold one int label per sample of x ({count}), got "
            f"shape {labels.shape} dtype {labels.dtype}."
        )
    scores = tflm_predict(model, x, arena_bytes)
    if isinstance(scores, list):
        if not 0 <= output < len(scores):
            raise ValueError(
                f"output must be in [0, {len(scores)}) for this model, got {output}."
            )
        scores = scores[output]
    predicted = np.argmax(scores.reshape(count, -1), axis=-1)
    return float(np.mean(predicted == labels.reshape(-1)))
