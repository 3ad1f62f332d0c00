"""Keras callbacks for LUT-Q training: schedules, figures and TensorBoard.

Schedules act on every LUT-Q layer of the model (`LUTQWrapper`s, also in
models without `LUTQModelMixin`); on a LUT-Q model each changes a layer's
state only when its value changes, so they cost nothing per step (on a
plain `keras.Model`, a pause is renewed before each batch while it holds):

    model.fit(x, y, epochs=5, callbacks=[
        lutq_tf.callbacks.KMeansWarmup(steps=200),
        lutq_tf.callbacks.PruningRamp(steps=2000),
        lutq_tf.callbacks.FreezeDictionaries(epochs=1),
        lutq_tf.callbacks.QuantizationFigures(),
        lutq_tf.callbacks.DictionaryTensorBoard("logs/lutq"),
    ])

Steps count the optimizer's updates (`model.optimizer.iterations`), so a
second `fit` or a `BackupAndRestore` resume continues a schedule. None of
the schedules' state is saved with the model: a loaded model runs its
k-means steps and prunes at its quantizers' rates.
"""

import numbers

import keras
import tensorflow as tf

from lutq_tf.model import LUTQModelMixin
from lutq_tf.model import lutq_layers
from lutq_tf.quantizer import check_int


def _layers(model, who):
    """The model's LUT-Q layers, else a ValueError naming the callback."""
    layers = lutq_layers(model)
    if not layers:
        raise ValueError(
            f"{who}: model '{model.name}' has no LUT-Q layers. Quantise it "
            "first (lutq_tf.quantize_model) or wrap its layers in "
            "lutq_tf.LUTQWrapper."
        )
    return layers


def _iterations(model):
    """The optimizer's update count, read once (a host read)."""
    return int(model.optimizer.iterations.numpy())


class _Pause(keras.callbacks.Callback):
    """Pauses the k-means steps of every LUT-Q layer while `_pause` says.

    Pauses from several callbacks (a warm-up, frozen epochs) add up: a
    layer's steps run when no callback pauses them. A pause never outlives
    its fit. `on_train_end` ends it, but when `fit` raises (Ctrl-C included)
    that never runs: a LUT-Q model's `fit` then ends it in a `finally`.
    Keras' own `fit` (a plain `keras.Model` with LUT-Q layers) has none, so
    there the pause is renewed before each batch and lasts one training
    step (`LUTQWrapper.pause_next_kmeans_step`).
    """

    def set_model(self, model):
        super().set_model(model)
        self._lutq_layers = _layers(model, type(self).__name__)
        self._step_by_step = not isinstance(model, LUTQModelMixin)
        self._pausing = False

    def _pause(self, paused):
        self._pausing = paused
        if self._step_by_step:
            return  # renewed by `on_train_batch_begin`
        # A layer writes its variable only when its pause state changes.
        for layer in self._lutq_layers:
            if paused:
                layer.pause_kmeans(self)
            else:
                layer.resume_kmeans(self)

    def on_train_batch_begin(self, batch, logs=None):
        if self._step_by_step and self._pausing:
            for layer in self._lutq_layers:
                layer.pause_next_kmeans_step()

    def on_train_end(self, logs=None):
        # A later fit without this callback runs the k-means steps.
        self._pause(False)


