"""The gate to the optional `tflite-micro` package.

`tflite-micro` ships nightly builds only, so it is an install extra rather
than a hard dependency. Every module that uses it (`compress`,
`shared_tables`, `int4`, `verify`, `latency`) calls `require()` first, so
a missing package gives this one message (`arena`'s child-process scripts
import it themselves).
"""

INSTALL_HINT = (
    "tflite_export needs the tflite-micro package (TFLM's compression tool and "
    "Python interpreter). Install it with: pip install lutq-tf[export]"
)


def require():
    """Imports tflite-micro.

    Returns:
        A `(compression, runtime, spec)` tuple: the compression module (with
        `compress` and `SpecBuilder`), the TFLM runtime module (with
        `Interpreter`) and the compression spec module (with `PerTensor`,
        `PerChannel`).

    Raises:
        ImportError: tflite-micro is not installed; the message names the
            install extra.
    """
    try:
        from tflite_micro import compression
        from tflite_micro import runtime
        from tflite_micro.tensorflow.lite.micro.compression import spec
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return compression, runtime, spec


def align(model_bytes):
    """Repacks a flatbuffer with the alignment TFLM expects.

    Python's flatbuffers ignores the schema's `force_align` on buffer data;
    TFLM's own C++ tool (the one its compressor uses) applies it.

    Args:
        model_bytes: A .tflite flatbuffer.

    Returns:
        The aligned flatbuffer, as bytes.
    """
    import os

    from tflite_export.pipeline import tempfiles

    require()
    from tflite_micro.tensorflow.lite.micro.tools import tflite_flatbuffer_align_wrapper as wrapper

    with tempfiles.temp_dir("align") as folder:
        source = os.path.join(folder, "in.tflite")
        target = os.path.join(folder, "out.tflite")
        with open(source, "wb") as f:
            f.write(bytes(model_bytes))
        wrapper.align_tflite_model(source, target)
        with open(target, "rb") as f:
            return f.read()
