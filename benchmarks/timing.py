"""Epoch timing for Keras 3 and for tf_keras (the tfmot baseline's process).

No Keras import here: the tfmot baseline passes tf_keras, the rest Keras 3.
"""

import statistics
import time


def epoch_timer(keras):
    """A `keras.callbacks.Callback` recording wall and CPU seconds per epoch.

    CPU time is kept beside wall time because it varies less when other
    processes share the machine.

    Args:
        keras: the Keras module the model uses (`keras` or `tf_keras`).
    """

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []
            self.cpu_seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._cpu_start = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu_seconds.append(time.process_time() - self._cpu_start)

    return EpochTimer()


def ms_per_step(epoch_seconds, steps):
    """Median ms/step over epochs (the first, with tracing, dropped if there
    are several) and the per-epoch figures."""
    per_epoch = [1000.0 * s / steps for s in epoch_seconds]
    timed = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
    return statistics.median(timed), per_epoch
