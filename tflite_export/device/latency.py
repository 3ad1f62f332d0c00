"""Host latency of .tflite files on TFLM's Python interpreter.

For comparing two files of one model (split against unsplit): both are
timed in the same process, round after round in turn, so a load change on
the machine hits both alike. Host figures say how much more work a file
asks for, not how long a microcontroller takes.
"""

import time

import numpy as np

from tflite_export.pipeline import tflm
from tflite_export.pipeline import verify as verify_lib
from tflite_export.pipeline.arena import MARGIN as _ARENA_MARGIN


def host_latency_us(files, arenas, rounds=5, invokes=20):
    """Median microseconds per `invoke` of each file, timed in turn.

    Args:
        files: .tflite flatbuffers (bytes) of models with the same inputs.
        arenas: Arena bytes each needs (the measured minimum).
        rounds: Rounds; each times every file once.
        invokes: Invokes per file per round (after one warm-up invoke).

    Returns:
        A list of floats, one per file: the median over all timed invokes.
    """
    _, runtime, _ = tflm.require()
    interpreters, inputs = [], []
    for model, size in zip(files, arenas):
        interpreter = runtime.Interpreter.from_bytes(
            bytes(model), arena_size=int(size) + _ARENA_MARGIN
        )
        details, _ = verify_lib.interpreter_io(interpreter, model)
        x = verify_lib.random_inputs(details, 1, np.random.default_rng(0))
        interpreters.append(interpreter)
        inputs.append([a[0] for a in x])
    times = [[] for _ in files]
    for _ in range(rounds):
        for number, (interpreter, x) in enumerate(zip(interpreters, inputs)):
            for i, value in enumerate(x):
                interpreter.set_input(value, i)
            interpreter.invoke()  # warm caches
            for _ in range(invokes):
                # TFLM keeps no input between invokes.
                for i, value in enumerate(x):
                    interpreter.set_input(value, i)
                start = time.perf_counter()
                interpreter.invoke()
                times[number].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e6 for t in times]
