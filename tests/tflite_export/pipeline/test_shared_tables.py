"""Shared value tables, slimming and the file anatomy, run on TFLM.

Shared tables rely on TFLM's DECODE stepping its table pointer by the
DCM's stride byte (0: one table for all channels); every export here is
checked bit-exact on TFLM by the exporter, and the written file is rerun
here against the converter's own int8 model.
"""

import os

import keras
import numpy as np
import paths
import pytest
from test_export import check_written
from test_export import tflm_outputs

import tflite_export
from tflite_export.device import anatomy
from tflite_export.pipeline import convert
from tflite_export.pipeline import flatbuffer
from tflite_export.pipeline import lut_tensors
from tflite_export.pipeline import mapping
from tflite_export.pipeline import shared_tables
from tflite_export.pipeline import slim as slim_lib
from tflite_export.pipeline import verify as verify_lib


def _model(kind, k, rng, negative_gamma=False, symmetric=True):
    """A small model whose LUT layer draws on one K-value dictionary."""
    if kind == "dense":
        inp = keras.Input((48,))
        x = keras.layers.Dense(32, use_bias=True, name="lut")(inp)
    else:
        inp = keras.Input((6, 6, 8 if kind == "conv2d" else 32))
        if kind == "conv2d":
            x = keras.layers.Conv2D(16, 3, name="lut")(inp)
        else:
            x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="lut")(inp)
    if kind != "dense" or negative_gamma:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    if kind != "dense":
        x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(5, name="head")(x)
    model = keras.Model(inp, out)
    layer = model.get_layer("lut")
    if symmetric:
        d = np.linspace(-1, 1, k) * 0.4
    else:
        d = np.sort(rng.uniform(-0.2, 0.5, k))
    kernel = layer.kernel
    kernel.assign(d[rng.integers(0, k, kernel.shape)].astype(np.float32))
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bn:
        gamma, beta, mean, var = layer.get_weights()
        gamma = rng.uniform(0.5, 2.0, gamma.shape)
        if negative_gamma:
            gamma[::3] *= -1
        layer.set_weights([gamma.astype(np.float32),
                           rng.normal(0, 0.1, beta.shape).astype(np.float32),
                           rng.normal(0, 0.1, mean.shape).astype(np.float32),
                           rng.uniform(0.5, 2.0, var.shape).astype(np.float32)])
    data = rng.normal(size=(32,) + tuple(model.inputs[0].shape[1:])).astype(np.float32)
    return model, data


# Every kind and every width runs by default; the other pairs are extended.
_DEFAULT_KIND_BITS = {("dense", 1), ("conv2d", 2), ("depthwise", 3), ("dense", 4)}


@pytest.mark.slow
@pytest.mark.parametrize("kind,bits", [
    pytest.param(kind, bits, marks=() if (kind, bits) in _DEFAULT_KIND_BITS
                 else pytest.mark.extended)
    for bits in (1, 2, 3, 4) for kind in ("dense", "conv2d", "depthwise")])
def test_shared_table_bit_exact_at_1_to_4_bits(tmp_path, kind, bits):
    """A shared table on each kind, at 1 to 4 index bits. The pairs outside
    `_DEFAULT_KIND_BITS` are `extended`: the default pairs cover each kind
    and each width here, and `test_export.py::test_index_bits_1_to_7` packs
    every width."""
    # Dense without, conv and depthwise with a folded batch norm.
    rng = np.random.default_rng(bits)
    model, data = _model(kind, 2**bits, rng)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, shared_tables=True
    )
    (lut,) = [t for t in result.tensors if t.layer == "lut"]
    axis = 3 if kind == "depthwise" else 0
    assert (lut.table_mode, lut.tables) == (f"shared(axis={axis})", 1)
    assert lut.codes <= 2**bits and lut.index_bits == bits
    assert lut.compressed
    check_written(result, model, data, min_top1=0.7)


@pytest.mark.slow
def test_dense_with_folded_batch_norm_and_negative_gamma(tmp_path):
    # A symmetric dictionary: negated channels reuse the K codes.
    rng = np.random.default_rng(0)
    model, data = _model("dense", 8, rng, negative_gamma=True)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, shared_tables=True
    )
    (lut,) = [t for t in result.tensors if t.layer == "lut"]
    assert lut.table_mode == "shared(axis=0)" and lut.codes == 8
    assert "channels negated" in lut.note
    check_written(result, model, data, min_top1=0.7)


