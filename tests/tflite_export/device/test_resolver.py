"""The op resolver header written beside the C array (`<stem>_ops.h`)."""

import re
import shutil
import subprocess
import types

import flatbuffers
import pytest
from tensorflow.lite.python import schema_py_generated as schema
from test_export import make_model

import tflite_export
from tflite_export.device import firmware
from tflite_export.device import resolver
from tflite_export.errors import UnsupportedModelError
from tflite_export.pipeline import flatbuffer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resolver")
    model, _, data = make_model("conv2d", 16, per_channel=False)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data,
        c_array=tmp_path / "model_data.cc",
    )
    with open(result.path, "rb") as f:
        return result, f.read()


def _op_names(model_bytes):
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    return {flatbuffer.op_name(model, op)
            for subgraph in model.subgraphs for op in subgraph.operators}


def _calls(header):
    return re.findall(r"resolver\.(Add\w+)\(([^)]*\))?\)", header)


def _without_decode(model_bytes):
    """The file with its DECODE ops dropped (not runnable; enough to render)."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    for subgraph in model.subgraphs:
        subgraph.operators = [
            op for op in subgraph.operators
            if flatbuffer.op_name(model, op) != "TFLM_DECODE"
        ]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_export_writes_the_resolver_for_exactly_the_files_ops(exported):
    result, data = exported
    assert result.op_resolver == result.c_array[0][: -len(".cc")] + "_ops.h"
    assert f"op resolver and arena size: {result.op_resolver}" in str(result)
    with open(result.op_resolver, encoding="utf-8") as f:
        header = f.read()
    estimates = firmware.arenas(data, result.arena_bytes)
    assert header == resolver.render(
        data, "model_data", result.arena_bytes,
        cmsis_nn_arena_bytes=estimates["cmsis-nn"][0],
        reference_arena_bytes=estimates["reference"][0])
    names = _op_names(data)
    assert {"CONV_2D", "FULLY_CONNECTED", "TFLM_DECODE"} <= names
    calls = _calls(header)
    methods = [m for m, _ in calls]
    expected = {resolver.ADD_METHODS.get(n) or resolver.CUSTOM_METHODS[n] for n in names}
    assert len(methods) == len(set(methods)) and set(methods) == expected
    assert f"constexpr int model_data_kOpCount = {len(names)};" in header
    assert "MicroMutableOpResolver<model_data_kOpCount>& resolver" in header
    assert "resolver.AddConv2D(tflite::Register_CONV_2D_INT8())" in header
    assert "resolver.AddFullyConnected(tflite::Register_FULLY_CONNECTED_INT8())" in header
    assert "resolver.AddDecode()" in header
    assert f"constexpr size_t model_data_kArenaBytes = {result.arena_bytes};" in header
    # Without a target too: the 32-bit estimate per kernel set.
    reference = estimates["reference"][0]
    assert reference < min(result.arena_bytes, estimates["cmsis-nn"][0])
    assert f"constexpr size_t model_data_kArenaBytesReference = {reference};" in header
    assert "kArenaBytesCmsisNn = " in header and "32-bit Cortex-M build" in header
    assert "USE_TFLM_COMPRESSION" in header and "30 KB" in header


def test_no_decode_no_add_decode(exported):
    _, data = exported
    stripped = _without_decode(data)
    assert "TFLM_DECODE" not in _op_names(stripped)
    header = resolver.render(stripped, "m")
    assert "AddDecode" not in header
    assert f"constexpr int m_kOpCount = {len(_op_names(stripped))};" in header
    assert "kArenaBytes" not in header


def test_the_targets_arena_estimate_is_the_one_written_for_its_kernels(exported):
    result, data = exported
    report = types.SimpleNamespace(target=types.SimpleNamespace(kernels="cmsis-nn"),
                                   arena_bytes=12345)
    header = resolver.render_for_export(data, "x/model_data.cc", result.arena_bytes, report)
    assert f"constexpr size_t model_data_kArenaBytes = {result.arena_bytes};" in header
    assert "constexpr size_t model_data_kArenaBytesCmsisNn = 12345;" in header
    report.target.kernels = "reference"
    header = resolver.render_for_export(data, "model_data.cc", result.arena_bytes, report)
    assert "constexpr size_t model_data_kArenaBytesReference = 12345;" in header


def test_mixed_or_unlisted_types_use_the_generic_kernel(exported, monkeypatch):
    _, data = exported
    monkeypatch.setitem(resolver.VARIANTS, "CONV_2D", ((0, 1), {}))
    assert "resolver.AddConv2D()" in resolver.render(data, "m")


def test_an_op_without_an_add_method_is_named(exported, monkeypatch):
    _, data = exported
    monkeypatch.delitem(resolver.ADD_METHODS, "FULLY_CONNECTED")
    with pytest.raises(UnsupportedModelError, match="'FULLY_CONNECTED'"):
        resolver.render(data, "m")


_STUB = """
#include <cstddef>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
namespace tflite {
struct TFLMRegistration { int id; };
#define REG(n) inline TFLMRegistration Register_##n() { return {0}; }
REG(CONV_2D_INT8) REG(FULLY_CONNECTED_INT8) REG(DEPTHWISE_CONV_2D_INT8)
REG(SOFTMAX_INT8) REG(AVERAGE_POOL_2D_INT8) REG(MAX_POOL_2D_INT8) REG(ADD_INT8)
REG(MUL_INT8)
template <unsigned int tOpCount>
class MicroMutableOpResolver {
 public:
  TfLiteStatus AddDecode() { return kTfLiteOk; }
#define ADD(m) TfLiteStatus m(const TFLMRegistration& r = {0}) { return kTfLiteOk; }
  %s
};
}  // namespace tflite
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_header_compiles_against_a_stub_of_the_tflm_api(exported, tmp_path):
    result, _ = exported
    stub_dir = tmp_path / "tensorflow" / "lite" / "micro"
    stub_dir.mkdir(parents=True)
    methods = " ".join(f"ADD({m})" for m in resolver.ADD_METHODS.values())
    (stub_dir / "micro_mutable_op_resolver.h").write_text(_STUB % methods)
    main = tmp_path / "main.cc"
    main.write_text(
        f'#include "{result.op_resolver}"\n'
        f'#include "{result.op_resolver}"  // include guard\n'
        "int main() {\n"
        "  static_assert(model_data_kArenaBytes > 0, \"arena\");\n"
        "  static_assert(model_data_kArenaBytesReference > 0, \"arena\");\n"
        "  static_assert(model_data_kArenaBytesCmsisNn > 0, \"arena\");\n"
        "  tflite::MicroMutableOpResolver<model_data_kOpCount> resolver;\n"
        "  return model_data_RegisterOps(resolver) == kTfLiteOk ? 0 : 1;\n}\n"
    )
    subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
         f"-I{tmp_path}", str(main)],
        check=True, capture_output=True,
    )
