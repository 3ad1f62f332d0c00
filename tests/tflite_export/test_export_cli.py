"""Tests of the export command line and of the C array for firmware.

One test runs `python -m tflite_export` in a fresh process (the entry
point); the others call its `main` in this process (`run_cli`), which
spares each a TensorFlow import of several seconds.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import types

import keras
import numpy as np
import paths
import pytest
from test_loading import save_tf_keras_style_h5
from test_loading import small_model

import tflite_export

ROOT = paths.REPO


def _lut_model(seed=0):
    """A stripped LUT-Q model: Dense kernels with 4 values per tensor."""
    rng = np.random.default_rng(seed)
    inp = keras.Input((64,))
    x = keras.layers.Dense(64, activation="relu", name="fc")(inp)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(x))
    for layer in model.layers[1:]:
        d = np.linspace(-0.5, 0.5, 4).astype(np.float32)
        layer.kernel.assign(d[rng.integers(0, 4, layer.kernel.shape)])
    return model, rng.normal(size=(16, 64)).astype(np.float32)


def _run_cli(*args, cwd):
    """`python -m tflite_export ARGS` in a fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "tflite_export", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )


def run_cli(*args, cwd):
    """`python -m tflite_export ARGS` in this process, as `app.run` runs it:
    the flags parsed, then `main`; a flag or usage error prints its message
    and exits with 1. Returns, like `subprocess.run`, the exit code and the
    printed stdout and stderr."""
    from absl import app
    from absl import flags
    from absl.testing import flagsaver

    from tflite_export import __main__ as cli

    stdout, stderr = io.StringIO(), io.StringIO()
    was_parsed = flags.FLAGS.is_parsed()
    here = os.getcwd()
    try:
        os.chdir(cwd)
        with flagsaver.flagsaver(), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(flags.FLAGS(["tflite_export", *map(str, args)]))
            except (flags.Error, app.UsageError) as error:
                print(f"FATAL {error}", file=sys.stderr)
                code = 1
    finally:
        os.chdir(here)
        if not was_parsed:
            flags.FLAGS.unparse_flags()
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue())


