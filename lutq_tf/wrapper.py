"""`LUTQWrapper`: a layer whose kernels are LUT-Q look-up tables."""

import collections.abc
import contextlib

import keras

# No public API tells whether a GradientTape records a tensor, or whether
# Keras is tracing a layer for shapes only.
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record

from lutq_tf import registry
from lutq_tf.backend import check_tensorflow_backend
from lutq_tf.quantizer import LUTQuantizer


@tf.custom_gradient
def _straight_through(weights, quantized):
    """Forward: exactly `quantized` (= d[A]). Backward: dL/dQ goes to W."""

    def grad(upstream):
        # d[A] is state, not trained: no gradient (and no zeros to fill).
        return upstream, None

    return tf.identity(quantized), grad


class TensorState:
    """The LUT-Q state of one quantised weight of the wrapped layer.

    Read through `LUTQWrapper.tensor_states`. Attributes: `spec` (the
    `registry.QuantizableTensor`), `variable` (W), `dictionary`,
    `assignment`, `quantized` and `channel_scales` (variables; see the
    comments in `__init__`), `num_pruned` (a variable a pruning schedule
    assigns, or None) and `pruning_table_size`.
    """

    def __init__(self, spec, variable, dictionary, assignment, quantized,
                 permutation, channels, channel_scales=None, num_pruned=None,
                 pruning_table_size=None):
        self.spec = spec
        self.variable = variable  # W, the wrapped layer's own variable.
        self.dictionary = dictionary  # [K, C], or [K, 1] with channel scales
        self.assignment = assignment  # shape of W, small unsigned ints
        # d[A] (s_c * d[A] with channel scales) in the shape of W, cached.
        self.quantized = quantized
        self.permutation = permutation  # puts channel axes last, or None
        self.channels = channels  # columns of `to_matrix`: 1 per tensor
        # s_c, float32 [C] in `to_matrix`'s column order; None unless the
        # quantizer has `channel_scales`.
        self.channel_scales = channel_scales
        # With pruning: int32 scalar, the weights per table fixed to the
        # zero entry now (the quantizer's count, or less while a
        # `lutq_tf.callbacks.PruningRamp` ramps it); None without pruning.
        # Not saved (untracked): a loaded model prunes at its target.
        self.num_pruned = num_pruned
        # Weights per table that pruning takes its count of (`num_pruned`).
        self.pruning_table_size = pruning_table_size
        self.update = None  # the compiled k-means step, made on first use
        # The initial fit's step (full refit) when the quantizer's
        # `dictionary_rate` is not 1; else `update` serves both.
        self.initial_update = None

    @property
    def size(self):
        """Number of weights in W."""
        return int(np.prod(self.variable.shape))

    def to_matrix(self, tensor):
        """`[M, C]` view of a tensor shaped like W."""
        if self.permutation is not None:
            tensor = tf.transpose(tensor, self.permutation)
        return tf.reshape(tensor, [-1, self.channels])

    def from_matrix(self, matrix):
        shape = self.variable.shape
        if self.permutation is None:
            return tf.reshape(matrix, shape)
        permuted = [shape[i] for i in self.permutation]
        return tf.transpose(
            tf.reshape(matrix, permuted), np.argsort(self.permutation)
        )


