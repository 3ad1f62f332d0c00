"""Finds the smallest tensor arena a model runs in on TFLM.

TFLM's Python interpreter reports no used-bytes figure, so the arena is
found by bisection: build an interpreter with a given arena and run it once.
Too small an arena mostly raises RuntimeError, but a very small one can
crash the process (segfault in the allocator), so the probing runs in a
child process; when it dies, the parent records the size that killed it as
too small and starts a new child.
"""

import os
import re
import subprocess
import sys

from tflite_export import tempfiles
from tflite_export.errors import ExportError
from tflite_export.errors import UnsupportedModelError

# Sizes are multiples of this (TFLM aligns the arena to 16 bytes anyway).
GRANULE = 16
# Head-room given to every interpreter that runs a model after the search:
# the bisection's minimum is exact only for the zero input it probed with.
MARGIN = 4096
_START = 16 * 1024
_LIMIT = 512 * 1024 * 1024
_MAX_RESTARTS = 12

# Child process: probes arena sizes, printing each before and after, so a
# crash leaves the size that caused it as the last "try" line.
_WORKER = r"""
import sys
import numpy as np
from tflite_micro import runtime

path, num_inputs, lo, hi, granule, start, limit, alt = sys.argv[1:9]
num_inputs, lo, granule, start, limit, alt = map(int, (num_inputs, lo, granule, start, limit, alt))
hi = int(hi) if hi != "none" else None
with open(path, "rb") as f:
    model = f.read()

def runs(size):
    print("try", size, flush=True)
    try:
        interpreter = runtime.Interpreter.from_bytes(
            model, arena_size=size, alt_decompression_memory_size=alt)
        for i in range(num_inputs):
            details = interpreter.get_input_details(i)
            interpreter.set_input(np.zeros(details["shape"], details["dtype"]), i)
        interpreter.invoke()
    except Exception as e:
        print("fail", size, str(e).replace("\n", " "), flush=True)
        return False
    print("ok", size, flush=True)
    return True

if hi is None:
    size = max(start, 2 * lo)
    while not runs(size):
        if size >= limit:
            print("never", flush=True)
            sys.exit(0)
        size = min(2 * size, limit)
    hi = size
while hi - lo > granule:
    mid = (lo + hi) // 2 // granule * granule
    if mid <= lo:
        break
    if runs(mid):
        hi = mid
    else:
        lo = mid
print("done", hi, flush=True)
"""


def _unsupported_ops(stderr):
    return sorted(set(re.findall(r"Didn't find op for builtin opcode '(\w+)'", stderr)))


def find_arena_size(model_bytes, num_inputs=1, what="model", alt_decompression_bytes=0):
    """Bisects for the smallest arena (in bytes) that runs the model on TFLM.

    Args:
        model_bytes: The .tflite flatbuffer.
        num_inputs: Number of model inputs (fed zeros).
        what: Name of the model for error messages.
        alt_decompression_bytes: Size of TFLM's alternate decompression
            region (`SetDecompressionMemory` on a device): DECODE outputs go
            there instead of the arena, one at a time. 0: none.

    Returns:
        The arena size in bytes, a multiple of 16.

    Raises:
        UnsupportedModelError: TFLM cannot run the model with any arena
            (it lacks a kernel for one of the ops, or a kernel refuses the
            graph); the message names the ops or gives TFLM's log.
        ExportError: the search crashed.
    """
    lo, hi = 0, None
    with tempfiles.temp_dir("arena") as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(model_bytes)
        for _ in range(_MAX_RESTARTS):
            # cwd is the empty temp dir so nothing there shadows an import.
            proc = subprocess.run(
                [sys.executable, "-c", _WORKER, path, str(num_inputs), str(lo),
                 "none" if hi is None else str(hi), str(GRANULE), str(_START),
                 str(_LIMIT), str(int(alt_decompression_bytes))],
                capture_output=True, text=True, cwd=tmp,
            )
            last_try, last_error = None, ""
            for line in proc.stdout.splitlines():
                words = line.split(" ", 2)
                if words[0] == "try":
                    last_try = int(words[1])
                elif words[0] == "ok":
                    hi, last_try = int(words[1]), None
                elif words[0] == "fail":
                    lo, last_try = int(words[1]), None
                    last_error = words[2] if len(words) > 2 else ""
                elif words[0] == "done":
                    return int(words[1])
                elif words[0] == "never":
                    ops = _unsupported_ops(proc.stderr)
                    if ops:
                        raise UnsupportedModelError(
                            f"TFLM has no kernel for op(s) {', '.join(ops)} in "
                            f"the {what}; replace the layers that produce "
                            "them with ones TFLM supports."
                        )
                    # Not the arena: TFLM refused the graph (a kernel's
                    # Prepare failed); its log repeats once per try.
                    log = "\n".join(dict.fromkeys(proc.stderr.splitlines()))
                    raise UnsupportedModelError(
                        f"TFLM cannot run the {what} even with a "
                        f"{_LIMIT}-byte arena: {last_error}\n{log[-2000:]}"
                    )
            if proc.returncode == 0 or last_try is None:
                raise ExportError(
                    f"Arena search for the {what} stopped unexpectedly "
                    f"(exit code {proc.returncode}):\n{proc.stderr[-2000:]}"
                )
            # The child died probing `last_try`: too small.
            lo = last_try
        raise ExportError(f"Arena search for the {what} kept crashing TFLM.")
