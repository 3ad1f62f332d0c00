"""How much each per-layer choice is expected to raise the loss.

The measure: the k-means distortion of the choice, weighted per weight by a
diagonal Fisher (squared-gradient) estimate from the calibration batches,

    s(layer, choice) = 1/2 * sum_i F_i * (w_i - q_i)^2,

where q = d[A] is the dictionary LUT-Q's own initialisation fits for that
choice (`LUTQuantizer.initialize`: quantile seeds, Lloyd steps), and int8
is the converter's symmetric per-channel rounding. Why this one (the
HAWQ / OBS family): at a trained minimum the gradient term of the loss's
Taylor expansion averages out and the change is the quadratic term; the
Fisher diagonal is the cheap, positive estimate of that curvature, and it
tells apart weights that matter from weights that don't (a plain squared
error treats a first-layer weight like a classifier weight). Measured
(`benchmarks/budgets.py --parts=ranking`): on the digits CNN, applying each
of 24 single-layer choices and measuring the test loss, the Fisher-weighted
distortion ranks them with Spearman 0.91, the plain squared error 0.65.

Two estimates of F, by what the batches hold:
- inputs and labels, and a loss: the empirical Fisher, squared gradients of
  the batch's mean loss times the batch size (per-example gradients would
  cost a pass per example);
- inputs only: the Gauss-Newton diagonal of the outputs, `J^T J`, from
  gradients of `sum(r * f(x))` with random signs r; its square is an
  unbiased estimate of the per-example sum (the cross terms vanish in
  expectation). It needs no labels, but on random inputs it says little.
"""

import numpy as np
import tensorflow as tf

from lutq_tf.registry import channel_matrix


def fisher(model, kernels, x, y=None, loss=None, batch_size=16, max_batches=8,
           seed=0):
    """Diagonal Fisher estimates of the given kernels.

    Args:
        model: The float Keras model.
        kernels: `{key: keras Variable}` of the kernels to estimate.
        x: Inputs, an array `(N,) + input shape` (or a list of arrays for
            several inputs).
        y: Labels `(N, ...)`, or None (Gauss-Newton from random signs).
        loss: A Keras loss (callable or name) when `y` is given.
        batch_size: Examples per gradient.
        max_batches: At most this many batches (from the start of `x`).
        seed: Seed of the random signs.

    Returns:
        `{key: float64 array}` shaped like each kernel: mean over batches of
        the squared gradient times the batch size.
    """
    import keras

    inputs = x if isinstance(x, (list, tuple)) else [x]
    count = len(inputs[0])
    loss_fn = keras.losses.get(loss) if y is not None else None
    rng = np.random.default_rng(seed)
    keys = list(kernels)
    variables = [kernels[k] for k in keys]
    totals = [np.zeros(v.shape, np.float64) for v in variables]
    batches = 0
    for start in range(0, count, batch_size):
        if batches >= max_batches:
            break
        batch = [np.asarray(a[start:start + batch_size]) for a in inputs]
        size = len(batch[0])
        with tf.GradientTape() as tape:
            out = model(batch if len(batch) > 1 else batch[0], training=False)
            if loss_fn is not None:
                value = tf.reduce_mean(loss_fn(y[start:start + size], out))
                scale = float(size)
            else:
                outs = out if isinstance(out, (list, tuple)) else [out]
                value = 0.0
                for o in outs:
                    signs = rng.choice([-1.0, 1.0], size=tuple(o.shape))
                    value += tf.reduce_sum(tf.cast(o, tf.float32) * signs)
                scale = 1.0
        grads = tape.gradient(value, variables)
        for total, grad in zip(totals, grads):
            if grad is not None:
                total += scale * np.square(np.asarray(grad, np.float64))
        batches += 1
    return {k: t / max(batches, 1) for k, t in zip(keys, totals)}


def kmeans_distortion(array, channel_axes, bits, mode, weights, iterations=20):
    """`1/2 sum F (w - q)^2` of LUT-Q's initial fit for one choice.

    Args:
        array: float32 kernel.
        channel_axes: Its output-channel axes.
        bits: Index bits (K = 2**bits).
        mode: `"tensor"`, `"scaled"` or `"channel"`.
        weights: F, shaped like `array`.
        iterations: Lloyd steps after the quantile seeds.
    """
    from lutq_tf.quantizer import LUTQuantizer

    w = channel_matrix(np.asarray(array, np.float32), channel_axes)
    f = channel_matrix(np.asarray(weights, np.float64), channel_axes)
    quantizer = LUTQuantizer(bits=bits, per_channel=mode == "channel",
                             channel_scales=mode == "scaled",
                             init_iterations=iterations)
    # The wrapper fits a per-tensor dictionary to one column (`[M*C, 1]`).
    shaped = w if mode != "tensor" else w.reshape(-1, 1)
    _, _, q = quantizer.initialize(tf.constant(shaped))
    q = np.asarray(q, np.float64).reshape(w.shape)
    return 0.5 * float(np.sum(f * np.square(w - q)))


def int8_distortion(array, channel_axes, weights, per_tensor=False):
    """`1/2 sum F (w - q)^2` of symmetric int8 rounding: per channel, or
    with `per_tensor` one scale for the tensor (per-tensor FULLY_CONNECTED
    weights)."""
    w = channel_matrix(np.asarray(array, np.float64), channel_axes)
    f = channel_matrix(np.asarray(weights, np.float64), channel_axes)
    scale = np.abs(w).max(axis=0) / 127.0
    if per_tensor:
        scale = np.full_like(scale, np.abs(w).max() / 127.0)
    scale = np.where(scale > 0, scale, 1.0)
    q = np.round(w / scale) * scale
    return 0.5 * float(np.sum(f * np.square(w - q)))