class _Schedule:
    """A wrapper's training controls and figures; plain, so Keras neither
    tracks nor saves its variables (files keep their layout).

    Pauses: each holder (a schedule callback, a user) pauses training's
    k-means steps under its own reason; they run when no reason is left.
    The reasons outlive a rebuild; the variables are made by `build`. A
    one-step pause (`pause_next_step`) skips only the next training step's
    k-means step, which ends it.
    """

    def __init__(self, name):
        self.name = name
        self._reasons = frozenset()
        self.paused = None

    def build(self):
        def variable(suffix, dtype, initializer="zeros"):
            # A callable initializer: Keras may build inside a stateless
            # scope (a subclassed model's first call), where it defers it.
            return keras.Variable(initializer, shape=(), dtype=dtype,
                                  trainable=False,
                                  name=f"{self.name}_{suffix}")

        # True: training skips the k-means steps (warm-up, frozen epochs).
        self.paused = variable("kmeans_paused", "bool",
                               "ones" if self._reasons else "zeros")
        # True: the next training step skips its k-means step and clears
        # it. A schedule renews it batch by batch where no `finally` can
        # end a pause (Keras' own fit), so it never outlives its fit.
        self.paused_once = variable("kmeans_paused_once", "bool")
        # Of the last measured step: sum |W - Q| over the layer's weights,
        # and the number of assignments that step changed.
        self.error = variable("quantization_error", "float32")
        self.changed = variable("assignments_changed", "float32")

    @property
    def reasons(self):
        """The reasons pausing the k-means steps now (a frozenset)."""
        return self._reasons

    def pause(self, reason):
        self._set(self._reasons | {reason})

    def resume(self, reason):
        self._set(self._reasons - {reason})

    def pause_next_step(self):
        if self.paused_once is not None:
            self.paused_once.assign(True)

    def clear_pauses(self, keep=()):
        # Always written: the safety net must not trust a stale mirror.
        self._set(self._reasons & frozenset(keep), force=True)

    def _set(self, reasons, force=False):
        changed = bool(reasons) != bool(self._reasons)
        self._reasons = reasons
        if self.paused is not None and (changed or force):
            self.paused.assign(bool(reasons))


