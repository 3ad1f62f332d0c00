"""Decode buffers under a RAM limit: split layers, the chooser, bad input.

A split export must run bit-exact on TFLM against the same split model
uncompressed (the exporter checks its own twin; here the written file is
also rerun against the converter's file of the split Keras model), agree
with the unsplit Keras model, and keep every DECODE output under the limit.
"""

import os

import keras
import numpy as np
import pytest
from test_export import decode_op_count
from test_export import set_lut
from test_export_cli import run_cli

import tflite_export
from tflite_export.pipeline import convert
from tflite_export.pipeline import tflm_limits
from tflite_export.pipeline import verify as verify_lib
from tflite_export.ram import split

# -- Group sizes and the concatenation tree (fast) ---------------------------


@pytest.mark.parametrize("channels,channel_bytes,limit", [
    (500, 800, 32768), (64, 48, 1536), (64, 48, 240), (7, 10, 10), (128, 640, 16384),
    (10, 5, 1000),
])
def test_group_sizes_fit_the_limit_with_fewest_groups(channels, channel_bytes, limit):
    sizes = split.group_sizes(channels, channel_bytes, limit)
    assert sum(sizes) == channels and min(sizes) >= 1
    assert max(sizes) * channel_bytes <= limit
    assert max(sizes) - min(sizes) <= 1
    # One group fewer could not hold every channel within the limit.
    assert (len(sizes) - 1) * (limit // channel_bytes) < channels


def test_group_sizes_none_when_one_channel_is_too_big():
    assert split.group_sizes(16, 800, 799) is None


@pytest.mark.parametrize("count", [2, 10, 11, 13, 19, 20, 25, 101])
def test_concat_tree_keeps_order_within_tflm_limit(count):
    inputs = [keras.Input((i + 1,)) for i in range(count)]
    joined, ops = split.concat_tree(inputs, "cat")
    model = keras.Model(inputs, joined)
    concats = [layer for layer in model.layers
               if isinstance(layer, keras.layers.Concatenate)]
    assert len(concats) == ops
    assert all(
        len(layer._inbound_nodes[0].input_tensors)
        <= tflm_limits.MAX_CONCATENATION_INPUTS
        for layer in concats
    )
    if count <= tflm_limits.MAX_CONCATENATION_INPUTS:
        assert ops == 1
    else:
        # Extra ops copy as few groups as possible: at most ceil((n-10)/9).
        assert ops == 1 + -(-(count - 10) // 9)
    values = [np.full((1, i + 1), i, np.float32) for i in range(count)]
    got = model.predict(values, verbose=0)
    np.testing.assert_array_equal(got, np.concatenate(values, axis=-1))


# -- The split Keras model computes what the original does (fast) ------------


def _dense_bn_model(inputs=24):
    inp = keras.Input((inputs,))
    x = keras.layers.Dense(20, use_bias=False, name="fc")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    out = keras.layers.Dense(7, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    model.get_layer("bn").set_weights([
        rng.uniform(0.5, 2, 20), rng.normal(0, 0.1, 20),
        rng.normal(0, 0.1, 20), rng.uniform(0.5, 2, 20),
    ])
    return model


def test_split_model_same_outputs_batch_norm_moves_into_groups():
    model = _dense_bn_model()
    splitted, info = split.split_model(model, {"fc": [7, 7, 6], "head": [4, 3]})
    x = np.random.default_rng(1).normal(size=(8, 24)).astype(np.float32)
    np.testing.assert_allclose(
        splitted.predict(x, verbose=0), model.predict(x, verbose=0),
        rtol=1e-5, atol=1e-6,
    )
    assert info["fc"].absorbed == ("bn", "relu")
    assert info["fc"].groups == ("fc_part0", "fc_part1", "fc_part2")
    names = [layer.name for layer in splitted.layers]
    # The batch norm runs per group (so the converter folds it into each
    # group's kernel); softmax, not elementwise, runs after the join.
    assert "bn" not in names and "bn_part2" in names
    assert "head_activation" in names
    assert splitted.get_layer("head_part0").get_config()["activation"] == "linear"


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "dense3d"])
def test_split_model_same_outputs_for_convolutions_and_sequence_dense(kind):
    if kind == "conv1d":
        inp = keras.Input((12, 5))
        layer = keras.layers.Conv1D(9, 3, activation="relu", name="lut")
    elif kind == "conv2d":
        inp = keras.Input((7, 7, 3))
        layer = keras.layers.Conv2D(9, 3, strides=2, padding="same",
                                    activation="tanh", name="lut")
    else:  # Dense on the last axis of a sequence
        inp = keras.Input((4, 6))
        layer = keras.layers.Dense(9, activation="relu", name="lut")
    model = keras.Model(inp, layer(inp))
    splitted, info = split.split_model(model, {"lut": [3, 3, 3]})
    x = np.random.default_rng(0).normal(size=(5,) + tuple(inp.shape[1:]))
    np.testing.assert_allclose(
        splitted.predict(x.astype(np.float32), verbose=0),
        model.predict(x.astype(np.float32), verbose=0), rtol=1e-5, atol=1e-6,
    )
    assert len(info["lut"].groups) == 3


def test_same_model_split_again_moves_batch_norm_again():
    # The exporter's RAM search splits one model several times; the layers
    # reused by an earlier split must not look "called twice".
    model = _dense_bn_model()
    split.split_model(model, {"fc": [10, 10]})
    again, info = split.split_model(model, {"fc": [5, 5, 5, 5]})
    assert info["fc"].absorbed == ("bn", "relu")
    x = np.random.default_rng(1).normal(size=(4, 24)).astype(np.float32)
    np.testing.assert_allclose(again.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_split_kernels_slice_channels_and_keep_the_dictionary():
    from tflite_export.pipeline import lut_tensors

    model = _dense_bn_model()
    set_lut(model.get_layer("fc"), "kernel", 4, False, np.random.default_rng(0))
    _, kernels, _ = lut_tensors.find_lut_kernels(model)
    _, info = split.split_model(model, {"fc": [10, 10]})
    parts = split.split_kernels(kernels, info)
    fc = [k for k in parts if k.layer.startswith("fc_part")]
    assert [k.array.shape for k in fc] == [(24, 10), (24, 10)]
    assert all(k.num_values == 4 for k in fc)
    np.testing.assert_array_equal(
        np.concatenate([k.array for k in fc], axis=-1),
        model.get_layer("fc").kernel.numpy(),
    )


def test_depthwise_is_left_alone_with_a_reason():
    inp = keras.Input((6, 6, 4))
    layer = keras.layers.DepthwiseConv2D(3, name="dw")
    keras.Model(inp, layer(inp))
    ok, why = split.splittable(layer)
    assert not ok and "DepthwiseConv2D" in why


# -- Split exports on TFLM ---------------------------------------------------


def lut_model(kind, seed=0):
    """A small model with one LUT layer 'lut' (K=4 per tensor).

    Its kernel decodes to 256 B (dense) or 288 B (conv2d) per output
    channel: groups of a few channels still pay for their DECODE op.
    """
    rng = np.random.default_rng(seed)
    if kind == "dense":
        inp = keras.Input((256,))
        x = keras.layers.Dense(64, activation="relu", name="lut")(inp)
    else:
        inp = keras.Input((6, 6, 32))
        x = keras.layers.Conv2D(24, 3, activation="relu", name="lut")(inp)
        x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    set_lut(model.get_layer("lut"), "kernel", 4, False, rng)
    data = rng.normal(size=(48,) + tuple(inp.shape[1:])).astype(np.float32)
    return model, data


@pytest.mark.slow
@pytest.mark.parametrize("kind,limit,groups", [
    ("dense", 8192, 2),     # 256 B per channel, 64 channels
    ("dense", 1280, 13),    # more than 10 groups: a tree of CONCATENATIONs
    ("conv2d", 3456, 2),    # 288 B per channel, 24 channels
    ("conv2d", 576, 12),
])
def test_split_export_bit_exact_on_tflm(tmp_path, kind, limit, groups):
    model, data = lut_model(kind)
    path = tmp_path / "m.tflite"
    result = tflite_export.export(
        model, path, representative_data=data, max_decode_bytes=limit,
        weight_quantization="per_tensor",
    )
    ram = result.ram
    (lut,) = [c for c in ram.choices if c.layer == "lut"]
    assert lut.choice == "split" and lut.groups == groups
    assert result.verification.bit_exact
    assert result.decode_buffer_bytes <= limit < ram.unsplit_decode_buffer_bytes
    assert sum(t.layer.startswith("lut_part") for t in result.compressed_tensors) == groups
    assert decode_op_count(path) == len(result.compressed_tensors)
    # Independently: the written file against the converter's int8 file of
    # the same split Keras model (per-tensor weights: no requantisation).
    channel_bytes = {"dense": 256, "conv2d": 288}[kind]
    channels = model.get_layer("lut").kernel.shape[-1]
    twin_model, _ = split.split_model(
        model, {"lut": split.group_sizes(channels, channel_bytes, limit)}
    )
    twin = convert.convert(twin_model, "int8", [data], weight_quantization="per_tensor")
    with open(path, "rb") as f:
        written = f.read()
    raw, real, _ = verify_lib.run_tflm_all(written, [data], 1 << 20)
    twin_raw, _, _ = verify_lib.run_tflm_all(twin, [data], 1 << 20)
    np.testing.assert_array_equal(raw[0], twin_raw[0])
    # And it computes what the unsplit Keras model does.
    expected = model.predict(data, verbose=0)
    got = real[0].reshape(expected.shape)
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.9
    assert ram.size_bytes == os.path.getsize(path)
    assert "RAM under max_decode_bytes" in str(result)


@pytest.mark.slow
def test_split_with_batch_norm_and_shared_tables_bit_exact(tmp_path):
    model = _dense_bn_model(inputs=128)
    set_lut(model.get_layer("fc"), "kernel", 4, False, np.random.default_rng(0))
    data = np.random.default_rng(2).normal(size=(48, 128)).astype(np.float32)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data,
        max_decode_bytes=1024, shared_tables=True,
    )
    parts = [t for t in result.compressed_tensors if t.layer.startswith("fc_part")]
    # 128 B per channel: 7, 7 and 6 channels; the folded batch norm gives
    # per-channel scales, which the shared table absorbs.
    assert len(parts) == 3
    assert all(t.table_mode.startswith("shared") for t in parts)
    assert result.verification.bit_exact
    assert result.verification.top1_agreement >= 0.9


@pytest.mark.slow
def test_depthwise_over_the_limit_stays_int8_with_a_note(tmp_path):
    rng = np.random.default_rng(0)
    inp = keras.Input((6, 6, 32))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=4, name="dw")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(x))
    set_lut(model.get_layer("dw"), "kernel", 4, False, rng)  # Keras 3 name
    data = rng.normal(size=(32, 6, 6, 32)).astype(np.float32)
    # The depthwise kernel decodes to 3 x 3 x 128 = 1152 B.
    result = tflite_export.export(model, tmp_path / "m.tflite",
                                  representative_data=data, max_decode_bytes=512)
    (dw,) = [t for t in result.tensors if t.layer == "dw"]
    assert not dw.compressed and "DepthwiseConv2D is not split" in dw.note
    (choice,) = [c for c in result.ram.choices if c.layer == "dw"]
    assert choice.choice == "int8"
    assert result.decode_buffer_bytes <= 512


