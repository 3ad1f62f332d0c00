"""Export of the models users bring: several inputs and outputs, integer
inputs, subclassed models; and inputs that would verify nothing.
"""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from test_export import set_lut

import tflite_export
from tflite_export.pipeline import convert
from tflite_export.pipeline import verify as verify_lib


def _two_in_two_out(seed=0):
    """Inputs named so that the converter's order is not Keras' (both (8,),
    so a swap would pass any shape check), outputs of the same shape."""
    rng = np.random.default_rng(seed)
    a = keras.Input((8,), name="zeta")
    b = keras.Input((8,), name="alpha")
    x = keras.layers.Concatenate()([
        keras.layers.Dense(32, activation="relu", name="fa")(a),
        keras.layers.Dense(32, activation="relu", name="fb")(b),
    ])
    first = keras.layers.Dense(4, activation="softmax", name="cls")(x)
    second = keras.layers.Dense(4, name="reg")(x)
    model = keras.Model([a, b], [first, second])
    for name in ("fa", "fb"):
        set_lut(model.get_layer(name), "kernel", 4, False, rng)
    data = [rng.normal(size=(24, 8)).astype("float32"),
            3.0 + rng.normal(size=(24, 8)).astype("float32")]
    return model, data


def _io_names(path):
    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    return model.subgraphs[0]


@pytest.mark.slow
def test_two_inputs_two_outputs_in_keras_order(tmp_path):
    model, data = _two_in_two_out()
    result = tflite_export.export(
        model, tmp_path / "m.tflite", representative_data=data,
        slim=False, shared_tables=False,
    )
    subgraph = _io_names(result.path)
    names = [subgraph.tensors[i].name.decode() for i in subgraph.inputs]
    assert names == ["serving_default_zeta:0", "serving_default_alpha:0"]
    verification = result.verification
    assert [o.name for o in verification.outputs] == ["output_0", "output_1"]
    assert verification.outputs[0].task == "classification"
    assert verification.outputs[1].task == "regression"
    assert "output_1:" in verification.describe()
    # TFLM outputs in Keras order, close to Keras; swapped inputs are not.
    keras_out = model.predict(data, verbose=0)
    tflm_out = tflite_export.tflm_predict(result.path, data, result.arena_bytes)
    assert len(tflm_out) == 2
    for got, expected in zip(tflm_out, keras_out):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 0.1
    swapped = tflite_export.tflm_predict(result.path, data[::-1], result.arena_bytes)
    assert np.abs(swapped[1] - keras_out[1]).max() > 0.2
    accuracy = tflite_export.tflm_accuracy(
        result.path, data, keras_out[0].argmax(-1), result.arena_bytes
    )
    assert accuracy >= 0.8
    # A dict by input name is the same data.
    by_name = tflite_export.export(
        model, tmp_path / "d.tflite",
        representative_data={"alpha": data[1], "zeta": data[0]},
        slim=False, shared_tables=False,
    )
    with open(result.path, "rb") as f, open(by_name.path, "rb") as g:
        assert f.read() == g.read()


@pytest.mark.slow
def test_multi_io_slim_probe_reads_every_output(tmp_path):
    model, data = _two_in_two_out(1)
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    assert result.slim_steps  # slimming kept: every output bit-identical
    with open(result.path, "rb") as f:
        model_bytes = f.read()
    one = verify_lib.probe_outputs(model_bytes, samples=2)
    # Two outputs of 4 int8 values per sample.
    assert len(one) == 2 * 2 * 4


def test_representative_data_for_several_inputs_names_the_form():
    model, data = _two_in_two_out()
    with pytest.raises(ValueError, match=r"holds 1 arrays.*2 inputs.*list of 2 arrays"):
        convert.check_representative_data(model, [data[0]], "int8")
    with pytest.raises(ValueError, match=r"keys \['zeta'\].*\['zeta', 'alpha'\]"):
        convert.check_representative_data(model, {"zeta": data[0]}, "int8")
    with pytest.raises(ValueError, match=r"\['alpha'\] has shape \(24, 7\)"):
        convert.check_representative_data(model, [data[0], data[1][:, :7]], "int8")
    with pytest.raises(ValueError, match="same number"):
        convert.check_representative_data(model, [data[0], data[1][:5]], "int8")
    with pytest.raises(ValueError, match=r"zeta: \(N, 8\) float32, alpha"):
        convert.check_representative_data(model, None, "int8")