@pytest.mark.slow
def test_asymmetric_dictionary_with_negated_channels_takes_the_cheaper_tables(tmp_path):
    # Both signs of 4 values: one table of up to 8 codes, one more index
    # bit. Depthwise (9 weights a channel): cheaper than 64 tables of 4.
    # Conv2D (72 weights a channel): the extra bit costs more than 16 tables.
    rng = np.random.default_rng(1)
    model, data = _model("depthwise", 4, rng, negative_gamma=True, symmetric=False)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, shared_tables=True
    )
    (lut,) = [t for t in result.tensors if t.layer == "lut"]
    assert lut.table_mode == "shared(axis=3)" and 4 < lut.codes <= 8
    assert lut.index_bits == 3
    check_written(result, model, data, min_top1=0.7)
    model, data = _model("conv2d", 4, rng, negative_gamma=True, symmetric=False)
    result = tflite_export.export(
        model, tmp_path / "c.tflite", representative_data=data, shared_tables=True
    )
    (lut,) = [t for t in result.tensors if t.layer == "lut"]
    assert (lut.table_mode, lut.tables, lut.index_bits) == ("per-channel(axis=0)", 16, 2)
    check_written(result, model, data, min_top1=0.7)


def _converted(model, data):
    plain, kernels, _ = lut_tensors.find_lut_kernels(model)
    baseline = convert.convert(plain, "int8", data)
    matches, _ = mapping.match(flatbuffer.read(baseline).weights, kernels)
    return baseline, matches


@pytest.mark.slow
def test_requantised_codes_equal_the_converters_where_the_channel_peak_is_the_tensor_peak():
    rng = np.random.default_rng(2)
    model, data = _model("conv2d", 4, rng)
    _, matches = _converted(model, data)
    (match,) = [m for m in matches if m.kernel.layer == "lut"]
    shared, reason = shared_tables.shared_codes(match)
    assert reason is None
    weight = match.weight.array
    old = np.moveaxis(weight, 0, 0).reshape(weight.shape[0], -1)
    new = shared.codes.reshape(weight.shape[0], -1)
    at_peak = np.abs(old).max(axis=1) == 127
    assert at_peak.any()
    np.testing.assert_array_equal(new[at_peak], old[at_peak])
    np.testing.assert_array_equal(shared.scales[at_peak], match.weight.scales[at_peak])
    # Every channel uses the one table's codes, up to sign.
    assert set(np.unique(np.abs(new))) <= set(np.abs(shared.table))
    assert len(shared.table) <= 4


@pytest.mark.slow
def test_per_channel_dictionaries_keep_per_channel_tables_and_say_why(tmp_path):
    from test_export import make_model

    model, _, data = make_model("conv2d", 4, per_channel=True)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    (conv,) = result.tensors
    assert conv.table_mode == "per-channel(axis=0)"
    assert "per-channel dictionaries" in conv.note


@pytest.mark.slow
def test_slim_file_is_bit_exact_with_the_full_one_and_smaller(tmp_path):
    rng = np.random.default_rng(3)
    model, data = _model("conv2d", 4, rng)
    full = tflite_export.export(
        model, tmp_path / "full.tflite", representative_data=data, slim=False
    )
    slim = tflite_export.export(model, tmp_path / "slim.tflite", representative_data=data)
    assert full.slim_steps == [] and slim.slim_steps == list(slim_lib.STEPS)
    assert slim.size_bytes < full.size_bytes
    np.testing.assert_array_equal(
        tflm_outputs(slim.path, data), tflm_outputs(full.path, data)
    )
    with open(slim.path, "rb") as f:
        slim_bytes = f.read()
    # No tensor names, conversion metadata or signatures are left.
    assert b"serving_default" not in slim_bytes and b"lut" not in slim_bytes
    # A slim plain int8 file (no LUT) is offered too and runs the same.
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    baseline = convert.convert(plain, "int8", data)
    assert verify_lib.probe_outputs(slim_lib.slim(baseline)) == verify_lib.probe_outputs(
        baseline
    )


def test_unknown_slimming_step_is_an_error():
    with pytest.raises(ValueError, match="unknown slimming steps"):
        slim_lib.slim(b"", ["names", "everything"])


@pytest.mark.slow
def test_anatomy_adds_up_to_the_written_file(tmp_path):
    rng = np.random.default_rng(4)
    model, data = _model("depthwise", 4, rng)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    with open(result.path, "rb") as f:
        parts = anatomy.read(f.read(), [])
    assert parts.total == os.path.getsize(result.path) == result.size_bytes
    assert sum(count for _, count in parts.row()) == parts.total
    assert parts.other > 0 and parts.packed_indices > 0
    # The limit counts data only: below the file, above the packed indices.
    assert parts.packed_indices < result.anatomy.information_limit < result.size_bytes


