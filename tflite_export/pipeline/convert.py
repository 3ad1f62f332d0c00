"""Converts a plain Keras model to a .tflite flatbuffer with TF's converter.

Keras 3 models go through a SavedModel (`model.export`) with a static
batch-1 signature: `from_concrete_functions` leaves Keras 3 variables as
resource reads that calibration cannot run, and a static shape lets the
converter fold the shape arithmetic (e.g. of Flatten or Conv2DTranspose)
into constants, so TFLM needs no SHAPE/PACK ops.
"""

import dataclasses
import re
import warnings

import numpy as np
import tensorflow as tf

from lutq_tf.registry import all_layers
from tflite_export.errors import ExportError
from tflite_export.pipeline import io_order
from tflite_export.pipeline import tempfiles

QUANTIZE_MODES = ("int8", "float32")

# Weight quantisation of the int8 converter. TF 2.21 quantises CONV_2D,
# DEPTHWISE_CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED weights per channel
# by default; these private converter flags switch FULLY_CONNECTED only, or
# everything, to per tensor. They are converter-wide, not per layer.
WEIGHT_QUANTIZATION = {
    "per_channel": {},
    "dense_per_tensor": {
        "_experimental_disable_per_channel_quantization_for_dense_layers": True
    },
    "per_tensor": {"_experimental_disable_per_channel": True},
}

# Calibration sees at most this many samples; more rarely moves the ranges.
_MAX_CALIBRATION_SAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: The Keras input name (signature key of the SavedModel).
        shape: The per-sample shape (no batch axis); None for unknown
            dimensions until data fixes them.
        dtype: numpy dtype of the input.
    """

    name: str
    shape: tuple
    dtype: np.dtype

    def shown(self):
        """The expected batch shape, e.g. `(N, 8, 8, 3)`."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"(N, {dims})" if dims else "(N,)"


def _keras_inputs(model):
    """The functional model's input tensors, or None (subclassed model)."""
    try:
        return list(model.inputs) if getattr(model, "inputs", None) else None
    except (AttributeError, ValueError):
        return None


def _signature_names(names):
    """Keras input names as SavedModel signature keys (identifiers, unique)."""
    ok = all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n or "") for n in names)
    if ok and len(set(names)) == len(names):
        return list(names)
    return [f"input_{i}" for i in range(len(names))]


def _as_list(data):
    """`representative_data` as a list of per-input values, or a dict."""
    if isinstance(data, dict):
        return data
    if isinstance(data, (list, tuple)):
        return list(data)
    return [data]


def input_specs(model, data=None):
    """The model's inputs, in Keras order.

    A functional or Sequential model says its inputs itself. A subclassed
    model is traced through its `call`: its input shapes come from
    `representative_data` (an array for one input, a list for several) or
    from the shape it was built with.

    Args:
        model: The plain Keras model.
        data: `representative_data` as the user gave it, or None.

    Returns:
        A list of `InputSpec`.

    Raises:
        ValueError: A subclassed model with no known input shape.
    """
    inputs = _keras_inputs(model)
    if inputs is not None:
        names = _signature_names([getattr(t, "name", "") for t in inputs])
        return [
            InputSpec(name, tuple(t.shape[1:]), np.dtype(t.dtype))
            for name, t in zip(names, inputs)
        ]
    if data is not None and not isinstance(data, dict):
        arrays = [np.asarray(a) for a in _as_list(data)]
        return [
            InputSpec(
                f"input_{i}",
                (None,) * max(a.ndim - 1, 0),
                np.dtype("float32") if a.dtype.kind == "f" else a.dtype,
            )
            for i, a in enumerate(arrays)
        ]
    built = (getattr(model, "_build_shapes_dict", None) or {}).get("input_shape")
    if built is not None:
        shapes = built if isinstance(built[0], (list, tuple)) else [built]
        if all(isinstance(s, (list, tuple)) for s in shapes):
            return [
                InputSpec(f"input_{i}", tuple(s[1:]), np.dtype("float32"))
                for i, s in enumerate(shapes)
            ]
    raise ValueError(
        f"model '{model.name}' is subclassed and its input shape is not "
        "known: pass representative_data (an array of typical inputs, or a "
        "list of arrays, one per input of call()) so the exporter can trace "
        "its call."
    )


