"""`lutq_tf.callbacks`: schedules do what they say, figures are right,
TensorBoard gets each layer's dictionary."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import lutq_tf
from lutq_tf import callbacks as cb

L = keras.layers
BATCH = 16


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 12)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int32")


def _float_model():
    return keras.Sequential([keras.Input((12,)),
                             L.Dense(16, activation="relu", name="a"),
                             L.Dense(2, name="b")])


def _model(**options):
    model = lutq_tf.quantize_model(_float_model(), bits=2, **options)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def _state(model):
    """`{layer: (d, A)}` copies."""
    return {layer.name: tuple(v.copy() for v in
                              layer.quantized_tensors["kernel"][:2])
            for layer in lutq_tf.lutq_layers(model)}


def _assert_same(a, b, same=True):
    for name in a:
        equal = all(np.array_equal(u, v) for u, v in zip(a[name], b[name]))
        assert equal == same, name


class _Record(keras.callbacks.Callback):
    """Calls `measure(model)` after every batch."""

    def __init__(self, measure):
        super().__init__()
        self.measure = measure
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        self.values.append(self.measure(self.model))


def _fit(model, callbacks, epochs=1, n=64):
    x, y = _data(n)
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False,
                     verbose=0, callbacks=callbacks)


def test_warmup_skips_the_first_kmeans_steps():
    model = _model()
    start = _state(model)
    record = _Record(_state)
    _fit(model, [cb.KMeansWarmup(steps=2), record])  # 4 steps
    _assert_same(record.values[0], start)
    _assert_same(record.values[1], start)
    _assert_same(record.values[2], start, same=False)  # step 3 ran k-means
    # Cleared at the end of fit: a later fit runs its k-means steps.
    for layer in lutq_tf.lutq_layers(model):
        assert not layer.kmeans_pauses


def test_warmup_counts_optimizer_steps_across_fits():
    model = _model()
    _fit(model, [cb.KMeansWarmup(steps=3)], n=32)  # steps 1, 2
    start = _state(model)
    record = _Record(_state)
    _fit(model, [cb.KMeansWarmup(steps=3), record], n=32)  # steps 3, 4
    _assert_same(record.values[0], start)
    _assert_same(record.values[1], start, same=False)


def test_freeze_keeps_dictionaries_and_assignments_in_the_final_epochs():
    model = _model()
    record = _Record(_state)
    _fit(model, [cb.FreezeDictionaries(epochs=1), record], epochs=2)
    first, second = record.values[:4], record.values[4:]
    _assert_same(first[0], first[-1], same=False)  # epoch 1 trained d, A
    for state in second:
        _assert_same(state, first[-1])
    # W kept training; d[A] no longer follows it.
    for layer in lutq_tf.lutq_layers(model):
        d, a, q = layer.quantized_tensors["kernel"]
        np.testing.assert_array_equal(q, d.ravel()[a])


def test_pauses_add_up_and_reach_self_driven_layers():
    model = keras.Sequential([keras.Input((12,)), lutq_tf.LUTQWrapper(
        L.Dense(2, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model(_data()[0])
    start = _state(model)
    warmup = cb.KMeansWarmup(steps=1)
    record = _Record(_state)
    # Warm-up for step 1, frozen for the whole (1-epoch) fit: no step runs.
    _fit(model, [warmup, cb.FreezeDictionaries(epochs=1), record])
    for state in record.values:
        _assert_same(state, start)


class _Raise(keras.callbacks.Callback):
    """Raises `error` at the end of batch `batch` (0-based)."""

    def __init__(self, error, batch=1):
        super().__init__()
        self.error, self.batch = error, batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise self.error


def _kmeans_moves(model, callbacks=()):
    """Fits 2 steps; per step, whether d or A moved."""
    states = [_state(model)]
    record = _Record(_state)
    _fit(model, [*callbacks, record], n=32)
    states += record.values
    return [any(not np.array_equal(u, v)
                for name in a for u, v in zip(a[name], b[name]))
            for a, b in zip(states, states[1:])]


def _kmeans_runs_at_each_step(model, callbacks=()):
    return all(_kmeans_moves(model, callbacks))


def _aborted_fits(model):
    """`(error, fit)` pairs: fits that raise in the middle of a pause."""
    x, y = _data()

    def batches():
        # Keras reads one batch ahead: the error comes inside a train step.
        yield from ((x[:BATCH], y[:BATCH]) for _ in range(3))
        raise OSError("the data went away")

    return (
        # An exception, then Ctrl-C, raised by a callback mid-pause...
        (RuntimeError, lambda: _fit(model, [
            cb.KMeansWarmup(steps=100), _Raise(RuntimeError())])),
        (KeyboardInterrupt, lambda: _fit(model, [
            cb.FreezeDictionaries(epochs=1), _Raise(KeyboardInterrupt())])),
        # ... and by the data.
        (Exception, lambda: model.fit(
            batches(), steps_per_epoch=8, verbose=0, shuffle=False,
            callbacks=[cb.KMeansWarmup(steps=100)])))


def test_a_pause_ends_with_a_fit_that_raises():
    model = _model()
    for error, fit in _aborted_fits(model):
        with pytest.raises(error):
            fit()
        # The next fit, without the schedule, runs its k-means steps.
        assert _kmeans_runs_at_each_step(model), error


def test_a_pause_set_before_fit_outlives_it_until_resumed():
    model = _model()
    layers = lutq_tf.lutq_layers(model)
    for layer in layers:
        layer.pause_kmeans("mine")
    with pytest.raises(RuntimeError):
        _fit(model, [cb.KMeansWarmup(steps=1), _Raise(RuntimeError())])
    assert not _kmeans_runs_at_each_step(model)
    for layer in layers:
        assert layer.kmeans_pauses == {"mine"}
        layer.resume_kmeans("mine")
    assert _kmeans_runs_at_each_step(model)


def _plain_model():
    """A plain keras.Sequential whose LUT-Q layer drives its own steps."""
    model = keras.Sequential([keras.Input((12,)), lutq_tf.LUTQWrapper(
        L.Dense(2, name="b"), lutq_tf.LUTQuantizer(bits=2))])
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model(_data()[0])
    return model


def test_on_a_plain_model_a_pause_ends_with_a_fit_that_raises():
    # Keras' own fit has no `finally`: the schedules pause one step at a
    # time, and the step ends the pause.
    model = _plain_model()
    for error, fit in _aborted_fits(model):
        with pytest.raises(error):
            fit()
        assert _kmeans_runs_at_each_step(model), error


def test_on_a_plain_model_the_schedules_still_pause():
    model = _plain_model()
    assert not any(_kmeans_moves(model, [cb.KMeansWarmup(steps=100)]))
    assert not any(_kmeans_moves(model, [cb.FreezeDictionaries(epochs=1)]))
    assert _kmeans_runs_at_each_step(model)


def test_figures_end_with_a_fit_that_raises():
    model = _model()
    with pytest.raises(RuntimeError):
        _fit(model, [cb.QuantizationFigures(every=1), _Raise(RuntimeError())])
    assert sorted(_fit(model, []).history) == ["loss"]


@pytest.mark.slow
def test_pruning_ramp():
    model = _model(prune_rate=0.5)
    layer = model.get_layer("a")  # 192 weights, one table

    def pruned(model):
        return int(np.sum(layer.quantized_tensors["kernel"][1] == 0))

    assert pruned(model) == 96  # quantize_model prunes at the target
    record = _Record(pruned)
    begin = []
    at_begin = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: begin.append(pruned(model)))
    ramp = cb.PruningRamp(steps=4, power=1, frequency=2)
    _fit(model, [ramp, at_begin, record], n=96)  # 6 steps
    # At fit's start one k-means step at rate 0: nothing pruned. Then
    # steps 1..6 take the rate of steps 0, 2, 2, 4, 4, 6 (every 2nd).
    assert begin == [0]
    assert record.values == [0, 48, 48, 96, 96, 96]
    # Pruned weights are the smallest |W|, and their entry is exactly 0.
    d, a, _ = layer.quantized_tensors["kernel"]
    w = np.abs(layer.layer.kernel.numpy())
    assert d[0, 0] == 0
    assert w[a == 0].max() <= w[a != 0].min()


def test_pruning_ramp_shape():
    cubic = cb.PruningRamp(steps=10, begin_step=5)
    linear = cb.PruningRamp(steps=10, begin_step=5, power=1)
    for ramp in (cubic, linear):
        assert ramp.rate_fraction(0) == ramp.rate_fraction(5) == 0
        assert ramp.rate_fraction(15) == ramp.rate_fraction(99) == 1
    assert linear.rate_fraction(10) == 0.5
    assert cubic.rate_fraction(10) == 1 - 0.5**3  # fast early


def test_schedules_refuse_bad_input_and_unfit_models():
    for make, match in (
            (lambda: cb.KMeansWarmup(steps=0), "KMeansWarmup: steps must"),
            (lambda: cb.FreezeDictionaries(epochs=1.5),
             "FreezeDictionaries: epochs must"),
            (lambda: cb.PruningRamp(steps=10, power=0), "power must be"),
            (lambda: cb.QuantizationFigures(every="often"), "every must")):
        with pytest.raises((TypeError, ValueError), match=match):
            make()
    with pytest.raises(ValueError, match="PruningRamp: no LUT-Q layer of "
                                         "model .* prunes.*prune_rate"):
        _fit(_model(), [cb.PruningRamp(steps=4)])
    float_model = _float_model()
    float_model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="KMeansWarmup: model .* has no "
                                         "LUT-Q layers.*quantize_model"):
        _fit(float_model, [cb.KMeansWarmup(steps=2)])


def _figures(model):
    """(mean |W - d[A]|, A) over every LUT-Q weight, now."""
    errors, assignments = [], []
    for layer in lutq_tf.lutq_layers(model):
        _, a, q = layer.quantized_tensors["kernel"]
        errors.append(np.abs(layer.layer.kernel.numpy() - q).ravel())
        assignments.append(a.ravel())
    return np.concatenate(errors).mean(), np.concatenate(assignments)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_figures_are_the_last_steps(jit_compile):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=model.loss,
                  jit_compile=jit_compile)
    record = _Record(_figures)
    step_logs = []
    logger = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: step_logs.append(dict(logs)))
    previous = [_figures(model)[1]]
    history = _fit(model, [cb.QuantizationFigures(every=1), record, logger])
    assert {"quantization_error", "assignments_changed"} <= set(step_logs[0])
    previous += [a for _, a in record.values]
    for t, (error, assignment) in enumerate(record.values):
        np.testing.assert_allclose(step_logs[t]["quantization_error"], error,
                                   rtol=1e-5)
        np.testing.assert_allclose(step_logs[t]["assignments_changed"],
                                   np.mean(assignment != previous[t]))
    assert any(log["assignments_changed"] > 0 for log in step_logs)
    assert history.history["quantization_error"][-1] == pytest.approx(
        record.values[-1][0], rel=1e-5)
    # The next fit without the callback logs as before.
    history = _fit(model, [])
    assert sorted(history.history) == ["loss"]


def test_figures_are_measured_every_n_kmeans_steps():
    model = _model(kmeans_every=2)
    record = _Record(_figures)
    step_logs = []
    logger = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: step_logs.append(dict(logs)))
    # 8 steps: k-means at 2, 4, 6, 8; measured at its 1st and 3rd (2, 6).
    _fit(model, [cb.QuantizationFigures(every=2), record, logger], n=128)
    errors = [log["quantization_error"] for log in step_logs]
    assert errors[0] == 0  # nothing measured yet
    for t in (1, 2, 3, 4):
        assert errors[t] == pytest.approx(record.values[1][0], rel=1e-5)
    for t in (5, 6, 7):
        assert errors[t] == pytest.approx(record.values[5][0], rel=1e-5)
    assert errors[5] != errors[4]


def test_figures_when_frozen_show_no_changes():
    model = _model()
    history = _fit(model, [cb.QuantizationFigures(every=1),
                           cb.FreezeDictionaries(epochs=1)])
    assert history.history["assignments_changed"] == [0.0]
    assert history.history["quantization_error"][0] > 0


def test_figures_need_a_lutq_train_step():
    model = keras.Sequential([keras.Input((12,)), lutq_tf.LUTQWrapper(
        L.Dense(2, name="b"))])
    model.compile("sgd", "mse")
    with pytest.raises(TypeError, match="QuantizationFigures: model .* "
                                         "has no LUT-Q train step"):
        _fit(model, [cb.QuantizationFigures()])


def test_tensorboard_writes_dictionaries_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    model = _model(overrides={"b": {"per_channel": True}})
    _fit(model, [cb.DictionaryTensorBoard(str(tmp_path))], epochs=2)
    events = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    for layer in ("a", "b"):
        for name in ("weights", "quantized", "dictionary"):
            assert f"{layer}/kernel/{name}" in tags
    # Per-tensor "a" gets one scalar per entry, per-channel "b" none.
    d = model.get_layer("a").quantized_tensors["kernel"][0]
    for k in range(4):
        values = events.Tensors(f"a/kernel/dictionary/{k}")
        assert [v.step for v in values] == [0, 1]
        assert tf.make_ndarray(values[-1].tensor_proto) == pytest.approx(
            d[k, 0])
    assert not [t for t in tags if t.startswith("b/kernel/dictionary/")]


def test_tensorboard_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install "
                                          r"'lutq-tf\[tensorboard\]'"):
        cb.DictionaryTensorBoard(os.devnull)