@pytest.mark.slow
def test_a_slimming_step_tflm_rejects_is_dropped_with_a_note(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    model, data = _model("conv2d", 4, rng)
    original = slim_lib.slim

    def broken(model_bytes, steps=slim_lib.STEPS):
        out = original(model_bytes, steps)
        # TFLM cannot read this file: as if the step broke it.
        return out[:64] if "min_max" in steps else out

    monkeypatch.setattr(slim_lib, "slim", broken)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    assert "min_max" not in result.slim_steps and "names" in result.slim_steps
    assert any("'min_max' dropped" in note for note in result.notes)
    check_written(result, model, data, min_top1=0.7)


@pytest.mark.slow
def test_shared_tables_fall_back_when_they_agree_less_with_keras(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    model, data = _model("conv2d", 4, rng)
    monkeypatch.setattr(verify_lib.Verification, "worse_than_int8", property(
        lambda self: self.int8_max_abs_diff is not None))
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    (lut,) = [t for t in result.tensors if t.layer == "lut"]
    assert lut.table_mode == "per-channel(axis=0)"
    assert any("shared value tables dropped" in note for note in result.notes)
    # Forced, the shared tables stay whatever the agreement.
    forced = tflite_export.export(
        model, tmp_path / "f.tflite", representative_data=data, shared_tables=True
    )
    assert [t.table_mode for t in forced.tensors if t.layer == "lut"] == ["shared(axis=0)"]


def test_worse_than_int8_separates_a_real_loss_from_rounding_noise():
    def make(task, snr=20.0, discordant=None, int8_snr=23.2):
        return verify_lib.Verification(
            samples=64, inputs="random", bit_exact=True,
            top1_agreement=0.9 if task == "classification" else None,
            max_abs_diff=0.6, task=task, snr_db=snr, int8_top1_agreement=0.9
            if task == "classification" else None,
            int8_max_abs_diff=0.5, int8_snr_db=int8_snr, discordant=discordant)

    # Classifiers: a sign test on the inputs only one of the two gets right.
    assert not make("classification", discordant=(3, 1)).worse_than_int8
    assert make("classification", discordant=(9, 1)).worse_than_int8
    assert not make("classification", discordant=(1, 9)).worse_than_int8
    # Regression: a second rounding at most doubles the error power (3 dB).
    # MLPerf AD with random data: 21.7 dB against int8's 23.2 dB.
    assert not make("regression", snr=21.7).worse_than_int8
    assert make("regression", snr=19.9).worse_than_int8
    # Without the plain int8 model's figures there is nothing to compare.
    assert not verify_lib.Verification(
        samples=1, inputs="random", bit_exact=True, top1_agreement=None,
        max_abs_diff=9.0).worse_than_int8


def test_sign_test():
    assert verify_lib.sign_test(0, 0) == 1.0
    assert verify_lib.sign_test(1, 0) == 0.5
    assert verify_lib.sign_test(5, 0) == pytest.approx(1 / 32)
    assert verify_lib.sign_test(9, 1) == pytest.approx(11 / 1024)


_AD = os.path.join(paths.SHARED, "models",
                   "mlperf_tiny_ad01.h5")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(_AD), reason="MLPerf AD .h5 not at ../shared")
def test_every_per_channel_kernel_of_the_mlperf_autoencoder_is_matched():
    # A least-squares channel factor missed one channel of 'dense' by 4 % of
    # an int8 step; the factor is now read off the converter's scale.
    import lutq_tf

    model = lutq_tf.load_model(_AD)
    q = lutq_tf.quantize_model(model, bits=2, per_channel=True)
    data = np.random.default_rng(0).normal(size=(8, 640)).astype(np.float32)
    baseline, matches = _converted(q, data)
    assert len(matches) == len(lutq_tf.summary(q, print_fn=None)) == 10


def _ancillary_headers(path):
    """DCM byte 5 of every DECODE output's ancillary tensor in a file."""
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    subgraph = model.subgraphs[0]
    headers = []
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex].customCode
        if code not in (b"TFLM_DECODE", "TFLM_DECODE"):
            continue
        for k in range(len(op.outputs)):
            ancillary = subgraph.tensors[int(op.inputs[2 * k + 1])]
            headers.append(int(model.buffers[ancillary.buffer].data[5]))
    return headers


@pytest.mark.slow
def test_shared_table_carries_the_one_table_marker(tmp_path):
    """The format's axis nibble 0xF ("one table") is written for a shared
    table. TFLM's kernel masks byte 5 with 0x07 and ignores the nibble (it
    shares the table through stride 0), so the file stays bit-exact."""
    model, data = _model("conv2d", 4, np.random.default_rng(2))
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, shared_tables=True
    )
    (lut,) = [t for t in result.tensors if t.layer == "lut"]
    assert lut.table_mode.startswith("shared")
    assert _ancillary_headers(result.path) == [0xF0 | 2]
    check_written(result, model, data, min_top1=0.7)