@keras.saving.register_keras_serializable(package="lutq_tf")
class LUTQWrapper(keras.layers.Wrapper):
    """Wraps a Keras layer so that its kernels are LUT-Q quantised.

    The wrapped layer's kernels W stay its trainable variables. For each one
    the wrapper keeps, as non-trainable state, a dictionary d (`[K, C]`, C = 1
    or the number of output channels), an assignment A (W's shape, the
    smallest unsigned dtype that holds K; int32 under
    MultiWorkerMirroredStrategy) and the cached product d[A]. With
    the quantizer's `channel_scales`, d is `[K, 1]` over the weights divided
    by their output channel's scale s_c, the state adds s (`[C]`) and the
    cached product is s_c * d[A]. The forward pass uses exactly the cached
    product; its gradient is applied to W (straight-through).
    `kmeans_step()` refits A, d (and s) to W; models built with
    `lutq_tf.quantize_model` or `LUTQModelMixin` call it after each
    optimizer step.

    Building creates the state but fits nothing: `quantize_model` fits the
    dictionaries once the float weights are copied in (`initialize()`), and
    loading a saved model restores them as saved. A wrapper built by hand
    fits them to its current W at its first use (a call that is not a
    symbolic shape trace, `kmeans_step`, `quantized_tensors`,
    `tensor_states`), unless its dictionaries were set before (loaded,
    `set_weights`, assigned): all-zero dictionaries mean "never fitted".

    Without such a model (the wrapper in a plain `keras.Sequential` or
    subclassed model, a `clone_model` copy, a custom GradientTape loop),
    the wrapper drives itself, the way BatchNormalization updates its
    statistics: each training call (`training=True`, or `training` unset
    while a GradientTape records W) first refits d and A
    to the W left by the previous update (every `kmeans_every`-th call),
    then runs the forward pass. The trajectory is the one `fit` on a LUT-Q
    model follows; only the last update is folded in at the next training
    call, so call `kmeans_step()` after a custom loop to refit to the final
    W. A NaN or Inf in W then fails the training call with an
    `InvalidArgumentError` naming the layer (under XLA, which drops
    asserts, the loss turns NaN).

    Supported layers: Dense, Conv1D/2D/3D, DepthwiseConv1D/2D,
    SeparableConv1D/2D (both kernels), Conv1D/2D/3DTranspose, Embedding.

    Args:
        layer: the Keras layer to wrap.
        quantizer: a `lutq_tf.LUTQuantizer` (or its config dict). Defaults to
            `LUTQuantizer(bits=4)`.
        **kwargs: base layer arguments; `name` defaults to the layer's name.

    Input and output shapes are those of the wrapped layer.
    """

    def __init__(self, layer, quantizer=None, **kwargs):
        # Also here: `keras.config.set_backend` can switch after import.
        check_tensorflow_backend("LUTQWrapper")
        if not registry.is_supported(layer):
            raise ValueError(
                f"LUT-Q cannot quantise layer '{layer.name}' of type "
                f"{type(layer).__name__}. Supported types: "
                f"{', '.join(c.__name__ for c in registry.SUPPORTED_LAYERS)}."
            )
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        if quantizer is None:
            quantizer = LUTQuantizer(bits=4)
        elif isinstance(quantizer, dict):
            quantizer = keras.saving.deserialize_keras_object(quantizer)
        if not isinstance(quantizer, LUTQuantizer):
            raise ValueError(
                f"LUTQWrapper '{kwargs['name']}': `quantizer` must be a "
                f"lutq_tf.LUTQuantizer, got {quantizer!r}."
            )
        self.quantizer = quantizer
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._states = []
        # > 0 while a LUTQModelMixin's train_step traces this layer's
        # forward pass: that model runs the k-means step after the
        # optimizer's update, so `call` must not.
        self._kmeans_driven = 0  # see `kmeans_driven_by_model`
        # Made here so that pauses set before the build hold (`build`
        # makes its variables).
        self._schedule = _Schedule(self.name)

    # -- building -----------------------------------------------------------

    def build(self, input_shape=None):
        super().build(input_shape)
        # Keras retries a build that raised: never keep a partial one.
        self._states = []
        for spec in registry.quantizable_tensors(self.layer):
            self._states.append(self._make_state(spec))
        # Sticky, set by a k-means step that meets NaN/Inf in W. The host
        # reads it only when the train step's log entry reports one, and
        # once when `fit` ends (a read per step cost ~3 % of the step).
        self.nonfinite_flag = self.add_weight(
            name="nonfinite", shape=(), dtype="bool", initializer="zeros",
            trainable=False, autocast=False,
        )
        # Training calls so far, for the self-driven k-means step (see the
        # class docstring). Not saved: `save_own_variables` skips it, so
        # files keep their layout.
        self._training_calls = self.add_weight(
            name="training_calls", shape=(), dtype="int32",
            initializer="zeros", trainable=False, autocast=False,
        )
        self._schedule.build()
        self.built = True
        # The weights W are not final yet (`quantize_model` and loading
        # overwrite them): fit at first use (`_ensure_fitted`).
        self._fitted = False

    def _make_state(self, spec):
        variable = getattr(self.layer, spec.attribute)
        if not isinstance(variable, keras.Variable):
            raise ValueError(
                f"Layer '{self.layer.name}': `{spec.attribute}` is not a plain "
                "variable (LoRA or quantisation enabled?); LUT-Q needs the "
                "float weights."
            )
        shape = tuple(variable.shape)
        rank = len(shape)
        permutation = None
        channels = 1
        if self.quantizer.per_channel or self.quantizer.channel_scales:
            channels = int(np.prod([shape[a] for a in spec.channel_axes]))
            order = registry.channel_order(rank, spec.channel_axes)
            if order != list(range(rank)):
                permutation = order
        # Channel scales keep one table over the whole (normalised) tensor.
        tables = channels if self.quantizer.per_channel else 1
        size = int(np.prod(shape))
        table_size = size // tables
        k = self.quantizer.num_values
        if k > table_size:
            raise ValueError(
                f"Layer '{self.layer.name}': K={k} dictionary entries exceed "
                f"the {table_size} weights of each "
                f"{'channel' if tables > 1 else 'tensor'} of "
                f"`{spec.attribute}`. Use fewer bits for this layer (an "
                "override), skip it, or raise `min_weights`."
            )
        prefix = spec.attribute
        dictionary = self.add_weight(
            name=f"{prefix}_dictionary", shape=(k, tables),
            dtype="float32", initializer="zeros", trainable=False,
            autocast=False,
        )
        assignment_dtype = self.quantizer.assignment_dtype
        if isinstance(tf.distribute.get_strategy(),
                      tf.distribute.MultiWorkerMirroredStrategy):
            # It broadcasts every new variable's initial value from the
            # chief, and its collectives take no uint8 / uint16.
            assignment_dtype = "int32"
        assignment = self.add_weight(
            name=f"{prefix}_assignment", shape=shape,
            dtype=assignment_dtype, initializer="zeros",
            trainable=False, autocast=False,
        )
        quantized = self.add_weight(
            name=f"{prefix}_quantized", shape=shape, dtype="float32",
            initializer="zeros", trainable=False, autocast=False,
        )
        scales = None
        if self.quantizer.channel_scales:
            # Only in this mode, so models saved without it still load.
            scales = self.add_weight(
                name=f"{prefix}_channel_scales", shape=(channels,),
                dtype="float32", initializer="ones", trainable=False,
                autocast=False,
            )
        num_pruned = None
        # Channel scales prune over the whole normalised tensor.
        pruned_table = size if self.quantizer.channel_scales else table_size
        if self.quantizer.prune_rate > 0:
            num_pruned = keras.Variable(
                keras.initializers.Constant(
                    self.quantizer.num_pruned(pruned_table)),
                shape=(), dtype="int32", trainable=False,
                name=f"{prefix}_num_pruned")
        return TensorState(spec, variable, dictionary, assignment, quantized,
                            permutation, channels, scales, num_pruned,
                            pruned_table)

    # -- the LUT-Q step -----------------------------------------------------

    def initialize(self):
        """Refit dictionaries and assignments to the current weights W.

        Runs k-means (quantile seeds, `init_iterations` Lloyd steps) per
        quantised tensor. Call it after changing W by hand.

        Raises:
            ValueError: if W holds NaN or Inf.
        """
        for state in self._states:
            weights = tf.convert_to_tensor(state.variable.value, tf.float32)
            if not bool(tf.reduce_all(tf.math.is_finite(weights))):
                raise ValueError(
                    f"Layer '{self.layer.name}': `{state.spec.attribute}` holds "
                    "NaN or Inf; LUT-Q cannot fit a dictionary to it. Check "
                    "the pretrained weights."
                )
            update = self._update_function(state, initial=True)
            dictionary = self.quantizer.seed(state.to_matrix(weights))
            for _ in range(self.quantizer.init_iterations):
                finite, dictionary, assignment, quantized, scales = update(
                    weights, dictionary, _num_pruned(state))
                if not bool(finite):
                    # W is finite (checked above): its cluster sums are not.
                    peak = float(tf.reduce_max(tf.abs(weights)))
                    raise ValueError(
                        f"Layer '{self.layer.name}': `{state.spec.attribute}` "
                        f"holds weights up to {peak:.3g} in magnitude; their "
                        "k-means cluster sums overflow float32 (largest "
                        "3.4e38). Rescale the weights (e.g. fold a constant "
                        "factor into the next layer) so that |W| stays "
                        "below about 1e30."
                    )
            self._store(state, dictionary, assignment, quantized, scales)
        self._fitted = True

    def _ensure_fitted(self):
        """Fits the dictionaries to W at the first use of a hand-built layer.

        Skipped while Keras traces the layer for shapes (its W may still be
        replaced) and once fitted, loaded or set: dictionaries that are not
        all zero were set by someone (a file, `set_weights`, an assignment)
        and are kept.
        """
        if getattr(self, "_fitted", True) or (in_symbolic_scope()
                                              or in_stateless_scope()):
            return
        # init_scope lifts the fit out of any graph being traced (the first
        # call may be inside `fit`'s train function).
        with tf.init_scope():
            if any(np.any(state.dictionary.numpy()) for state in self._states):
                self._fitted = True
            else:
                self.initialize()

    def finalize_state(self):
        """Called by Keras' HDF5 loader once it has set the variables."""
        self._fitted = True

    def kmeans_step(self):
        """One k-means step for every quantised tensor of the layer.

        Runs whether or not training has paused the k-means steps
        (`lutq_tf.callbacks.KMeansWarmup`, `FreezeDictionaries`).

        Returns:
            A bool scalar tensor: False if some W held NaN or Inf, in which
            case that tensor's dictionary and assignment were left unchanged.
        """
        return self._kmeans_step(measure=False)[0]

    def pause_kmeans(self, reason):
        """Pauses training's k-means steps until `resume_kmeans(reason)`.

        Pauses add up: the steps run again once every reason is resumed.
        `kmeans_step()` runs regardless. `fit` on a LUT-Q model
        (`LUTQModelMixin`) ends every pause set during it when it ends,
        however it ends; `lutq_tf.callbacks`' schedules pause through this.

        Args:
            reason: a hashable object naming who pauses (e.g. a callback).
        """
        if not isinstance(reason, collections.abc.Hashable):
            raise TypeError(
                f"LUTQWrapper '{self.name}': a pause `reason` must be "
                f"hashable (a string, a callback), got {type(reason).__name__}.")
        self._schedule.pause(reason)

    def resume_kmeans(self, reason):
        """Ends the pause set with `reason` (nothing if there is none)."""
        self._schedule.resume(reason)

    def pause_next_kmeans_step(self):
        """Skips the k-means step of the next training step only.

        That step ends the pause, however the training around it ends, so
        a schedule that renews it before each batch (`lutq_tf.callbacks`
        on a model whose `fit` cannot end pauses itself, such as a plain
        `keras.Model`) never leaves the steps paused after its `fit`. A
        `fit` that raises after the renewal and before the step leaves it
        for the next training step.
        """
        self._schedule.pause_next_step()

    def clear_kmeans_pauses(self, keep=()):
        """Ends every pause but those whose reason is in `keep`."""
        self._schedule.clear_pauses(keep)

    @property
    def kmeans_pauses(self):
        """The reasons pausing training's k-means steps now (a frozenset)."""
        return self._schedule.reasons

    @contextlib.contextmanager
    def kmeans_driven_by_model(self):
        """A context in which a model, not `call`, runs the k-means step.

        A train step (`LUTQModelMixin.train_step`) enters it while tracing
        its forward pass, then runs `scheduled_kmeans_step` after the
        optimizer's update; inside it, a training `call` does not run its
        own (self-driven) step. Contexts nest.
        """
        self._kmeans_driven += 1
        try:
            yield self
        finally:
            self._kmeans_driven -= 1

    @property
    def last_figures(self):
        """`(error, changed)` of the last measured k-means step.

        float32 scalar variables (zero until measured; not saved): the sum
        of |W - Q| over the layer's quantised weights, and the number of
        assignments that step changed (0 if it did not run). A step
        measures them when `scheduled_kmeans_step` gets `measure`
        (`lutq_tf.callbacks.QuantizationFigures` turns that on).
        """
        return self._schedule.error, self._schedule.changed

    def _kmeans_step(self, measure):
        """`kmeans_step`; also counts the assignments it changes if `measure`.

        Args:
            measure: a Python bool or a bool scalar tensor.

        Returns:
            `(finite, changed)`: bool and float32 scalar tensors; `changed`
            is 0 unless `measure`.
        """
        self._ensure_fitted()
        all_finite = tf.constant(True)
        changed = tf.constant(0.0)
        for state in self._states:
            # Tensors, not variables: the signature `initialize` compiled.
            finite, dictionary, assignment, quantized, scales = (
                self._update_function(state)(
                    tf.cast(tf.convert_to_tensor(state.variable.value),
                            tf.float32),
                    tf.convert_to_tensor(state.dictionary.value),
                    _num_pruned(state))
            )
            if measure is not False:
                # Read before the store below (ops on one variable run in
                # program order inside a tf.function).
                changed += tf.cond(
                    measure,
                    lambda state=state, a=assignment: tf.reduce_sum(tf.cast(
                        tf.not_equal(a, state.assignment.value), tf.float32)),
                    lambda: tf.constant(0.0))

            def store(state=state, d=dictionary, a=assignment, q=quantized,
                      s=scales):
                self._store(state, d, a, q, s)
                return tf.constant(True)

            tf.cond(finite, store, lambda: tf.constant(False))
            all_finite = tf.logical_and(all_finite, finite)
        return all_finite, changed

    def scheduled_kmeans_step(self, due, measure=False):
        """The k-means step of a training step: runs if due and not paused.

        Called by `LUTQModelMixin.lutq_step` after each optimizer step, and
        by a self-driven `call`. Unlike `kmeans_step`, it honours the
        pauses (`pause_kmeans`).

        Args:
            due: Python bool or bool scalar tensor: `kmeans_every` divides
                the step.
            measure: Python bool or bool scalar tensor: record the figures
                (`last_figures`; `changed` 0 if the step did not run).

        Returns:
            A bool scalar tensor: False if some W held NaN or Inf.
        """
        paused_once = self._schedule.paused_once
        run = tf.logical_and(due, tf.logical_not(tf.logical_or(
            self._schedule.paused.value, paused_once.value)))
        # Read above, cleared here (program order on one variable).
        paused_once.assign(False)
        finite, changed = tf.cond(
            run, lambda: self._kmeans_step(measure),
            lambda: (tf.constant(True), tf.constant(0.0)))
        if measure is not False:

            def record():
                self._schedule.changed.assign(changed)
                self._schedule.error.assign(tf.add_n([
                    tf.reduce_sum(tf.abs(
                        tf.cast(state.variable.value, tf.float32)
                        - state.quantized.value))
                    for state in self._states]))
                return tf.constant(True)

            tf.cond(measure, record, lambda: tf.constant(False))
        return finite

    def _update_function(self, state, initial=False):
        """The k-means step of one tensor, in W's layout, compiled with XLA.

        With `initial`, the initial fit's step: it takes the cluster means
        fully whatever the quantizer's `dictionary_rate` (the same function
        as the training step's when that rate is 1).

        `(W, d, num_pruned) -> (finite, d, A, Q, s)`, A already in its
        storage dtype,
        Q = d[A] (s_c * d[A] with channel scales), s the channel scales
        `[C]` or None. XLA fuses the passes over W into a few loops; it runs
        compiled whether or not the surrounding train function is.
        """
        if initial and self.quantizer.dictionary_rate != 1:
            if state.initial_update is None:
                state.initial_update = self._compile_update(state, True)
            return state.initial_update
        if state.update is None:
            state.update = self._compile_update(state, False)
        return state.update

    def _compile_update(self, state, initial):
        """`_update_function`'s XLA function (`initial` as there)."""

        def update(weights, dictionary, num_pruned):
            matrix = state.to_matrix(tf.cast(weights, tf.float32))
            scales = self.quantizer.scales(matrix)
            if state.num_pruned is None:
                num_pruned = None  # the quantizer's static 0
            dictionary, assignment, quantized, finite = (
                self.quantizer.step(matrix, dictionary, scales,
                                    num_pruned, initial=initial))
            assignment = tf.cast(state.from_matrix(assignment),
                                 state.assignment.dtype)
            return (finite, dictionary, assignment,
                    state.from_matrix(quantized), scales)

        return tf.function(update, jit_compile=True)

    def weights_finite(self):
        """True if every quantised W is finite (a full pass; not per step)."""
        return all(
            bool(tf.reduce_all(tf.math.is_finite(
                tf.convert_to_tensor(state.variable.value))))
            for state in self._states
        )

    def _is_training(self, training):
        """Whether a call trains W: `training`, else whether a tape records W.

        Keras passes `training=True` only to models whose `call` takes it,
        so a subclassed `call(self, x)` or a hand-written loop calling
        `model(x)` under a GradientTape reaches this layer with None.
        """
        if not self._states:
            return False
        if training is not None:
            if not isinstance(training, bool):
                training = tf.get_static_value(training)
            return bool(training)
        return record.should_record_backprop(
            [tf.convert_to_tensor(self._states[0].variable.value)])

    def _self_driven_step(self):
        """The k-means step run by `call` when no model drives it.

        At the t-th training call (t = 0, 1, ...), refits d and A to W when
        t > 0 and t % kmeans_every == 0: W then holds the t-th optimizer
        update, as after `fit`'s step t. If W is not finite, keeps d and A,
        sets Q to NaN (so the loss shows it, also under XLA) and raises
        `InvalidArgumentError` (outside XLA).
        """
        calls = self._training_calls.value
        every = self.quantizer.kmeans_every
        due = tf.logical_and(calls > 0, tf.equal(calls % every, 0))
        finite = self.scheduled_kmeans_step(due)
        self._training_calls.assign(calls + 1)
        self.nonfinite_flag.assign(tf.logical_or(
            self.nonfinite_flag.value, tf.logical_not(finite)))

        def poison():
            # XLA drops the Assert below: a NaN forward pass makes the loss
            # NaN, as a float layer's NaN weights would. d and A are kept,
            # and the next finite k-means step rewrites Q.
            for state in self._states:
                state.quantized.assign(tf.fill(state.quantized.shape,
                                               np.float32(np.nan)))
            return tf.constant(False)

        tf.cond(finite, lambda: tf.constant(True), poison)
        tf.debugging.Assert(finite, [tf.constant(
            f"LUT-Q layer '{self.name}': its full-precision weights became "
            "NaN or Inf during training; its dictionary was kept as it "
            "was. Lower the learning rate, clip gradients, or check the "
            "data for NaN.")])

    def _store(self, state, dictionary, assignment, quantized, scales=None):
        state.dictionary.assign(dictionary)
        state.assignment.assign(assignment)
        state.quantized.assign(quantized)
        if state.channel_scales is not None:
            state.channel_scales.assign(scales)

    # -- forward ------------------------------------------------------------

    def call(self, inputs, *args, training=None, **kwargs):
        self._ensure_fitted()
        if not self._kmeans_driven and self._is_training(training):
            self._self_driven_step()
        if self.layer._call_has_training_arg:
            kwargs["training"] = training
        substitutes = {
            id(state.variable): _straight_through(
                state.variable.value, state.quantized.value
            )
            for state in self._states
        }

        def values(variables):
            return [substitutes.get(id(v), v.value) for v in variables]

        outputs, _, losses = self.layer.stateless_call(
            values(self.layer.trainable_variables),
            values(self.layer.non_trainable_variables),
            inputs,
            *args,
            return_losses=True,
            **kwargs,
        )
        for loss in losses:
            self.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    # -- inspection ---------------------------------------------------------

    @property
    def quantized_tensors(self):
        """`{attribute: (dictionary, assignment, quantized)}` as numpy arrays.

        `dictionary` is `[K, C]`; `assignment` and `quantized` have the
        kernel's shape; `quantized` equals the dictionary looked up at the
        assignment, per channel. With channel scales, `dictionary` is
        `[K, 1]` and `quantized` is s_c * d[A]; read s from
        `tensor_states[i].channel_scales`.
        """
        self._ensure_fitted()
        return {
            s.spec.attribute: (
                s.dictionary.numpy(),
                s.assignment.numpy(),
                s.quantized.numpy(),
            )
            for s in self._states
        }

    @property
    def tensor_states(self):
        """The `TensorState` of each quantised weight, in registry order.

        Each has `dictionary`, `assignment`, `quantized` and
        `channel_scales` (None unless the quantizer has `channel_scales`)
        variables, and `to_matrix` / `from_matrix` for the `[M, C]` view
        (C = `channels`: the output channels per channel or with channel
        scales, else 1).
        """
        self._ensure_fitted()
        return tuple(self._states)

    # -- saving -------------------------------------------------------------

    def _saved_variables(self):
        """The wrapper's own variables but the training-call counter."""
        return [v for v in (self._trainable_variables
                            + self._non_trainable_variables)
                if v is not getattr(self, "_training_calls", None)]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._saved_variables()):
            store[f"{i}"] = variable

    def load_own_variables(self, store):
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"LUTQWrapper '{self.name}': the file holds "
                f"{len(store.keys())} variables for this layer, the layer "
                f"has {len(variables)}. Was the file saved from a model "
                "with a different quantizer (per_channel, channel_scales)?"
            )
        for i, variable in enumerate(variables):
            variable.assign(store[f"{i}"])
        # Restored exactly as saved: no k-means at first use.
        self._fitted = True

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(
            self.quantizer
        )
        return config


def _num_pruned(state):
    """The pruning count to pass to the compiled step (0 without pruning)."""
    if state.num_pruned is None:
        return tf.constant(0, tf.int32)
    return state.num_pruned.value