class KMeansWarmup(_Pause):
    """No k-means steps for the first `steps` optimizer steps.

    The forward pass keeps d[A] as fitted by `quantize_model` while W, the
    biases, batch norms and float layers train (W's updates accumulate; the
    first k-means step, after update `steps + 1`, refits d and A to them).
    With Adam, W drifts about the learning rate per step while the forward
    pass cannot follow, so that first step reassigns much of the tensor:
    fine-tuning a trained model, a warm-up of 10 % of an epoch cost 0.8 to 27
    points of validation accuracy on ResNet-8 (benchmarks/results/recipe.md).

    Args:
        steps: optimizer steps (counted from the optimizer's first update)
            without k-means steps; an integer >= 1.
    """

    def __init__(self, steps):
        super().__init__()
        self.steps = check_int("KMeansWarmup: steps", steps, 1)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_step = _iterations(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        # The update about to run is number `_epoch_step + batch + 1`.
        self._pause(self._epoch_step + batch + 1 <= self.steps)
        super().on_train_batch_begin(batch, logs)


class FreezeDictionaries(_Pause):
    """No k-means steps in the final `epochs` epochs of `fit`.

    Dictionaries and assignments (so d[A]) stay as they are while the
    biases, batch norms and float layers adapt to them. W still takes its
    gradient steps, which no longer reach the forward pass. Freezing the
    last of two fine-tuning epochs of ResNet-8 cost 0.2 to 2.4 points of
    validation accuracy (benchmarks/results/recipe.md).

    Args:
        epochs: the final epochs of each `fit` call (its `epochs` argument)
            to freeze; an integer >= 1.
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = check_int("FreezeDictionaries: epochs", epochs, 1)

    def on_epoch_begin(self, epoch, logs=None):
        self._pause(epoch >= self.params["epochs"] - self.epochs)


class PruningRamp(keras.callbacks.Callback):
    """Ramps each pruned layer's rate from 0 to its `prune_rate`.

    At optimizer step t the rate is `prune_rate * (1 - (1 - p)**power)`,
    `p = clip((t - begin_step) / steps, 0, 1)`, updated every `frequency`
    steps (the count of pruned weights changes only then). At the start of
    `fit`, the layers whose count differs from the ramp's take one k-means
    step, so the first forward pass already uses the ramp's rate (0 at the
    start).

    Args:
        steps: optimizer steps from 0 to the full rate; an integer >= 1.
        begin_step: the optimizer step the ramp starts at (rate 0 before).
        power: 1 for a linear ramp; 3 (the default, as tfmot's
            `PolynomialDecay`) prunes fast early, slowly near the target.
        frequency: update the counts every this many steps.

    Raises:
        ValueError: at `fit`, if no LUT-Q layer prunes (`prune_rate` > 0).
    """

    def __init__(self, steps, begin_step=0, power=3, frequency=10):
        super().__init__()
        self.steps = check_int("PruningRamp: steps", steps, 1)
        self.begin_step = check_int("PruningRamp: begin_step", begin_step, 0)
        self.frequency = check_int("PruningRamp: frequency", frequency, 1)
        if isinstance(power, bool) or not isinstance(
                power, numbers.Real) or not power > 0:
            raise ValueError(
                f"PruningRamp: power must be a number > 0, got {power!r}.")
        self.power = float(power)

    def set_model(self, model):
        super().set_model(model)
        self._lutq_layers = [
            layer for layer in _layers(model, "PruningRamp")
            if layer.quantizer.prune_rate > 0]
        if not self._lutq_layers:
            raise ValueError(
                f"PruningRamp: no LUT-Q layer of model '{model.name}' "
                "prunes. Give quantize_model a prune_rate > 0 (or an "
                "override with one).")

    def rate_fraction(self, step):
        """The share of each layer's `prune_rate` at optimizer step `step`."""
        progress = min(max((step - self.begin_step) / self.steps, 0.0), 1.0)
        return 1.0 - (1.0 - progress) ** self.power

    def _counts(self, step):
        fraction = self.rate_fraction(step)
        return [[layer.quantizer.num_pruned(
                    state.pruning_table_size,
                    layer.quantizer.prune_rate * fraction)
                 for state in layer.tensor_states]
                for layer in self._lutq_layers]

    def _apply(self, counts):
        """Assigns changed counts; returns the layers that changed."""
        changed = []
        for layer, layer_counts, old in zip(self._lutq_layers, counts,
                                            self._current):
            if layer_counts != old:
                for state, count in zip(layer.tensor_states, layer_counts):
                    state.num_pruned.assign(count)
                changed.append(layer)
        self._current = counts
        return changed

    def on_train_begin(self, logs=None):
        self._current = [[int(state.num_pruned.numpy())
                          for state in layer.tensor_states]
                         for layer in self._lutq_layers]
        step = _iterations(self.model)
        for layer in self._apply(self._counts(self._due(step))):
            layer.kmeans_step()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_step = _iterations(self.model)

    def _due(self, step):
        """The step whose rate holds at `step` (updated every `frequency`)."""
        return step - step % self.frequency

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch_step + batch + 1  # the update about to run
        self._apply(self._counts(self._due(step)))