@pytest.mark.slow
def test_cli_exports_and_prints_the_report(tmp_path):
    model, data = _lut_model()
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "data.npy", data)
    # The entry point, in its own process.
    proc = _run_cli(
        "model.keras", "--out", "model.tflite", "--quantize", "int8",
        "--representative", "data.npy", "--c_array", "model_data.cc",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = os.path.getsize(tmp_path / "model.tflite")
    assert f"size {size} bytes" in proc.stdout
    for needle in ("fc", "FULLY_CONNECTED", "per-tensor", "bit-exact"):
        assert needle in proc.stdout
    assert (tmp_path / "model_data.cc").exists() and (tmp_path / "model_data.h").exists()
    # --noslim keeps what TFLM does not read: a larger file.
    proc = run_cli(
        "model.keras", "--out", "full.tflite", "--representative", "data.npy",
        "--noslim", "--shared_tables", "false", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.getsize(tmp_path / "full.tflite") > size


@pytest.mark.slow
def test_cli_exports_a_tf_keras_2_h5(tmp_path):
    model, data = small_model()
    # DepthwiseConv2D with tf.keras 2.x's `groups` key, which Keras 3 refuses.
    save_tf_keras_style_h5(model, tmp_path / "model.h5", groups=1)
    np.save(tmp_path / "data.npy", data)
    proc = run_cli(
        "model.h5", "--quantize", "int8", "--representative", "data.npy",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = os.path.getsize(tmp_path / "model.tflite")
    assert f"size {size} bytes" in proc.stdout and "bit-exact" in proc.stdout


@pytest.mark.slow
def test_cli_reports_an_unreadable_h5_and_writes_nothing(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"not an HDF5 file")
    proc = run_cli("model.h5", "--out", "model.tflite", cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: model.h5 is not a Keras model file" in proc.stderr
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.slow
def test_cli_reports_bad_input_and_writes_nothing(tmp_path):
    model, _ = _lut_model()
    model.save(tmp_path / "model.keras")
    proc = run_cli("model.keras", "--out", "model.tflite", cwd=tmp_path)
    assert proc.returncode == 1
    assert "needs representative_data" in proc.stderr
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_c_array_compiles_and_holds_the_model_bytes(tmp_path):
    model, data = _lut_model()
    result = tflite_export.export(
        model, tmp_path / "model.tflite", representative_data=data,
        c_array=tmp_path / "model_data.cc",
    )
    assert result.c_array == (str(tmp_path / "model_data.cc"), str(tmp_path / "model_data.h"))
    main = tmp_path / "main.cc"
    main.write_text(
        '#include <cstdint>\n#include <cstdio>\n#include "model_data.h"\n'
        "int main(int argc, char** argv) {\n"
        "  if (reinterpret_cast<std::uintptr_t>(model_data) % 16 != 0) return 2;\n"
        # The header's length and CRC-32 describe the linked array.
        "  if (model_data_len != model_data_expected_len) return 3;\n"
        "  unsigned long crc = 0xFFFFFFFFul;\n"
        "  for (unsigned int i = 0; i < model_data_len; ++i) {\n"
        "    crc ^= model_data[i];\n"
        "    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320ul & (0ul - (crc & 1ul)));\n"
        "  }\n"
        "  if ((crc ^ 0xFFFFFFFFul) != model_data_crc32) return 4;\n"
        '  FILE* f = std::fopen(argv[1], "wb");\n'
        "  std::fwrite(model_data, 1, model_data_len, f);\n"
        "  return std::fclose(f);\n}\n"
    )
    binary = tmp_path / "dump"
    subprocess.run(
        ["g++", "-std=c++17", "-Wall", "-Werror", "-o", str(binary),
         str(main), str(tmp_path / "model_data.cc")],
        check=True, cwd=tmp_path,
    )
    subprocess.run([str(binary), str(tmp_path / "dumped.bin")], check=True)
    with open(tmp_path / "dumped.bin", "rb") as f, open(result.path, "rb") as g:
        assert f.read() == g.read()
    assert tflite_export.c_array_matches(result.path, tmp_path / "model_data.h")


def _two_input_model(seed=0):
    rng = np.random.default_rng(seed)
    a = keras.Input((8,), name="zeta")
    b = keras.Input((8,), name="alpha")
    x = keras.layers.Concatenate()([keras.layers.Dense(16, name="fa")(a),
                                    keras.layers.Dense(16, name="fb")(b)])
    model = keras.Model([a, b], [keras.layers.Dense(3, name="o1")(x),
                                 keras.layers.Dense(2, name="o2")(x)])
    data = [rng.normal(size=(16, 8)).astype("float32"),
            5.0 + rng.normal(size=(16, 8)).astype("float32")]
    return model, data


@pytest.mark.slow
def test_cli_takes_an_npz_with_one_array_per_input(tmp_path):
    model, data = _two_input_model()
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "named.npz", alpha=data[1], zeta=data[0])
    np.savez(tmp_path / "ordered.npz", *data)
    proc = run_cli("model.keras", "--out", "a.tflite", "--representative",
                    "named.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "output_1:" in proc.stdout and "bit-exact" in proc.stdout
    # In input order, the same arrays.
    from tflite_export.__main__ import load_representative

    ordered = load_representative(str(tmp_path / "ordered.npz"), model)
    named = load_representative(str(tmp_path / "named.npz"), model)
    assert isinstance(ordered, list) and set(named) == {"zeta", "alpha"}
    assert np.array_equal(ordered[0], named["zeta"])
    assert np.array_equal(ordered[1], named["alpha"])
    np.savez(tmp_path / "wrong.npz", a=data[0], b=data[1])
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\].*\['zeta', 'alpha'\]"):
        load_representative(str(tmp_path / "wrong.npz"), model)


@pytest.mark.slow
def test_cli_names_a_bad_data_file_and_a_damaged_model(tmp_path):
    import zipfile

    model, data = _lut_model()
    model.save(tmp_path / "model.keras")
    (tmp_path / "data.txt").write_text("1 2 3\n")
    proc = run_cli("model.keras", "--representative", "data.txt", cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: --representative data.txt is not a .npy or .npz file" in proc.stderr
    with zipfile.ZipFile(tmp_path / "damaged.keras", "w") as z:
        z.writestr("readme.txt", "no config.json")
    for name in ("damaged.keras",):
        proc = run_cli(name, "--quantize", "float32", cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert (f"error: cannot load {name} as a Keras model" in proc.stderr
                or f"error: {name} is not a Keras model file" in proc.stderr)
        assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["damaged.keras", "data.txt", "model.keras"]


def test_cli_names_a_bad_target_file_before_loading(tmp_path):
    import json

    from tflite_export.device import target as targets

    (tmp_path / "model.keras").write_bytes(b"not read")
    (tmp_path / "broken.json").write_text('{"name": "board",')
    data = targets.get("cortex-m4-ref").to_dict()
    data["mac_instructions"]["CONV_2D"] = -2.0
    (tmp_path / "negative.json").write_text(json.dumps(data))
    for profile, message in (
        ("broken.json", "broken.json is not a JSON target profile"),
        ("negative.json",
         "negative.json: Target.mac_instructions['CONV_2D'] must be a non-negative"),
    ):
        proc = run_cli("model.keras", "--out", "m.tflite", "--target", profile,
                       cwd=tmp_path)
        assert proc.returncode == 1
        assert f"error: {message}" in proc.stderr.replace("\n", " ")
    assert sorted(os.listdir(tmp_path)) == ["broken.json", "model.keras", "negative.json"]


@pytest.mark.slow
def test_cli_target_by_name_and_by_json_file(tmp_path):
    import dataclasses
    import json

    from tflite_export.device import target as targets

    model, data = _lut_model()
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "data.npy", data)
    # A profile name: on CMSIS-NN, DECODE's code outweighs the ~3 KB saved.
    proc = run_cli("model.keras", "--out", "a.tflite", "--representative", "data.npy",
                   "--target", "cortex-m4-cmsis-nn", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device (cortex-m4-cmsis-nn, cmsis-nn kernels" in proc.stdout
    assert "verdict: int8 written" in proc.stdout
    # A JSON profile of a firmware that links DECODE anyway: compressed.
    linked = dataclasses.replace(targets.get("cortex-m4-cmsis-nn"), name="my-board",
                                 decode_linked=True)
    (tmp_path / "board.json").write_text(json.dumps(linked.to_dict()))
    proc = run_cli("model.keras", "--out", "b.tflite", "--representative", "data.npy",
                   "--target", "board.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdict: compression saves" in proc.stdout and "device (my-board" in proc.stdout
    assert os.path.getsize(tmp_path / "b.tflite") < os.path.getsize(tmp_path / "a.tflite")


def test_cli_int4_flag_reaches_the_export_checks(tmp_path):
    """--int4 is export's `int4`: refused with --quantize float32 before the
    model is read, like the other combinations."""
    (tmp_path / "model.keras").write_bytes(b"not read")
    proc = run_cli("model.keras", "--out", "m.tflite", "--int4", "auto",
                   "--quantize", "float32", cwd=tmp_path)
    assert proc.returncode == 1
    assert "int4='auto'" in proc.stderr and "float32" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]
