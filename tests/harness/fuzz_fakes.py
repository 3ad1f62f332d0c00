"""Stand-ins for `benchmarks.fuzz.run_case` that `test_fuzz` runs in the
fuzzer's child processes (a module of its own: a child imports it by name,
and it imports nothing heavy, so a child starts in well under a second).
"""

import os
import signal
import sys

# What the seeds do: die as a worker can (SIGKILL as the OOM killer, an
# abort as LLVM's when out of memory maps, a silent clean exit), else pass.
KILLED, ABORTED, EXITED = 1, 3, 6
LLVM_ERROR = "LLVM ERROR: out of memory (Cannot allocate memory)"


def case(seed, workdir, stages=()):
    if seed == KILLED:
        os.kill(os.getpid(), signal.SIGKILL)
    if seed == ABORTED:
        print(LLVM_ERROR, file=sys.stderr, flush=True)
        os.abort()
    if seed == EXITED:
        os._exit(0)
    return {"seed": seed, "outcome": "ok", "stage": "done", "message": "",
            "stages": {}, "seconds": 0.0, "pid": os.getpid(),
            "workdir": workdir, "stages_asked": list(stages)}