class QuantizationFigures(keras.callbacks.Callback):
    """LUT-Q figures in `fit`'s logs, progress bar and History.

    `quantization_error`: the mean |W - d[A]| over every LUT-Q weight;
    `assignments_changed`: the share of assignments the k-means step
    changed (0 while paused). Both are measured in the train step at a
    layer's 1st, (1 + every)-th, ... k-means step, and logged at every
    step as last measured (each measurement is two passes over W, so
    `every` keeps their cost small). Under `tf.distribute`, every replica
    measures the same mirrored weights.

    Needs a model with `LUTQModelMixin` (from `quantize_model`): its train
    step computes the figures. Entering `fit` with this callback retraces
    the train function, and so does the next `fit` without it.

    Args:
        every: measure every this many k-means steps of a layer.
    """

    def __init__(self, every=20):
        super().__init__()
        self.every = check_int("QuantizationFigures: every", every, 1)

    def set_model(self, model):
        if not isinstance(model, LUTQModelMixin):
            raise TypeError(
                f"QuantizationFigures: model '{model.name}' "
                f"({type(model).__name__}) has no LUT-Q train step. Use a "
                "model from lutq_tf.quantize_model, or add "
                "lutq_tf.LUTQModelMixin to the model class.")
        _layers(model, "QuantizationFigures")
        super().set_model(model)
        model.quantization_figures_every = self.every

    def on_train_end(self, logs=None):
        self.model.quantization_figures_every = 0


class DictionaryTensorBoard(keras.callbacks.Callback):
    """Writes each LUT-Q layer's dictionary values and weights to TensorBoard.

    At the end of every `update_freq`-th epoch, for each quantised tensor
    (tag `<layer>/<attribute>/...`): histograms of W (`weights`), of d[A]
    (`quantized`) and of the dictionary entries (`dictionary`), and, for a
    per-tensor dictionary of at most `max_entry_scalars` entries, each
    entry as a scalar (`dictionary/<k>`; sorted, row 0 the zero entry when
    pruning). Use a directory beside Keras' `TensorBoard` callback's, e.g.
    `log_dir/lutq`.

    Needs the `tensorboard` package (`pip install lutq-tf[tensorboard]`):
    TensorFlow's wheel does not install it.

    Args:
        log_dir: directory for the event files.
        update_freq: write every this many epochs.
        max_entry_scalars: per-entry scalars up to this many entries.

    Raises:
        ImportError: `tensorboard` is not installed.
    """

    def __init__(self, log_dir, update_freq=1, max_entry_scalars=16):
        super().__init__()
        try:
            import tensorboard  # noqa: F401 (tf.summary needs it)
        except ImportError as error:
            raise ImportError(
                "DictionaryTensorBoard writes with tf.summary, which needs "
                "the tensorboard package; TensorFlow does not install it. "
                "Install the extra: pip install 'lutq-tf[tensorboard]' (or "
                "pip install tensorboard)."
            ) from error
        self.log_dir = str(log_dir)
        self.update_freq = check_int("DictionaryTensorBoard: update_freq",
                                     update_freq, 1)
        self.max_entry_scalars = check_int(
            "DictionaryTensorBoard: max_entry_scalars", max_entry_scalars, 0)
        self._writer = None

    def set_model(self, model):
        super().set_model(model)
        self._lutq_layers = _layers(model, "DictionaryTensorBoard")

    def on_train_begin(self, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.update_freq == 0:
            self.write(epoch)

    def write(self, step):
        """Writes every layer's summaries at `step` (the epoch)."""
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for layer in self._lutq_layers:
                for state in layer.tensor_states:
                    tag = f"{layer.name}/{state.spec.attribute}"
                    dictionary = state.dictionary.numpy()
                    tf.summary.histogram(f"{tag}/weights",
                                         state.variable.numpy(), step=step)
                    tf.summary.histogram(f"{tag}/quantized",
                                         state.quantized.numpy(), step=step)
                    tf.summary.histogram(f"{tag}/dictionary", dictionary,
                                         step=step)
                    if (dictionary.shape[1] == 1
                            and len(dictionary) <= self.max_entry_scalars):
                        for k, value in enumerate(dictionary[:, 0]):
                            tf.summary.scalar(f"{tag}/dictionary/{k}",
                                              float(value), step=step)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


__all__ = ["DictionaryTensorBoard", "FreezeDictionaries", "KMeansWarmup",
           "PruningRamp", "QuantizationFigures"]
