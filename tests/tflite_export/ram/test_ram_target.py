"""`ram_bytes` with a target budgets the target's arena estimate.

Without a target, `ram_bytes` counts the arena measured on the host wheel
(reference kernels, 64-bit pointers); with one, `firmware.arena`'s estimate
for a 32-bit build with the target's kernel set. The model is test_split's
conv (6x6x32 -> Conv2D 24, 3x3, K=4 per tensor): its CMSIS-NN estimate is
above the wheel's arena both int8 (CMSIS-NN's im2col scratch) and
compressed, so a budget between the two bases gets different choices.
"""

import os

import pytest
from test_export import decode_op_count
from test_split import lut_model

import tflite_export
from tflite_export import exporter
from tflite_export.device import target as targets
from tflite_export.pipeline import build
from tflite_export.pipeline import convert
from tflite_export.pipeline import lut_tensors
from tflite_export.ram import ram_budget

CMSIS_NN = "cortex-m4-cmsis-nn"


@pytest.fixture(scope="module")
def arenas():
    """The unsplit model's arenas, int8 and compressed, on both bases."""
    model, data = lut_model("conv2d")
    plain, kernels, _ = lut_tensors.find_lut_kernels(model)
    specs = convert.input_specs(plain, data)
    settings = build.Settings(
        quantize="int8", data=convert.check_representative_data(plain, data, "int8", specs),
        io_dtype="int8", weight_quantization="per_tensor", shared_tables=True,
        slim=True, verify=False, inputs=None, source=None, min_agreement=None,
        reference=plain,
    )
    built = build.assemble(plain, kernels, [], settings)
    basis = ram_budget.ArenaBasis(targets.get(CMSIS_NN))
    return {
        "wheel": (built.baseline_arena, built.arena_bytes),
        CMSIS_NN: (basis.int8(built), basis.file(built)),
    }


def _export(path, **kwargs):
    model, data = lut_model("conv2d")
    return tflite_export.export(model, path, representative_data=data,
                                weight_quantization="per_tensor", **kwargs)


def test_ram_bytes_with_a_cmsis_nn_target_is_no_longer_refused():
    exporter.check_combinations(target=CMSIS_NN, ram_bytes=65536)


@pytest.mark.slow
def test_budget_counts_the_cmsis_nn_estimate_with_a_target(tmp_path, arenas):
    wheel_int8, wheel_lut = arenas["wheel"]
    cmsis_int8, cmsis_lut = arenas[CMSIS_NN]
    # Between the two bases: the unsplit compressed file fits on the wheel,
    # not on CMSIS-NN (im2col scratch).
    assert wheel_int8 < cmsis_int8 < wheel_lut < cmsis_lut
    budget = (wheel_lut + cmsis_lut) // 2
    on_target = _export(tmp_path / "t.tflite", ram_bytes=budget, target=CMSIS_NN,
                        decode="always")
    ram = on_target.ram
    assert ram.arena_basis == f"{CMSIS_NN} estimate, CMSIS-NN kernels"
    # The file written fits the target's estimate, the one the device
    # report gives.
    assert ram.arena_bytes == on_target.device.arena_bytes <= budget
    assert (ram.int8_arena_bytes, ram.unsplit_arena_bytes) == (cmsis_int8, cmsis_lut)
    (lut,) = [c for c in ram.choices if c.layer == "lut"]
    assert lut.choice == "split" and lut.groups >= 2
    assert f"B ({CMSIS_NN} estimate, CMSIS-NN kernels) <= ram_bytes={budget}" in lut.reason
    assert decode_op_count(on_target.path) == lut.groups
    assert on_target.verification.bit_exact
    text = str(on_target)
    assert (f"arenas counted: the {CMSIS_NN} estimate for a 32-bit Cortex-M build "
            "with CMSIS-NN kernels") in text
    # The same budget without a target counts the wheel's arena: the
    # unsplit compressed file fits it, a smaller file than the split one.
    on_wheel = _export(tmp_path / "w.tflite", ram_bytes=budget)
    ram = on_wheel.ram
    assert ram.arena_basis == "wheel" and on_wheel.device is None
    assert ram.arena_bytes == on_wheel.arena_bytes == wheel_lut <= budget
    assert (ram.int8_arena_bytes, ram.unsplit_arena_bytes) == (wheel_int8, wheel_lut)
    (lut,) = [c for c in ram.choices if c.layer == "lut"]
    assert lut.choice == "compress" and "(wheel) fits" in lut.reason
    assert on_wheel.size_bytes < on_target.size_bytes
    assert "arenas counted: the host wheel's smallest arena" in str(on_wheel)


@pytest.mark.slow
def test_default_decode_writes_int8_reported_on_the_target(tmp_path, arenas):
    """decode='auto': the split saves less file than DECODE's code, so the
    int8 file is written; the RAM report counts its CMSIS-NN estimate."""
    _, cmsis_lut = arenas[CMSIS_NN]
    result = _export(tmp_path / "m.tflite", ram_bytes=cmsis_lut - 256, target=CMSIS_NN)
    assert decode_op_count(result.path) == 0
    ram = result.ram
    assert ram.arena_bytes == result.device.arena_bytes <= cmsis_lut - 256
    assert [c.choice for c in ram.choices] == ["int8"]


@pytest.mark.slow
def test_budget_below_the_target_int8_arena_names_it_and_writes_nothing(tmp_path, arenas):
    wheel_int8, _ = arenas["wheel"]
    cmsis_int8, _ = arenas[CMSIS_NN]
    budget = (wheel_int8 + cmsis_int8) // 2  # enough for int8 on the wheel only
    with pytest.raises(ValueError, match=(
        rf"ram_bytes={budget} is below {cmsis_int8} B, the least arena any choice "
        rf"needs.*{CMSIS_NN} estimate for a 32-bit Cortex-M build with CMSIS-NN "
        rf"kernels.*>= {cmsis_int8}.*"
        "Nothing was written"
    )):
        _export(tmp_path / "m.tflite", ram_bytes=budget, target=CMSIS_NN, c_array=tmp_path / "m.cc")
    assert os.listdir(tmp_path) == []
