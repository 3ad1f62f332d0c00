"""The device benchmark's helpers and renderers (`benchmarks/device.py`,
`benchmarks/readme.py`'s `device` block), without the MLPerf models."""

import dataclasses
import json
import types

import keras
import numpy as np
import pytest

from benchmarks import device
from benchmarks import readme


def test_agreement_gives_top1_only_for_probability_outputs():
    expected = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5 - 1e-9]])
    real = np.array([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    top1, snr, diff = device.agreement(expected, real)
    assert top1 == pytest.approx(2 / 3)
    assert diff == pytest.approx(0.4)
    noise = np.sum((real - expected) ** 2)
    assert snr == pytest.approx(10 * np.log10(np.sum(expected**2) / noise))
    # Not probabilities (a reconstruction): SNR only; identical: no SNR.
    values = np.array([[1.0, -2.0, 3.0]])
    top1, snr, diff = device.agreement(values, values + 0.1)
    assert top1 is None and snr > 0 and diff == pytest.approx(0.1)
    assert device.agreement(values, values.copy())[1:] == (None, 0.0)


def test_int8_weights_are_the_total_less_decoded_and_int4_ones():
    report = types.SimpleNamespace(
        decoded=[types.SimpleNamespace(elements=100)],
        int4=[types.SimpleNamespace(elements=30), types.SimpleNamespace(elements=20)],
    )
    assert device.int8_weights(1000, report) == 850
    assert device.int8_weights(50, types.SimpleNamespace(decoded=[], int4=[])) == 50


def test_weight_count_and_reference_scratch_read_the_file(monkeypatch):
    from tflite_export.device import kernel_scratch
    from tflite_export.pipeline import flatbuffer

    monkeypatch.setattr(flatbuffer, "read", lambda b: types.SimpleNamespace(
        weights=[types.SimpleNamespace(array=np.zeros((4, 3))),
                 types.SimpleNamespace(array=np.zeros(5))]))
    assert device.weight_count(b"") == 17
    rows = [types.SimpleNamespace(reference=None), types.SimpleNamespace(reference=4096),
            types.SimpleNamespace(reference=0)]
    monkeypatch.setattr(kernel_scratch, "op_scratch", lambda b, aligned: rows)
    assert device.reference_scratch(b"") == 4096
    monkeypatch.setattr(kernel_scratch, "op_scratch", lambda b, aligned: [])
    assert device.reference_scratch(b"") == 0


def test_dense_layers_are_the_top_level_dense_layers():
    inp = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(3, name="fc1")(x)
    out = keras.layers.Dense(2, name="fc2")(x)
    assert device.dense_layers(keras.Model(inp, out)) == ["fc1", "fc2"]


def _rows():
    base = dict(model="M", bits=4, int8_file_bytes=1000, code_added={}, int8_arena_bytes=500,
                host_arena_bytes=600, decode_ops=0, decode_instructions=0.0,
                decode_share=0.0, paths={}, bit_exact=True, verdict="ok",
                int8_instructions=1e6, float_top1=1.0)
    return [
        device.Row(variant="int8", file_bytes=1000, flash_change=0, arena_bytes=500,
                   firmware_change=0, int8_weights=900, **{**base, "bits": 8}),
        device.Row(variant="LUT (forced)", file_bytes=700, flash_change=20_000,
                   arena_bytes=1500, firmware_change=20_100, decode_ops=2,
                   decode_instructions=2e4, decode_share=0.02, paths={"width4_16": 2},
                   **{k: v for k, v in base.items()
                      if k not in ("decode_ops", "decode_instructions", "decode_share",
                                   "paths")}),
        device.Row(variant="default", file_bytes=1000, flash_change=0, arena_bytes=500,
                   **base),
        device.Row(variant="int4", file_bytes=550, flash_change=-400, arena_bytes=900,
                   firmware_change=-450, int4_ops=3, int4_weights=900,
                   int4_instructions=8e5, int4_share=0.8, reference_scratch=400,
                   notes=["two batch norm(s) folded"],
                   **{**base, "float_top1": None, "float_snr_db": 30.0}),
        device.Row(variant="planned", file_bytes=600, flash_change=-300, arena_bytes=700,
                   firmware_change=-300, int4_ops=2, int4_weights=600,
                   int4_instructions=3e5, int4_share=0.3,
                   notes=["plan for 700 B: 2 int4, 1 lut, estimate 650 B"],
                   **{**base, "bits": "plan", "decode_ops": 1, "decode_share": 0.01}),
    ]


def test_markdown_has_the_int4_row_and_its_summary():
    text = device.markdown(_rows(), "python -m benchmarks.device", 60, "cortex-m4-cmsis-nn")
    (line,) = [line for line in text.splitlines() if line.startswith("- M: plan for")]
    assert ("plan for 700 B: 2 int4, 1 lut, estimate 650 B; firmware -300 B against the "
            "int8 row, arena +200 B, instructions +31.0 % (1 DECODE, 2 int4 op(s))") in line
    (row,) = [line for line in text.splitlines() if line.startswith("| M | int4 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:8] == ["550", "-450", "-400", "900", "600"]
    assert cells[11:14] == ["3", "800,000", "80.0 %"]
    assert cells[-1] == "SNR 30.0 dB" and cells[-2] == "yes"
    assert ("- M: 900 weights int4 in 3 op(s), 0 left int8; firmware -450 B against the "
            "int8 row (-400 B against its own int8 twin); arena +400 B against int8 "
            "(`result.device.arena_bytes`; the reference kernels' largest unpack buffer "
            "400 B, which CMSIS-NN does not allocate)") in text
    assert "Two batch norm(s) folded." in text


def test_real_images_are_the_digits_and_cifar10_scaled_as_the_h5_expects(monkeypatch):
    from experiments import datasets

    # The quickstart's digits are bundled: always there.
    ((model, (calibration, evaluation, name)),) = device.real_images(None, 256).items()
    assert model == "quickstart" and calibration.shape == (device._SAMPLES, 8, 8, 1)
    assert evaluation.shape == (256, 8, 8, 1) and name == "256 digits test images"
    train = np.random.default_rng(0).random((100, 32, 32, 3)).astype(np.float32)
    test = np.random.default_rng(1).random((300, 32, 32, 3)).astype(np.float32)
    monkeypatch.setattr(datasets, "load_cifar10",
                        lambda path: ((train, np.zeros(100)), (test, np.zeros(300))))
    real = device.real_images("c.tgz", 256)
    assert set(real) == {"quickstart", "ResNet-8"} <= set(device.MODELS)
    calibration, evaluation, name = real["ResNet-8"]
    np.testing.assert_allclose(calibration, 255 * train[:device._SAMPLES])
    np.testing.assert_allclose(evaluation, 255 * test[:256])
    assert name == "256 CIFAR-10 test images"


def test_markdown_says_which_rows_agree_on_real_images():
    rows = _rows()
    for r in rows:
        r.inputs = "256 CIFAR-10 test images"
    text = device.markdown(rows, "python -m benchmarks.device", 60, "cortex-m4-cmsis-nn")
    (row,) = [line for line in text.splitlines() if line.startswith("| M | int4 |")]
    assert row.rstrip(" |").endswith("SNR 30.0 dB on 256 CIFAR-10 test images")
    assert "(M: on 256 CIFAR-10 test images)" in text
    assert "(M: 32 training images of the set they are evaluated on)" in text
    assert "on 256 CIFAR" not in device.markdown(_rows(), "c", 60, "cortex-m4-cmsis-nn")


def test_readme_block_shows_lut_and_int4_per_model(monkeypatch, tmp_path):
    record = {"command": "python -m benchmarks.device --models_dir=/x/models",
              "date": "2026-12-07", "seconds": 120, "target": "cortex-m4-cmsis-nn",
              "rows": [dataclasses.asdict(r) for r in _rows()]}
    def write():
        (tmp_path / "device.json").write_text(json.dumps(record))

    monkeypatch.setattr(readme, "RESULTS", str(tmp_path))
    write()
    lines = readme.device()
    assert lines[0].startswith("`python -m benchmarks.device --models_dir=PATH` (2 min")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    (row,) = [line for line in lines if line.startswith("| M |")]
    cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["LUT firmware"] == "+20,100" and cells["LUT instr."] == "+2.0 %"
    assert cells["int4 firmware"] == "-450" and cells["int4 arena"] == "900"
    assert cells["int4 instr."] == "+80.0 %" and cells["default export writes"] == "int8"
    # The planned row: its firmware, and decode plus int4 instructions.
    assert cells["planned firmware"] == "-300" and cells["planned instr."] == "+31.0 %"
    # A record without int4 rows still renders.
    record["rows"] = record["rows"][:3]
    write()
    (row,) = [line for line in readme.device() if line.startswith("| M |")]
    assert row.count("| - ") == 6
