"""Models that run the LUT-Q k-means step after each optimizer step."""

import keras
import tensorflow as tf

from lutq_tf.wrapper import LUTQWrapper


def lutq_layers(model):
    """All `LUTQWrapper`s in `model`, nested models included, in order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, LUTQWrapper)
    ]


# The train step's log entry that carries the non-finite check to the host.
_NONFINITE_LOG = "_lutq_nonfinite"


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
    overwritten with NaN.
    """

    def train_step(self, data):
        logs = super().train_step(data)
        nonfinite = self.lutq_step()
        if isinstance(logs, dict):
            # Read back by the wrapped train function, then removed: a
            # per-step check without an extra host read.
            logs = dict(logs)
            logs[_NONFINITE_LOG] = nonfinite
        return logs

    def lutq_step(self):
        """Runs the due k-means steps.

        A layer whose W is not finite keeps its dictionary and raises its
        (sticky) `nonfinite_flag`.

        Returns:
            A bool scalar tensor: True if some layer's flag is raised.
        """
        iterations = self.optimizer.iterations
        any_nonfinite = tf.constant(False)
        for layer in lutq_layers(self):
            every = layer.quantizer.kmeans_every

            def step(layer=layer):
                return layer.kmeans_step()

            if every == 1:
                finite = step()
            else:
                finite = tf.cond(
                    tf.equal(iterations % every, 0),
                    step,
                    lambda: tf.constant(True),
                )
            flag = tf.logical_or(layer.nonfinite_flag.value,
                                 tf.logical_not(finite))
            layer.nonfinite_flag.assign(flag)
            any_nonfinite = tf.logical_or(any_nonfinite, flag)
        return any_nonfinite

    def make_train_function(self, force=False):
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
            if nonfinite is None or bool(nonfinite):
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
        raise NonFiniteWeightsError(
            f"LUT-Q layer {names}: its full-precision weights became NaN or "
            f"Inf during training (by step "
            f"{int(self.optimizer.iterations.numpy())}). Its dictionary was "
            "kept as it was. Lower the learning rate, clip gradients, or "
            "check the data for NaN."
        )


@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQModel(LUTQModelMixin, keras.Model):
    """A Functional model with LUT-Q layers; built by `quantize_model`."""


@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQSequential(LUTQModelMixin, keras.Sequential):
    """A Sequential model with LUT-Q layers; built by `quantize_model`."""