@pytest.mark.slow
def test_limit_above_every_decoded_kernel_writes_the_unsplit_file(tmp_path):
    # Fuzz seed 106: with nothing to split, the report raised UnboundLocalError.
    model, data = lut_model("dense")  # 'lut' decodes to 64 x 256 = 16,384 B
    plain = tflite_export.export(model, tmp_path / "plain.tflite",
                                 representative_data=data)
    limited = tflite_export.export(model, tmp_path / "limited.tflite",
                                   representative_data=data, max_decode_bytes=20000)
    assert limited.verification.bit_exact
    assert limited.ram.concat_ops == {}
    assert all(c.choice != "split" for c in limited.ram.choices)
    assert limited.decode_buffer_bytes == plain.decode_buffer_bytes <= 20000
    with open(tmp_path / "plain.tflite", "rb") as a, \
            open(tmp_path / "limited.tflite", "rb") as b:
        assert a.read() == b.read()


def _tiny_lut_model(kind):
    """Two-bit (K=4 per tensor) models whose layer to split is small.

    dense: 64 -> Dense 'h' (40) -> Dense 'two', 64 B per output channel of
    h; conv: Conv2D 'conv' (4 -> 16, 3x3: 36 B per channel) -> depthwise
    -> pooling -> Dense. Unsplit, each kernel compresses with a gain.
    """
    rng = np.random.default_rng(0)
    if kind == "dense":
        inp = keras.Input((64,))
        x = keras.layers.Dense(40, activation="relu", name="h")(inp)
        out = keras.layers.Dense(2, name="two")(x)
        layers = ["h", "two"]
    else:
        inp = keras.Input((8, 8, 4))
        x = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inp)
        x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        out = keras.layers.Dense(2, name="two")(x)
        layers = ["conv", "two"]
    model = keras.Model(inp, out)
    for name in layers:
        set_lut(model.get_layer(name), "kernel", 4, False, rng)
    data = rng.normal(size=(32,) + tuple(inp.shape[1:])).astype(np.float32)
    return model, data


