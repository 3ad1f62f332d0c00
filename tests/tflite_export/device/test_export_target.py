"""`export(target=...)`: the device report, and DECODE written only where it
saves firmware flash (`decode="auto"`) or always (`decode="always"`).

The model is test_export's small conv (a 3x3x16x32 kernel, K=16 per tensor):
compressing saves ~2 KB of file, far less than DECODE's ~21 KB of code.
"""

import dataclasses
import os

import pytest
from test_export import decode_op_count
from test_export import make_model

import tflite_export
from tflite_export.device import firmware
from tflite_export.device import target as targets


def _export(path, **kwargs):
    model, _, data = make_model("conv2d", 16, per_channel=False)
    return tflite_export.export(model, path, representative_data=data, **kwargs)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.slow
def test_small_model_for_cmsis_nn_writes_int8_and_names_the_break_even(tmp_path):
    result = _export(tmp_path / "m.tflite", target="cortex-m4-cmsis-nn")
    written = _read(result.path)
    assert decode_op_count(result.path) == 0 and not result.compressed_tensors
    assert firmware.DECODE_OP not in firmware.op_names(written)
    # The slim int8 file of the same model, verified like any export.
    assert len(written) == result.slim_baseline_bytes
    assert result.verification.bit_exact
    report = result.device
    assert report.target.name == "cortex-m4-cmsis-nn"
    assert report.flash_change == 0 and not report.decoded
    declined = report.declined
    assert declined.file_change < 0  # compressing shrinks the file ...
    decode_code = targets.get("cortex-m4-cmsis-nn").decode_code_bytes
    assert declined.code_added == {firmware.DECODE_OP: decode_code}
    assert declined.flash_change > 0  # ... but not the firmware
    assert declined.break_even_decode_bytes == -declined.file_change
    verdict = report.verdict()
    assert verdict.startswith("int8 written")
    assert f"under {declined.break_even_decode_bytes:,} B" in verdict
    assert "decode='always'" in verdict
    (note,) = [n for n in result.notes if "written int8" in n]
    assert f"{declined.file_change:+,} B" in note and f"{decode_code:,} B" in note
    assert f"{declined.break_even_decode_bytes:,} B (the break-even)" in note
    assert "kept int8: on cortex-m4-cmsis-nn" in result.tensors[0].note
    text = str(result)
    for line in report.lines():
        assert line in text
    assert "CMSIS-NN scratch request" in text and "not judged" not in text


@pytest.mark.slow
def test_decode_always_writes_the_compressed_file_that_loses(tmp_path):
    result = _export(tmp_path / "m.tflite", target="cortex-m4-cmsis-nn", decode="always")
    assert decode_op_count(result.path) == 1
    report = result.device
    assert report.declined is None and not report.wins
    assert report.file_change == result.size_bytes - result.slim_baseline_bytes < 0
    assert report.flash_change == (
        report.file_change + targets.get("cortex-m4-cmsis-nn").decode_code_bytes
    )
    assert report.verdict().startswith("compression LOSES on cortex-m4-cmsis-nn")
    assert [d.path for d in report.decoded] == ["width4_16"]
    assert "compression LOSES" in str(result)


@pytest.mark.slow
def test_firmware_that_links_decode_keeps_compression(tmp_path):
    linked = dataclasses.replace(targets.get("cortex-m4-ref"), name="my-board",
                                 decode_linked=True)
    result = _export(tmp_path / "m.tflite", target=linked)
    assert decode_op_count(result.path) == 1
    report = result.device
    assert report.wins and report.code_added == {}
    assert report.flash_change == result.size_bytes - result.slim_baseline_bytes
    assert report.verdict().startswith("compression saves")
    # Reference kernels: the wheel's arena with its persistent data
    # recomputed for 32-bit pointers, so below the wheel's own.
    assert report.arena_bytes < result.arena_bytes
    assert "32-bit Cortex-M build" in report.arena_note
    assert "device (my-board, reference kernels" in str(result)


@pytest.mark.slow
def test_split_that_loses_on_the_device_is_written_int8(tmp_path):
    """Under max_decode_bytes the choice is the split file's: its DECODE and
    CONCATENATION code outweigh what it saves, so the int8 file is written
    and the RAM report says so."""
    model, _, data = make_model("dense", 16, per_channel=False)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data,
                                  max_decode_bytes=4096, target="cortex-m4-cmsis-nn")
    assert decode_op_count(result.path) == 0
    assert result.size_bytes == result.slim_baseline_bytes
    declined = result.device.declined
    assert set(declined.code_added) == {firmware.DECODE_OP, "CONCATENATION"}
    assert len(declined.decoded) > 1  # the groups
    assert [c.choice for c in result.ram.choices] == ["int8"]
    assert result.ram.arena_bytes == result.arena_bytes and result.ram.concat_ops == {}
    assert not any("split" in note for note in result.notes)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(target="cortex-m7"), ValueError, "target='cortex-m7' is not a known profile"),
    (dict(target={"name": "x"}), TypeError, "Target.from_dict reads a dict"),
    (dict(target="cortex-m4-ref", decode="never"), ValueError,
     r"decode must be one of \('auto', 'always'\)"),
])
def test_bad_target_writes_nothing(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        _export(tmp_path / "m.tflite", **kwargs)
    assert os.listdir(tmp_path) == []
