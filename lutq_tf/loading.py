"""`load_model`: Keras 3 `.keras` files and tf.keras 2.x `.h5` files.

Keras 3 reads legacy HDF5 models, but refuses layer configs that carry keys
tf.keras 2.x wrote and Keras 3 dropped (`groups` on DepthwiseConv2D, which
every tf.keras 2.x depthwise layer has). `load_model` first lets Keras load
the file; when Keras refuses the config, it drops the known tf.keras 2.x keys
whose values have no effect, in an in-memory copy of the file, and lets
Keras' legacy HDF5 loader build the model and set the weights from it. The
user's file is only read.

LUT-Q models saved as `.h5` load with `keras.models.load_model` too, once
`lutq_tf` is imported (`_register_hdf5_names`).
"""

import copy
import io
import json
import os
import re
import zipfile

import h5py
import keras
from keras.src.legacy.saving import legacy_h5_format  # no public alias
from keras.src.legacy.saving import saving_options
from keras.src.legacy.saving import saving_utils
from keras.src.saving import serialization_lib

from lutq_tf import registry
from lutq_tf.model import LUTQModel
from lutq_tf.model import LUTQSequential

_DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
_GROUPS_ONE = (
    "SeparableConv1D", "SeparableConv2D",
    "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
)
_RNNS = (
    "RNN", "SimpleRNN", "GRU", "LSTM",
    "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D",
)
_ATTENTION = ("Attention", "AdditiveAttention")
_MODELS = ("Functional", "Model", "Sequential")


def _any_value(value):
    """Any value of the key is a no-op."""
    return True


# The tf.keras 2.x config keys Keras 3 layer constructors refuse, by class:
# key -> the values that make the key a no-op, so dropping it keeps the model.
# Depthwise `groups` (1 or the channel count) is checked after the build.
_KNOWN_KEYS = {
    **{cls: {"groups": _any_value} for cls in _DEPTHWISE},
    # tf.keras' Conv base class wrote groups=1 for these.
    **{cls: {"groups": lambda v: v == 1} for cls in _GROUPS_ONE},
    # A kernel choice; the same maths.
    "BatchNormalization": {
        "fused": _any_value,
        "virtual_batch_size": lambda v: v is None,
    },
    **{cls: {"time_major": lambda v: v is False} for cls in _RNNS},
    # Build shapes; Keras 3 takes them from the call.
    "MultiHeadAttention": {
        "query_shape": _any_value,
        "key_shape": _any_value,
        "value_shape": _any_value,
    },
    # Keras 3 has `use_causal_mask` in call() instead.
    **{cls: {"causal": lambda v: v is False} for cls in _ATTENTION},
}

_UNKNOWN_CLASS_HINT = {
    "TFOpLambda": "a TF function called on a Keras tensor in tf.keras 2.x",
    "SlicingOpLambda": "tensor slicing on a Keras tensor in tf.keras 2.x",
}

_WHAT_TO_DO = (
    "Build the model in Keras 3 code and load the file's weights with "
    "model.load_weights({path!r}), or re-save it from tf.keras 2.x without "
    "these settings."
)


def _register_hdf5_names():
    """Lets Keras' HDF5 loader find the LUT-Q model classes.

    Keras' HDF5 writer names the outer model by its bare class name
    ("LUTQModel"), while the registry knows it as "lutq_tf>LUTQModel" (its
    layers are written with that name): without these aliases a LUT-Q model
    saved as `.h5` fails to load with "Unknown layer: 'LUTQModel'".
    """
    custom_objects = keras.saving.get_custom_objects()
    for cls in (LUTQModel, LUTQSequential):
        custom_objects.setdefault(cls.__name__, cls)


_register_hdf5_names()


def load_model(path: str | os.PathLike, compile: bool = False) -> keras.Model:
    """Loads a Keras 3 `.keras` file or a (tf.keras 2.x) HDF5 model file.

    Custom layers must be registered (`register_keras_serializable`) or in
    a `keras.saving.custom_object_scope`, as for `keras.models.load_model`.

    Args:
        path: a `.keras` file (or Keras 3 model directory), or an HDF5 model
            file (`.h5`, `.hdf5`) saved by tf.keras 2.x or Keras 3.
        compile: whether to compile the model with the file's training
            config (as `keras.models.load_model`).

    Returns:
        A Keras 3 model of standard Keras layers, with the file's weights.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a model file, or a layer's config cannot
            be read by Keras 3 (the message names the layer and the key).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    if os.path.isfile(path) and h5py.is_hdf5(path):
        return _load_hdf5(path, compile)
    if os.path.isdir(path) or zipfile.is_zipfile(path):
        try:
            return keras.saving.load_model(path, compile=compile)
        except (KeyError, zipfile.BadZipFile, EOFError) as e:
            # Keras reads a zip without config.json as a missing key.
            raise ValueError(
                f"{path} is not a Keras model file (a zip archive, but {e}): "
                "expected a .keras file written by model.save()."
            ) from e
    raise ValueError(
        f"{path} is not a Keras model file: expected a .keras file (a zip) "
        "or an HDF5 model file (.h5)."
    )


def _load_hdf5(path, compile):
    """Keras' legacy HDF5 loader, retried with the known keys dropped."""
    try:
        with h5py.File(path, "r") as f:
            raw_config = f.attrs.get("model_config")
    except OSError as e:
        raise ValueError(f"cannot read the HDF5 file {path}: {e}") from e
    if raw_config is None:
        raise ValueError(
            f"{path} holds no model config (a weights-only file?): build the "
            "model in code and call model.load_weights(path)."
        )
    try:
        return legacy_h5_format.load_model_from_hdf5(path, compile=compile)
    except (TypeError, ValueError, AttributeError, KeyError) as keras_error:
        if isinstance(raw_config, bytes):
            raw_config = raw_config.decode("utf-8")
        config = json.loads(raw_config)
        dropped = fix_legacy_config(config, path)
        if not dropped:
            raise _diagnose(config, path, keras_error) from keras_error
    try:
        model = _load_hdf5_with_config(path, config, compile)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise _diagnose(config, path, e) from e
    _check_depthwise_groups(model, dropped, path)
    return model