@pytest.mark.slow
@pytest.mark.parametrize("kind,limit,layer,free_ops", [
    ("dense", 64, "h", False),    # 40 one-channel groups, none compressible
    ("conv", 256, "conv", False),  # 3 groups: one saves ~14 B, ops cost more
    # Extra ops priced at 0 B, so the estimate admits the split; the built
    # file then shows it saves nothing: the groups come out uncompressed
    # (conv), or the file is larger than with the layer int8 (dense).
    ("dense", 256, "h", True),
    ("conv", 256, "conv", True),
])
def test_split_that_saves_nothing_is_not_made(tmp_path, monkeypatch, kind, limit,
                                              layer, free_ops):
    from tflite_export.ram import ram_budget

    if free_ops:
        monkeypatch.setattr(ram_budget, "GROUP_FILE_BYTES", 0)
    model, data = _tiny_lut_model(kind)
    path = tmp_path / "m.tflite"
    result = tflite_export.export(model, path, representative_data=data,
                                  max_decode_bytes=limit)
    ram = result.ram
    assert ram.unsplit_decode_buffer_bytes > limit  # compressed when unsplit
    (choice,) = [c for c in ram.choices if c.layer == layer]
    assert choice.choice == "int8" and choice.groups == 0
    assert not any(t.layer.startswith(f"{layer}_part") for t in result.tensors)
    assert ram.concat_ops == {}
    (tensor,) = [t for t in result.tensors if t.layer == layer]
    assert not tensor.compressed
    assert f"kept int8: decodes to {choice.decoded_bytes} B > max_decode_bytes={limit}" \
        in tensor.note
    # No group ops: the arena is the int8 model's, the file has no DECODE.
    assert result.arena_bytes <= ram.int8_arena_bytes
    assert result.decode_buffer_bytes == 0 and decode_op_count(path) == 0
    assert result.size_bytes == result.slim_baseline_bytes == os.path.getsize(path)
    assert f"{layer} ({choice.op}): kept int8: decodes to" in str(result)
    assert result.verification.bit_exact