class GatherIds(keras.layers.Layer):
    """An embedding TFLM can run: GATHER with int32 ids, no SELECT."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(shape=(50, 8), initializer="random_normal")

    def call(self, ids):
        return tf.gather(self.embeddings, ids)


@pytest.mark.slow
def test_integer_inputs_export_and_run(tmp_path):
    rng = np.random.default_rng(0)
    inp = keras.Input((6,), dtype="int32")
    x = keras.layers.Flatten()(GatherIds()(inp))
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(x))
    ids = rng.integers(0, 50, (40, 6)).astype("int32")
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=ids)
    assert result.verification.bit_exact
    got = tflite_export.tflm_predict(result.path, ids, result.arena_bytes)
    assert np.abs(got - model.predict(ids, verbose=0)).max() < 0.02
    with pytest.raises(ValueError, match="must hold integers"):
        tflite_export.export(model, tmp_path / "f.tflite", ids.astype("float32"))


@pytest.mark.slow
def test_keras_embedding_says_what_tflm_lacks_and_what_to_do(tmp_path):
    inp = keras.Input((6,), dtype="int32")
    x = keras.layers.Flatten()(keras.layers.Embedding(50, 8, name="emb")(inp))
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    ids = np.random.default_rng(0).integers(0, 50, (16, 6)).astype("int32")
    with pytest.raises(tflite_export.ExportError,
                       match=r"SELECT(.|\n)*'emb'|emb\).*SELECT.*tf.gather"):
        tflite_export.export(model, tmp_path / "m.tflite", representative_data=ids)
    assert os.listdir(tmp_path) == []


def test_integer_input_without_data_asks_for_it():
    inp = keras.Input((6,), dtype="int32")
    model = keras.Model(inp, keras.layers.Dense(4)(keras.ops.cast(inp, "float32")))
    with pytest.raises(ValueError, match="integer inputs: pass representative_data"):
        convert.check_representative_data(model, None, "float32")


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(32, activation="relu")
        self.head = keras.layers.Dense(10)

    def call(self, x):
        return self.head(self.fc(x))


@pytest.mark.slow
def test_subclassed_model_exports_through_its_traced_call(tmp_path):
    rng = np.random.default_rng(0)
    model = SubclassedNet()
    model(np.zeros((1, 64), "float32"))
    set_lut(model.fc, "kernel", 4, False, rng)
    data = rng.normal(size=(32, 64)).astype("float32")
    result = tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    (fc,) = [t for t in result.tensors if t.compressed]
    assert fc.layer == model.fc.name and fc.codes == 4
    got = tflite_export.tflm_predict(result.path, data, result.arena_bytes)
    assert np.abs(got - model.predict(data, verbose=0)).max() < 0.2
    # float32 without data: the input shape it was built with.
    result = tflite_export.export(model, tmp_path / "f.tflite", quantize="float32")
    assert result.verification.max_abs_diff < 1e-4


def test_unbuilt_subclassed_model_is_refused():
    with pytest.raises(ValueError, match="not built"):
        convert.check_model(SubclassedNet())


def test_constant_representative_data_is_refused(tmp_path):
    model, data = _two_in_two_out()
    with pytest.raises(ValueError, match=r"\['zeta'\] holds one value"):
        convert.check_representative_data(model, [0 * data[0], data[1]], "int8")
    single = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="representative_data holds one value"):
        tflite_export.export(single, tmp_path / "m.tflite", np.zeros((8, 4), "float32"))
    with pytest.warns(UserWarning, match="all 8 samples are identical"):
        convert.check_representative_data(
            single, np.tile(np.arange(4, dtype="float32"), (8, 1)), "int8"
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_verification_notes_a_constant_keras_output(tmp_path):
    # A zero kernel: the output is the bias whatever the input, so agreement
    # with Keras would be 100 % and say nothing.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    kernel, bias = model.get_layer("fc").get_weights()
    model.get_layer("fc").set_weights([0 * kernel, bias + 1.0])
    result = tflite_export.export(model, tmp_path / "m.tflite", quantize="float32")
    assert "same output for every verification input" in result.verification.note
    assert "Note: Keras gives the same output" in str(result)


def test_nan_weight_is_reported_with_its_layer(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    kernel, bias = model.get_layer("fc").get_weights()
    bias[1] = np.nan
    model.get_layer("fc").set_weights([kernel, bias])
    data = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"layer 'fc' weight 'bias' holds 1 NaN or infinite"):
        tflite_export.export(model, tmp_path / "m.tflite", representative_data=data)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_random_inputs_join_the_bit_exact_check(tmp_path):
    model, data = _two_in_two_out(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tflite_export.export(
            model, tmp_path / "m.tflite", representative_data=[d[:3] for d in data],
            max_verify_samples=2,
        )
    assert result.verification.samples == 2
    assert result.verification.checked_inputs == 2 + verify_lib.EXTRA_RANDOM_INPUTS
