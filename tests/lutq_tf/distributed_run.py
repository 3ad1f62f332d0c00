"""Runs LUT-Q training under tf.distribute, for `tests/lutq_tf/test_distributed.py`.

Each mode runs in its own process (logical devices and the multi-worker
runtime must be configured before TensorFlow initialises), trains the same
LUT-Q MLP on the same data with a global batch of 32 for 20 steps (4 epochs
of the same 5 batches), and saves what the test compares to an `.npz` file:

    python tests/lutq_tf/distributed_run.py reference OUT.npz
    python tests/lutq_tf/distributed_run.py mirrored OUT.npz WORKDIR
    python tests/lutq_tf/distributed_run.py worker INDEX PORT0,PORT1 OUT.npz WORKDIR

`mirrored` splits the CPU into 2 logical devices and uses MirroredStrategy;
`worker` is one of 2 MultiWorkerMirroredStrategy processes on localhost.
All log `lutq_tf.callbacks.QuantizationFigures` (saved as `figure_*`).
Both also check a `.keras` checkpoint round trip (saved as `loaded_*`) and
a `keras.callbacks.BackupAndRestore` resume (saved as `resumed_*`, to match
the uninterrupted training).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

GLOBAL_BATCH = 32
STEPS = 20
EPOCHS = 4  # of STEPS // EPOCHS steps: BackupAndRestore resumes an epoch


def _setup(mode, args):
    """Configures devices / the cluster; returns the strategy or None."""
    import tensorflow as tf

    if mode == "reference":
        return None
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    index, ports = int(args[0]), args[1].split(",")
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    return tf.distribute.MultiWorkerMirroredStrategy()


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 24)).astype("float32")
    y = ((x[:, :6].sum(axis=1) > 0).astype("int32")
         + (x[:, 6] > 0.5).astype("int32"))
    return x, y


def _dataset(batches=None):
    """The data in global batches; the first `batches` of them if given."""
    import tensorflow as tf

    x, y = _data()
    if batches is not None:
        x, y = x[:batches * GLOBAL_BATCH], y[:batches * GLOBAL_BATCH]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    # Each worker takes every other per-replica batch: the global batches
    # are those of single-device training.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


def _model():
    """A LUT-Q MLP (no BatchNormalization), identical in every process."""
    import keras
    import numpy as np

    import lutq_tf

    L = keras.layers
    model = keras.Sequential([keras.Input((24,)),
                              L.Dense(64, activation="relu", name="fc1"),
                              L.Dense(3, name="fc2")])
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    quantized = lutq_tf.quantize_model(
        model, bits=3, overrides={"fc2": {"per_channel": True}})
    quantized.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return quantized


class _Interrupt(Exception):
    pass


def _state(model, strategy, prefix):
    """`{name: array}` of W, d, A per LUT-Q layer; per replica if any."""
    import lutq_tf

    out = {}
    for layer in lutq_tf.lutq_layers(model):
        state = layer.tensor_states[0]
        for name, variable in (("W", state.variable),
                               ("d", state.dictionary),
                               ("A", state.assignment)):
            out[f"{prefix}{layer.name}_{name}"] = variable.numpy()
            if strategy is not None and prefix == "":
                replicas = strategy.experimental_local_results(
                    variable.value)
                for r, value in enumerate(replicas):
                    out[f"replica{r}_{layer.name}_{name}"] = value.numpy()
    return out


def _train(strategy, workdir):
    import contextlib

    import keras
    import numpy as np

    import lutq_tf

    # Every epoch reads the same batches, so that the BackupAndRestore run
    # below (which restores the weights and the epoch, not a data
    # iterator's position) can resume this training exactly.
    steps = STEPS // EPOCHS

    def run(callbacks):
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = _model()
        history = model.fit(_dataset(steps), epochs=EPOCHS, verbose=0,
                            callbacks=callbacks)
        return model, history

    model, history = run([lutq_tf.callbacks.QuantizationFigures(every=1)])
    out = _state(model, strategy, "")
    # The figures as logged, and the error recomputed from the state.
    for key in ("quantization_error", "assignments_changed"):
        out[f"figure_{key}"] = np.float32(history.history[key][-1])
    errors = [np.abs(s.variable.numpy() - s.quantized.numpy()).ravel()
              for layer in lutq_tf.lutq_layers(model)
              for s in layer.tensor_states]
    out["state_quantization_error"] = np.concatenate(errors).mean()
    out["loss"] = np.float32(model.evaluate(_dataset(), verbose=0))
    if workdir is None:
        return out

    # A .keras checkpoint saved under the strategy loads into it again.
    path = os.path.join(workdir, "model.keras")
    model.save(path)
    with strategy.scope():
        loaded = keras.saving.load_model(path)
    out.update(_state(loaded, strategy, "loaded_"))

    # BackupAndRestore: interrupted after 2 of 4 epochs, then resumed; the
    # test compares it with the uninterrupted training above.
    backup = os.path.join(workdir, "backup")

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise _Interrupt()

    try:
        run([keras.callbacks.BackupAndRestore(backup), Stop()])
        raise AssertionError("not interrupted")
    except _Interrupt:
        pass
    resumed, _ = run([keras.callbacks.BackupAndRestore(backup)])
    assert int(resumed.optimizer.iterations.numpy()) == STEPS
    out.update(_state(resumed, strategy, "resumed_"))
    assert lutq_tf.lutq_layers(resumed)
    return out


def main(argv):
    mode = argv[1]
    strategy = _setup(mode, argv[2:4] if mode == "worker" else ())
    import numpy as np

    if mode == "reference":
        out_path, workdir = argv[2], None
    elif mode == "mirrored":
        out_path, workdir = argv[2], argv[3]
    else:
        out_path, workdir = argv[4], argv[5]
    import keras

    # Full tracebacks: the test shows this process's output on failure.
    keras.config.disable_traceback_filtering()
    out = _train(strategy, workdir)
    if strategy is not None:
        out["replicas"] = np.int32(strategy.num_replicas_in_sync)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv)