def check_model(model):
    """Checks that the exporter can take the model.

    Args:
        model: The plain Keras model: functional, Sequential or subclassed.

    Raises:
        TypeError: Not a Keras model.
        ValueError: Not built.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model must be a keras.Model, got {type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            f"model '{model.name}' is not built: build it with keras.Input "
            "(functional or Sequential) or call it on data once (subclassed)."
        )


def check_weights(model):
    """Checks that every weight is finite, naming the first bad one.

    A NaN or infinite weight makes the converter and TFLM compute garbage,
    and compression checks would blame DECODE for it.

    Raises:
        ValueError: A weight holds NaN or infinite values.
    """
    layers = all_layers(model, include_models=False)
    for layer in layers:
        for variable in layer.weights:
            values = np.asarray(variable.numpy())
            if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                bad = int(np.sum(~np.isfinite(values)))
                weight = (getattr(variable, "path", None) or variable.name).split("/")[-1]
                raise ValueError(
                    f"layer '{layer.name}' weight '{weight}' holds {bad} NaN or "
                    f"infinite values of {values.size}; the model cannot be "
                    "exported. Retrain, or restore a checkpoint from before "
                    "the values diverged."
                )


def check_representative_data(model, data, quantize, specs=None):
    """Validates `representative_data` against the model inputs.

    Args:
        model: The Keras model.
        data: For one input, an array of shape `(N,) + input shape`; for
            several, a list or tuple of such arrays in model input order, or
            a dict by input name. Floating point for float inputs, integers
            for integer inputs (e.g. token ids of an Embedding). Or None.
        quantize: `"int8"` or `"float32"`.
        specs: The model's `InputSpec`s (default: `input_specs(model,
            data)`).

    Returns:
        A list of arrays, one per input in Keras order (float32 for float
        inputs), or None.

    Raises:
        ValueError: Missing for int8, or wrong structure, shape, dtype or
            values (the message names representative_data and the form).
    """
    specs = specs or input_specs(model, data)
    if len(specs) == 1:
        form = f"an array of shape {specs[0].shown()}"
    else:
        form = (
            f"a list of {len(specs)} arrays in model input order, or a dict by "
            "input name: "
            + ", ".join(f"{s.name}: {s.shown()} {s.dtype.name}" for s in specs)
        )
    if data is None:
        if quantize == "int8":
            raise ValueError(
                "quantize='int8' needs representative_data: typical model "
                f"inputs, {form} (a few hundred training samples), to "
                "calibrate the activation ranges. Pass it, or export with "
                "quantize='float32'."
            )
        if any(s.dtype.kind != "f" for s in specs):
            raise ValueError(
                "the model has integer inputs: pass representative_data "
                f"({form}) with valid values (e.g. token ids), so the "
                "exported model can be verified."
            )
        return None
    if isinstance(data, dict):
        names = [s.name for s in specs]
        if set(data) != set(names):
            raise ValueError(
                f"representative_data is a dict with keys {sorted(data)}, but "
                f"the model's inputs are {names}: pass {form}."
            )
        values = [data[n] for n in names]
    elif isinstance(data, (list, tuple)) and len(specs) > 1:
        values = list(data)
    elif isinstance(data, (list, tuple)) and len(data) == 1 and (
        np.ndim(data[0]) == len(specs[0].shape) + 1
    ):
        values = [data[0]]  # a list of one array, for the one input
    else:
        values = [data]
    if len(values) != len(specs):
        raise ValueError(
            f"representative_data holds {len(values)} arrays, but the model "
            f"has {len(specs)} inputs: pass {form}."
        )
    arrays = []
    for spec, value in zip(specs, values):
        where = "representative_data" + (
            f"['{spec.name}']" if len(specs) > 1 else ""
        )
        try:
            array = np.asarray(value)
        except ValueError as e:
            raise ValueError(f"{where} is not an array: {e}. Pass {form}.") from e
        if spec.dtype.kind == "f" and array.dtype.kind != "f":
            raise ValueError(
                f"{where} must be floating point like the model input, got "
                f"dtype {array.dtype}. Convert it the way the model was fed "
                "in training, e.g. data.astype('float32') / 255."
            )
        if spec.dtype.kind in "iu" and array.dtype.kind not in "iu":
            raise ValueError(
                f"{where} must hold integers like the model input "
                f"({spec.dtype.name}, e.g. token ids), got dtype {array.dtype}."
            )
        if spec.dtype.kind not in "fiu":
            raise ValueError(
                f"model input '{spec.name}' is {spec.dtype.name}; "
                "tflite_export takes float and integer inputs."
            )
        shape_ok = array.ndim == len(spec.shape) + 1 and all(
            e is None or e == a for e, a in zip(spec.shape, array.shape[1:])
        )
        if not shape_ok or array.shape[0] < 1:
            raise ValueError(
                f"{where} has shape {array.shape}, but the model takes inputs "
                f"of shape {spec.shown()}: pass a batch of at least one sample."
            )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ValueError(f"{where} holds NaN or infinite values.")
        if len(arrays) and array.shape[0] != arrays[0].shape[0]:
            raise ValueError(
                f"{where} has {array.shape[0]} samples, the first input "
                f"{arrays[0].shape[0]}: every input needs the same number."
            )
        _check_variance(array, where)
        arrays.append(
            array.astype(np.float32) if spec.dtype.kind == "f"
            else array.astype(spec.dtype)
        )
    return arrays


def _check_variance(array, where):
    """Refuses constant data; warns when all samples are the same."""
    if array.size and np.all(array == array.flat[0]):
        raise ValueError(
            f"{where} holds one value ({array.flat[0]!r}) everywhere: it "
            "calibrates nothing and verifies nothing (a model fed a "
            "constant agrees with itself on every sample). Pass typical "
            "inputs, e.g. a few hundred training samples."
        )
    if len(array) > 1 and np.all(array == array[:1]):
        warnings.warn(
            f"{where}: all {len(array)} samples are identical; calibration "
            "and verification see one input only. Pass varied typical inputs.",
            stacklevel=4,
        )


def input_shape(model, data, specs=None, index=0):
    """The static batch-1 shape of one input to convert with."""
    specs = specs or input_specs(model, data)
    shape = [1] + list(specs[index].shape)
    for i, dim in enumerate(shape[1:], start=1):
        if dim is None:
            if data is None:
                raise ValueError(
                    f"model input '{specs[index].name}' has an unknown "
                    f"dimension {i}; pass representative_data so the exporter "
                    "knows its size (TFLM needs static shapes)."
                )
            arrays = _as_list(data)
            array = arrays[specs[index].name] if isinstance(arrays, dict) \
                else arrays[index]
            shape[i] = int(np.shape(array)[i])
    return tuple(shape)


def _conversion_error(e):
    """Turns a converter failure into a short message naming the ops."""
    text = str(e)
    keep = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"error:|TF Select ops|not supported", line)
    ]
    detail = "\n  ".join(keep[:8]) if keep else text[-1500:]
    return ExportError(
        "TF's TFLite converter cannot convert this model to builtin TFLite "
        "ops (TFLM runs builtin ops only; TF Select/Flex ops are not "
        "available on microcontrollers). Replace or remove the layers using "
        f"these ops:\n  {detail}"
    )


def convert(model, quantize, data, io_dtype=None, weight_quantization="per_channel"):
    """Converts a plain Keras model to a .tflite flatbuffer.

    The file's inputs and outputs are in the Keras model's order (the
    converter orders them by signature name; they are put back).

    Args:
        model: Plain Keras model (functional, Sequential or subclassed).
        quantize: `"int8"` (full integer) or `"float32"`.
        data: Representative inputs (required for int8): a list of arrays,
            one per input in Keras order, as `check_representative_data`
            returns; or one array for a one-input model. None for float32.
        io_dtype: For int8, `"int8"` (default) or `"float32"` model input and
            output. Ignored for float32. Integer inputs stay integers.
        weight_quantization: For int8, a key of `WEIGHT_QUANTIZATION`.

    Returns:
        The flatbuffer, as bytes.

    Raises:
        ExportError: The converter failed.
    """
    if data is not None and not isinstance(data, (list, tuple)):
        data = [np.asarray(data)]
    specs = input_specs(model, data)
    signature = [
        tf.TensorSpec(
            input_shape(model, data, specs, i), tf.as_dtype(spec.dtype.name),
            name=spec.name if len(specs) > 1 else None,
        )
        for i, spec in enumerate(specs)
    ]
    # One input: the call takes a tensor; several: a list of tensors.
    signature = signature if len(specs) == 1 else [signature]
    with tempfiles.temp_dir("saved") as saved:
        try:
            model.export(
                saved, format="tf_saved_model", verbose=False,
                input_signature=signature,
            )
        except Exception as e:
            raise ExportError(
                f"Keras could not export the model as a SavedModel: {e}"
            ) from e
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if quantize == "int8":
            count = min(len(data[0]), _MAX_CALIBRATION_SAMPLES)

            def representative_dataset():
                for i in range(count):
                    if len(specs) == 1:
                        yield [data[0][i : i + 1]]
                    else:
                        # By signature name: the converter's input order
                        # is not Keras'.
                        yield {s.name: a[i : i + 1] for s, a in zip(specs, data)}

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io = tf.int8 if (io_dtype or "int8") == "int8" else tf.float32
            converter.inference_input_type = io
            converter.inference_output_type = io
            for flag, value in WEIGHT_QUANTIZATION[weight_quantization].items():
                setattr(converter, flag, value)
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            converted = bytes(converter.convert())
        except Exception as e:
            raise _conversion_error(e) from e
    return io_order.keras_order(converted, [s.name for s in specs])