# -- The RAM budget chooser --------------------------------------------------


@pytest.mark.slow
def test_ram_bytes_fits_the_budget_with_a_small_file(tmp_path):
    model, data = lut_model("dense")
    # A budget between the int8 arena and the unsplit compressed arena.
    unsplit = tflite_export.export(
        model, tmp_path / "u.tflite", representative_data=data,
        weight_quantization="per_tensor",
    )
    budget = unsplit.baseline_arena_bytes + 8192
    assert unsplit.arena_bytes > budget
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, ram_bytes=budget,
        weight_quantization="per_tensor",
    )
    assert result.arena_bytes <= budget
    assert result.ram.limit < unsplit.decode_buffer_bytes
    (lut,) = [c for c in result.ram.choices if c.layer == "lut"]
    assert lut.choice == "split" and "arena" in lut.reason
    assert result.verification.bit_exact
    assert result.size_bytes < result.slim_baseline_bytes
    # Too tight for any split (each group op costs arena too): kept int8.
    tight = tflite_export.export(
        model, tmp_path / "t.tflite", representative_data=data,
        ram_bytes=unsplit.baseline_arena_bytes + 1024,
        weight_quantization="per_tensor",
    )
    assert tight.arena_bytes <= unsplit.baseline_arena_bytes + 1024
    (lut,) = [c for c in tight.ram.choices if c.layer == "lut"]
    assert lut.choice == "int8" and not tight.compressed_tensors


@pytest.mark.slow
def test_ram_bytes_tries_plans_a_pessimistic_estimate_rules_out(tmp_path, monkeypatch):
    from tflite_export.ram import ram_budget

    model, data = lut_model("dense")
    unsplit = tflite_export.export(
        model, tmp_path / "u.tflite", representative_data=data,
        weight_quantization="per_tensor",
    )
    budget = unsplit.baseline_arena_bytes + 8192
    # Every group op estimated far above its real cost: no split "fits" the
    # estimate, so only the plans whose decode buffer alone fits find one.
    monkeypatch.setattr(ram_budget, "GROUP_OP_BYTES", 1 << 20)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data, ram_bytes=budget,
        weight_quantization="per_tensor",
    )
    assert result.arena_bytes <= budget and result.verification.bit_exact
    (lut,) = [c for c in result.ram.choices if c.layer == "lut"]
    assert lut.choice == "split"