def fix_legacy_config(config, path="<config>"):
    """Drops the known no-op tf.keras 2.x keys from a model config, in place.

    Also turns tf.keras 2.x `Policy` dtype configs into their names.

    Args:
        config: the decoded JSON `model_config` of an HDF5 file.
        path: the file, for error messages.

    Returns:
        A list of `(layer name, class name, key, value)` for each dropped key.

    Raises:
        ValueError: a known key holds a value that changes the model.
    """
    dropped = []
    for obj in _object_configs(config):
        cls, cfg = obj["class_name"], obj["config"]
        # tf.keras 2.x mixed precision: {"class_name": "Policy", ...}.
        dtype = cfg.get("dtype")
        if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":
            cfg["dtype"] = dtype["config"]["name"]
        for key, is_noop in _KNOWN_KEYS.get(cls, {}).items():
            if key not in cfg:
                continue
            if not is_noop(cfg[key]):
                raise ValueError(
                    f"{path}: layer {_name(obj)!r} ({cls}): config key "
                    f"{key!r} = {cfg[key]!r} changes the layer and Keras 3 "
                    "has no such setting. " + _WHAT_TO_DO.format(path=path)
                )
            dropped.append((_name(obj), cls, key, cfg.pop(key)))
    return dropped


def _object_configs(config):
    """Every `{"class_name", "config"}` dict in a config, nested ones too."""
    if isinstance(config, dict):
        if isinstance(config.get("config"), dict) and "class_name" in config:
            yield config
        for value in config.values():
            yield from _object_configs(value)
    elif isinstance(config, list):
        for value in config:
            yield from _object_configs(value)


def _name(obj):
    """The layer name of a `{"class_name", "config"}` dict."""
    return obj["config"].get("name", obj.get("name"))


def _load_hdf5_with_config(path, config, compile):
    """Keras' legacy HDF5 loader on an in-memory copy with `config`."""
    with open(path, "rb") as f:
        buffer = io.BytesIO(f.read())
    # The copy lives in `buffer` only: nothing is written to disk.
    with h5py.File(buffer, "r+") as f:
        f.attrs["model_config"] = json.dumps(config).encode("utf-8")
        return legacy_h5_format.load_model_from_hdf5(f, compile=compile)


def _check_depthwise_groups(model, dropped, path):
    """Checks that depthwise `groups` were 1 or the channel count."""
    groups = {name: v for name, cls, key, v in dropped if key == "groups"}
    for layer in registry.all_layers(model):
        if layer.name not in groups or type(layer).__name__ not in _DEPTHWISE:
            continue
        channels, value = layer.kernel.shape[-2], groups[layer.name]
        if value not in (1, channels):
            raise ValueError(
                f"{path}: layer {layer.name!r} ({type(layer).__name__}): "
                f"config key 'groups' = {value!r} is neither 1 nor the "
                f"channel count {channels}; Keras 3 has no such setting. "
                + _WHAT_TO_DO.format(path=path)
            )


def _diagnose(config, path, error):
    """A ValueError naming each layer Keras 3 cannot build, and why."""
    problems = []
    for obj in _layer_configs(config):
        try:
            _build_layer(copy.deepcopy(obj))
        except Exception as e:  # noqa: BLE001 (Keras raises many types)
            problems.append(_describe(obj, e))
    if not problems:
        return ValueError(f"Keras 3 cannot load {path}: {error}")
    return ValueError(
        f"Keras 3 cannot load {path}:\n  "
        + "\n  ".join(problems)
        + "\n"
        + _WHAT_TO_DO.format(path=path)
    )


def _layer_configs(config):
    """The layer configs of a model config, inside nested models too."""
    if config.get("class_name") in _MODELS:
        layers = config["config"]
        # Old Sequential configs are a bare list of layers.
        layers = layers if isinstance(layers, list) else layers["layers"]
        for layer in layers:
            yield from _layer_configs(layer)
    else:
        yield config


def _build_layer(obj):
    """Deserialises one layer config as Keras' HDF5 loader does."""
    with saving_options.keras_option_scope(use_legacy_config=True):
        if "module" in obj:
            return serialization_lib.deserialize_keras_object(obj)
        return saving_utils.model_from_config(obj)


def _describe(obj, error):
    """One line on why Keras 3 cannot build the layer config `obj`."""
    cls, message = obj["class_name"], str(error)
    where = f"layer {_name(obj)!r} ({cls})"
    match = re.search(r"Unrecognized keyword arguments passed to (.*)", message)
    if match:
        keys = [k for k in obj["config"] if f"'{k}':" in match.group(1)]
        if keys:
            names = ", ".join(repr(k) for k in keys)
            plural = len(keys) > 1
            return (
                f"{where}: config key{'s' if plural else ''} {names} "
                f"{'are' if plural else 'is'} not known to Keras 3."
            )
    if f"Unknown layer: '{cls}'" in message:
        hint = _UNKNOWN_CLASS_HINT.get(cls)
        return f"{where}: class not known to Keras 3" + (
            f" ({hint})." if hint else "."
        )
    last_line = message.splitlines()[-1] if message else type(error).__name__
    return f"{where}: {last_line}"
