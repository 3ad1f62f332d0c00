"""Models that run the LUT-Q k-means step after each optimizer step."""

import contextlib

import keras
import tensorflow as tf

from lutq_tf.quantizer import check_int
from lutq_tf.registry import all_layers
from lutq_tf.wrapper import LUTQWrapper


def lutq_layers(model: keras.Model) -> list[LUTQWrapper]:
    """All `LUTQWrapper`s in `model`, nested models included, in order."""
    return [layer for layer in all_layers(model)
            if isinstance(layer, LUTQWrapper)]


# The train step's log entry that carries the non-finite check to the host.
_NONFINITE_LOG = "_lutq_nonfinite"
# The figures' log entries (with `lutq_tf.callbacks.QuantizationFigures`).
ERROR_LOG = "quantization_error"
CHANGED_LOG = "assignments_changed"


class NonFiniteWeightsError(FloatingPointError):
    """W of a LUT-Q layer became NaN or Inf during training."""


class LUTQModelMixin:
    """Adds the LUT-Q k-means step to a Keras model's `train_step`.

    Use it for subclassed models whose layers are `LUTQWrapper`s (Sequential
    and Functional models get it from `lutq_tf.quantize_model`):

        class Net(lutq_tf.LUTQModelMixin, keras.Model):
            def __init__(self):
                super().__init__()
                self.dense = lutq_tf.LUTQWrapper(keras.layers.Dense(10))
            def call(self, x):
                return self.dense(x)

    `train_step` runs Keras' own step (loss tracking, loss scaling, metrics),
    then the k-means step of every LUT-Q layer whose `kmeans_every` divides
    the optimizer's iteration count. A NaN or Inf in W stops `fit` with a
    `NonFiniteWeightsError` naming the layer; its dictionary is never
    overwritten with NaN. The check rides on the k-means step (it reads the
    `[K, C]` cluster sums, not W), so with `kmeans_every > 1` it sees W at
    the next due step; `fit` also checks every LUT-Q W once when it ends.

    Under a `tf.distribute` strategy (Mirrored, MultiWorkerMirrored), each
    replica runs the same k-means step on the same all-reduced W after the
    optimizer's update, so dictionaries and assignments stay identical
    across replicas without any extra communication.
    """

    def train_step(self, data):
        layers = lutq_layers(self)
        # While Keras' step traces the forward pass, the wrappers know that
        # this model runs their k-means step (they would otherwise run it
        # themselves in `call`).
        with contextlib.ExitStack() as driven:
            for layer in layers:
                driven.enter_context(layer.kmeans_driven_by_model())
            logs = super().train_step(data)
        nonfinite = self.lutq_step()
        if isinstance(logs, dict):
            # Read back by the wrapped train function, then removed: a
            # per-step check without an extra host read. int32, not bool:
            # under tf.distribute, Keras reduces every log entry across
            # replicas, which bool tensors do not support.
            logs = dict(logs)
            logs[_NONFINITE_LOG] = tf.cast(nonfinite, tf.int32)
            if self.quantization_figures_every:
                logs.update(self._figure_logs(layers))
        return self._reducible_logs(logs)

    @property
    def quantization_figures_every(self):
        """0 (off), or N: the train step measures the LUT-Q figures at
        every N-th k-means step of a layer and logs them at every step.

        `lutq_tf.callbacks.QuantizationFigures` sets it for its `fit`;
        the logs are `ERROR_LOG` (mean |W - d[A]| over every LUT-Q weight)
        and `CHANGED_LOG` (the share of assignments the step changed).
        Setting a new value makes Keras retrace the train function.
        """
        return getattr(self, "_lutq_figures_every", 0)

    @quantization_figures_every.setter
    def quantization_figures_every(self, every):
        every = check_int("quantization_figures_every", every, 0)
        if every != self.quantization_figures_every:
            self._lutq_figures_every = every
            # The figures are traced into the train function: rebuild it.
            self.train_function = None

    def _figure_logs(self, layers):
        """The last measured figures over all LUT-Q weights.

        Every replica measures the same mirrored W, d and A, so Keras' mean
        across replicas keeps the values.
        """
        size = float(sum(state.size for layer in layers
                         for state in layer.tensor_states))
        if not size:
            return {}
        error = tf.add_n([layer.last_figures[0].value for layer in layers])
        changed = tf.add_n([layer.last_figures[1].value
                            for layer in layers])
        return {ERROR_LOG: error / size, CHANGED_LOG: changed / size}

    def test_step(self, data):
        return self._reducible_logs(super().test_step(data))

    def _multi_worker(self):
        strategy = self._distribute_strategy
        return strategy is not None and getattr(
            strategy.extended, "_in_multi_worker_mode", lambda: False)()

    def _reducible_logs(self, logs):
        """Logs that Keras can reduce across MultiWorkerMirrored workers.

        Keras 3.15 reduces each log entry across workers with
        `strategy.reduce("MEAN", value, axis=0)`, which fails on the
        scalars every step returns ("Invalid reduction dimension 0"), for
        any model; a length-1 axis reduces to the scalar.
        """
        if not (isinstance(logs, dict) and self._multi_worker()):
            return logs
        logs = {key: tf.convert_to_tensor(value)
                for key, value in logs.items()}
        return {key: tf.reshape(value, [1]) if value.shape.rank == 0
                else value for key, value in logs.items()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 takes the first batch's shapes by `strategy.reduce` of
        # the whole (x, y) structure, which MultiWorkerMirroredStrategy's
        # collectives cannot convert (ValueError: "Attempt to convert a
        # value (PerReplica ...)"), for any model. One replica's batch has
        # the same shapes and needs no collective.
        strategy = self._distribute_strategy
        if iterator is not None and self._multi_worker():
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator,
                                             data_batch=data_batch)

    def fit(self, *args, **kwargs):
        """Keras' `fit`; see the class docstring for what LUT-Q adds.

        Pauses of the k-means steps set during it (`lutq_tf.callbacks`'
        schedules) and the figures' switch end with it, however it ends
        (an exception or Ctrl-C skips the callbacks' `on_train_end`).

        Raises:
            ValueError: the model's or the optimizer's variables were made
                under another tf.distribute strategy than `fit` runs with.
            NonFiniteWeightsError: W of a LUT-Q layer became NaN or Inf.
        """
        layers = lutq_layers(self)
        self._check_strategy(layers)
        pauses = [layer.kmeans_pauses for layer in layers]
        figures = self.quantization_figures_every
        try:
            history = super().fit(*args, **kwargs)
        finally:
            for layer, kept in zip(layers, pauses):
                layer.clear_kmeans_pauses(keep=kept)
            # Retraces if a callback left the figures switched.
            self.quantization_figures_every = figures
        # With kmeans_every > 1 the per-step check skips the steps between
        # k-means steps; one pass over W here keeps a NaN from outliving fit.
        for layer in layers:
            if not layer.weights_finite():
                layer.nonfinite_flag.assign(True)
        self._raise_if_nonfinite()
        return history

    def lutq_step(self):
        """Runs the due k-means steps (none while paused by a callback).

        A layer whose W is not finite keeps its dictionary and raises its
        (sticky) `nonfinite_flag`. With figures on, every `N`-th due step
        of a layer (the first included) also measures them.

        Returns:
            A bool scalar tensor: True if some layer's flag is raised.
        """
        iterations = self.optimizer.iterations
        figures_every = self.quantization_figures_every
        any_nonfinite = tf.constant(False)
        for layer in lutq_layers(self):
            every = layer.quantizer.kmeans_every
            due = True if every == 1 else tf.equal(iterations % every, 0)
            measure = False
            if figures_every:
                # Its (iterations // every)-th due step: 1, 1 + N, ...
                measure = tf.logical_and(due, tf.equal(
                    (iterations // every - 1) % figures_every, 0))
            finite = layer.scheduled_kmeans_step(due, measure)
            flag = tf.logical_or(layer.nonfinite_flag.value,
                                 tf.logical_not(finite))
            layer.nonfinite_flag.assign(flag)
            any_nonfinite = tf.logical_or(any_nonfinite, flag)
        return any_nonfinite

    def _check_strategy(self, layers=None):
        """Raises a ValueError unless the LUT-Q layers' and the optimizer's
        variables were made in the scope of the strategy `fit` runs with.

        Keras 3 checks nothing: a model quantised outside
        `strategy.scope()` and compiled inside, or fitted inside, fails in
        the train step with a bare AssertionError.
        """
        strategy = self.distribute_strategy
        name = type(strategy).__name__
        if self._distribute_strategy is not None:
            where = f"under the {name} the model was made in"
        elif tf.distribute.has_strategy():
            where = f"under a {name} (the scope it is called in)"
        else:
            where = ("outside any strategy (the model was made outside "
                     "strategy.scope())")
        checks = [(f"LUT-Q layer '{layer.name}'", layer.weights)
                  for layer in (lutq_layers(self) if layers is None
                                else layers)]
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            # Where its step counter was made, the optimizer was (and its
            # slots are made by Keras under the model's strategy).
            checks.append(("its optimizer", [optimizer.iterations]))
        for what, variables in checks:
            for variable in variables:
                value = getattr(variable, "value", variable)
                if strategy.extended.variable_created_in_scope(value):
                    continue
                made = getattr(value, "distribute_strategy", None)
                made = (f"under a {type(made).__name__}" if made is not None
                        else "outside any strategy.scope()")
                raise ValueError(
                    f"Model '{self.name}': {what} was made {made}, but fit "
                    f"runs {where}. Quantize the model "
                    "(lutq_tf.quantize_model or lutq_tf.load_model, which "
                    "also build it) and compile it inside one `with "
                    "strategy.scope():`, then call fit."
                )

    def make_train_function(self, force=False):
        if force or self.train_function is None:
            # train_on_batch's way in (fit checks at every call).
            self._check_strategy()
        super().make_train_function(force=force)
        train_function = self.train_function
        if getattr(train_function, "_lutq_checked", False):
            return train_function

        def checked(iterator):
            logs = train_function(iterator)
            nonfinite = (logs.pop(_NONFINITE_LOG, None)
                         if isinstance(logs, dict) else None)
            # Without the log entry (a train_step that drops it), read the
            # layers' flags instead.
            if nonfinite is None or bool(nonfinite > 0):
                self._raise_if_nonfinite()
            return logs

        checked._lutq_checked = True
        self.train_function = checked
        return checked

    def _raise_if_nonfinite(self):
        bad = [layer for layer in lutq_layers(self)
               if bool(layer.nonfinite_flag.numpy())]
        if not bad:
            return
        for layer in bad:
            layer.nonfinite_flag.assign(False)
        names = ", ".join(f"'{layer.name}'" for layer in bad)
        step = int(self.optimizer.iterations.numpy())
        if all(layer.weights_finite() for layer in bad):
            # W is finite but its cluster sums overflowed float32.
            raise NonFiniteWeightsError(
                f"LUT-Q layer {names}: its full-precision weights grew so "
                f"large (by step {step}) that the k-means cluster sums "
                "overflow float32. Its dictionary was kept as it was. Lower "
                "the learning rate, clip gradients, or add weight decay."
            )
        raise NonFiniteWeightsError(
            f"LUT-Q layer {names}: its full-precision weights became NaN or "
            f"Inf during training (by step {step}). Its dictionary was "
            "kept as it was. Lower the learning rate, clip gradients, or "
            "check the data for NaN."
        )


@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQModel(LUTQModelMixin, keras.Model):
    """A Functional model with LUT-Q layers; built by `quantize_model`."""


@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQSequential(LUTQModelMixin, keras.Sequential):
    """A Sequential model with LUT-Q layers; built by `quantize_model`."""