# -- Bad input: clear errors, nothing written --------------------------------


@pytest.mark.parametrize("argument,value,error,match", [
    ("max_decode_bytes", "32KB", TypeError, r"max_decode_bytes must be an int number of bytes"),
    ("max_decode_bytes", 32.0, TypeError, r"max_decode_bytes .* \(float\)"),
    ("ram_bytes", 0, ValueError, r"ram_bytes must be >= 1"),
    ("ram_bytes", True, TypeError, r"ram_bytes must be an int"),
])
def test_budget_of_wrong_type_or_unit(tmp_path, argument, value, error, match):
    model, data = lut_model("dense")
    with pytest.raises(error, match=match):
        tflite_export.export(model, tmp_path / "m.tflite",
                             representative_data=data, **{argument: value})
    assert os.listdir(tmp_path) == []


def test_both_budgets_refused(tmp_path):
    model, data = lut_model("dense")
    with pytest.raises(ValueError, match="max_decode_bytes or ram_bytes, not both"):
        tflite_export.export(model, tmp_path / "m.tflite", representative_data=data,
                             max_decode_bytes=1024, ram_bytes=65536)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_decode_limit_below_one_channel_names_layer_and_minimum(tmp_path):
    model, data = lut_model("dense")
    with pytest.raises(ValueError, match=r"layer 'lut' \(FULLY_CONNECTED, 256 B\).*>= 256"):
        tflite_export.export(model, tmp_path / "m.tflite",
                             representative_data=data, max_decode_bytes=32)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_ram_budget_below_int8_arena_names_the_minimum(tmp_path):
    model, data = lut_model("dense")
    with pytest.raises(ValueError, match=r"ram_bytes=64 is below (\d+) B.*>= \1"):
        tflite_export.export(model, tmp_path / "m.tflite",
                             representative_data=data, ram_bytes=64)
    assert os.listdir(tmp_path) == []


# -- Command line ------------------------------------------------------------


@pytest.mark.slow
def test_cli_max_decode_bytes_and_bad_budget(tmp_path):
    # In this process: tests/tflite_export/test_export_cli.py runs the entry point itself.
    model, data = lut_model("dense")
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "data.npy", data)

    def run(*args):
        return run_cli("model.keras", "--representative", "data.npy", *args, cwd=tmp_path)

    proc = run("--out", "m.tflite", "--max_decode_bytes", "8192")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAM under max_decode_bytes=8192" in proc.stdout
    assert "lut (FULLY_CONNECTED): split" in proc.stdout
    proc = run("--out", "bad.tflite", "--ram_bytes", "32KB")
    assert proc.returncode != 0 and "ram_bytes" in proc.stderr
    assert not (tmp_path / "bad.tflite").exists()


# -- The digits CNN under the RAM target (CI) ------------------------


@pytest.mark.slow
def test_digits_cnn_2_bits_under_4_kb_decode_limit_and_5_kb_budget(tmp_path):
    from experiments import datasets
    from experiments import models
    import lutq_tf

    (x, _), _ = datasets.load_digits()
    model = lutq_tf.quantize_model(models.digits_cnn(), bits=2)
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=x[:100],
        max_decode_bytes=4096,
    )
    ram = result.ram
    assert result.verification.bit_exact
    assert ram.decode_buffer_bytes <= 4096 < ram.unsplit_decode_buffer_bytes
    assert {c.layer for c in ram.choices if c.choice == "split"} == {"fc1", "conv2"}
    # Beyond the split twin, the arena grows by the decode buffer and at
    # most TFLM's state of each DECODE op.
    decodes = decode_op_count(tmp_path / "m.tflite")
    assert ram.arena_bytes <= ram.twin_arena_bytes + ram.decode_buffer_bytes + 198 * decodes
    # The budget, int8 arena + 5 KB, as ram_bytes: met, and the
    # file is still smaller than the int8 one.
    budget = ram.int8_arena_bytes + 5 * 1024
    chosen = tflite_export.export(
        model, tmp_path / "r.tflite", representative_data=x[:100], ram_bytes=budget,
    )
    assert chosen.arena_bytes <= budget
    assert chosen.verification.bit_exact
    assert chosen.size_bytes < chosen.slim_baseline_bytes
