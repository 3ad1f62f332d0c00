"""Finds the smallest tensor arena a model runs in on TFLM.

TFLM's Python interpreter reports no used-bytes figure, so the arena is
found by bisection: build an interpreter with a given arena and run it once.
Too small an arena mostly raises RuntimeError, but a very small one can
crash the process (segfault in the allocator), so the probing runs in a
child process; when it dies, the parent records the size that killed it as
too small and starts a new child.
"""

import dataclasses
import os
import re
import subprocess
import sys

from tflite_export.errors import ExportError
from tflite_export.errors import UnsupportedModelError
from tflite_export.pipeline import tempfiles

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


# --- The arena's split on the wheel, and on a 32-bit device ------------------
#
# The wheel builds its interpreter with TFLM's RecordingMicroAllocator, whose
# PrintAllocations reports the arena's head (activations and scratch buffers,
# planned by the memory planner) and tail (persistent data) and the tail's
# recorded parts. A 32-bit Cortex-M build keeps the same head (buffer sizes
# and their 16-byte alignment do not depend on pointers) and a smaller tail:
# most persistent structs hold pointers. `device_arena` recomputes the tail
# for 32 bits from the recorded counts and the struct sizes below.

# Child process: runs the model once in a given arena and prints the
# recording allocator's report (MicroPrintf writes to the process's stderr).
_RECORD_WORKER = r"""
import sys
import numpy as np
from tflite_micro import runtime

path, num_inputs, size = sys.argv[1:4]
with open(path, "rb") as f:
    model = f.read()
interpreter = runtime.Interpreter.from_bytes(model, arena_size=int(size))
for i in range(int(num_inputs)):
    details = interpreter.get_input_details(i)
    interpreter.set_input(np.zeros(details["shape"], details["dtype"]), i)
interpreter.invoke()
sys.stderr.flush()
interpreter.print_allocations()
"""

_TOTALS = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")
_PART = re.compile(
    r"'([^']+)' used (\d+) bytes with alignment overhead \(requested (\d+) bytes for (\d+) "
)


@dataclasses.dataclass
class Recording:
    """The wheel's arena after `AllocateTensors`, as its recording allocator
    reports it.

    Attributes:
        total: Bytes used (head + tail).
        head: Non-persistent bytes: the memory plan of activations and
            scratch buffers.
        tail: Persistent bytes.
        parts: `{name: (used, requested, count)}` of the recorded parts of
            the tail (`RecordingMicroAllocator::PrintAllocations`), e.g.
            `"TfLiteEvalTensor data"`.
    """

    total: int
    head: int
    tail: int
    parts: dict

    def used(self, name):
        return self.parts.get(name, (0, 0, 0))[0]

    def count(self, name):
        return self.parts.get(name, (0, 0, 0))[2]


def parse_recording(text):
    """A `Recording` from the text of `print_allocations`, or None."""
    totals = dict((k, int(v)) for k, v in _TOTALS.findall(text))
    if set(totals) != {"total", "head", "tail"}:
        return None
    parts = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in _PART.findall(text)}
    return Recording(totals["total"], totals["head"], totals["tail"], parts)


def record(model_bytes, arena_bytes, num_inputs=1):
    """The wheel's `Recording` of a model run in an arena of `arena_bytes`
    (a size it runs in, e.g. `find_arena_size` + `MARGIN`); None when the
    wheel does not run it or reports nothing."""
    with tempfiles.temp_dir("arena") as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(model_bytes)
        proc = subprocess.run(
            [sys.executable, "-c", _RECORD_WORKER, path, str(num_inputs), str(int(arena_bytes))],
            capture_output=True, text=True, cwd=tmp,
        )
    if proc.returncode != 0:
        return None
    return parse_recording(proc.stdout + "\n" + proc.stderr)


# Struct sizes, (wheel, device) bytes: the wheel is x86-64 (LP64) built with
# TF_LITE_STATIC_MEMORY and USE_TFLM_COMPRESSION (its recording allocator
# reports 'Persistent compression data'); the device is a 32-bit Cortex-M
# (AAPCS: 4-byte pointers and size_t, 8-byte double) built without
# USE_TFLM_COMPRESSION (DECODE does not need it; issue 22). Enums count 4
# bytes: GCC for arm-none-eabi defaults to short enums, which only shrink
# the structs, so the sizes bound either build. Read at TFLM 90b983c2
# (`kernel_scratch.TFLM_COMMIT`); the wheel's sizes reproduce its recorded
# bytes (tests/tflite_export/device/test_firmware.py).
#
# tensorflow/lite/core/c/common.h:753-765: {data, dims, type}.
EVAL_TENSOR = (24, 12)
# common.h:678-714 (TF_LITE_STATIC_MEMORY): quantization {int type, void*},
# params {float, int32}, data, dims, size_t bytes, type, allocation_type,
# bool is_variable.
TFLITE_TENSOR = (64, 40)
# common.h:380-384: {scale*, zero_point*, int32 quantized_dimension}; the
# zero-point TfLiteIntArray beside it (4 + 4 per channel) is the same on both.
AFFINE_QUANTIZATION = (24, 12)
# micro_allocator.h:82-85: TfLiteNode (common.h:723-746: 6 pointers and an
# int) and a registration pointer.
NODE_AND_REGISTRATION = (64, 32)
# The allocator's own objects, allocated in the tail before the model's
# (micro_allocator.cc:542-580, 637-652; recording_micro_allocator.cc:45-62).
# The wheel's are the recording variants.
ALLOCATOR_OBJECTS = {
    # single_arena_buffer_allocator.h:124-139: two vtable pointers (two
    # interfaces), five pointers, intptr_t and int; the recording variant
    # adds four size_t (recording_single_arena_buffer_allocator.h:53-56).
    "SingleArenaBufferAllocator": (104, 36),
    # greedy_memory_planner.h:131-163: vtable, 2 ints, 4 pointers, 2 ints,
    # a pointer and a bool.
    "GreedyMemoryPlanner": (72, 44),
    # micro_allocator.h:339-361: vtable, 4 pointers, bool, size_t, pointer,
    # size_t; the recording variant adds a pointer and 8 RecordedAllocation
    # records of 3 size_t (recording_micro_allocator.h:120-133).
    "MicroAllocator": (272, 36),
    # micro_allocator.cc:62-81: vtable and a pointer.
    "MicroBuiltinDataAllocator": (16, 8),
    # micro_allocator.h:97-103: 2 pointers, + 1 with USE_TFLM_COMPRESSION.
    "SubgraphAllocations": (24, 8),
}
# MicroArenaBufferAlignment() (micro_arena_constants.h:24): kernels'
# persistent buffers (micro_allocator.cc:690-693) start at a multiple of 16
# below the tail (single_arena_buffer_allocator.cc:108-123).
ALIGNMENT = 16
# Where a 16-aligned run of persistent buffers follows 4-aligned data on the
# device, up to 12 bytes pad it: before the kernels' buffers (after the
# builtin data), the input tensor array and the output tensor array
# (micro_interpreter.cc:234-267), and variable buffers. Plus up to 3 bytes
# at an arena end that is not 4-aligned.
_RUN_PAD = 12
_END_PAD = 3

# Kernel persistent data whose size differs between the wheel and the device,
# by op: `{op: {kernel set: (wheel bytes, device bytes)}}` of the struct its
# Init allocates (rounded up to ALIGNMENT by the allocator). Ops not listed
# keep the wheel's bytes: pointers only shrink on 32 bits.
OP_DATA = {
    # OpDataConv (kernels/conv.h:27-60; conv_common.cc:77, also depthwise):
    # TfLitePaddingValues (4 ints), 5 ints, 2 pointers, 3 ints, + 2 ints
    # with USE_TFLM_COMPRESSION: 80 on the wheel, 56 on the device; CMSIS-NN
    # wraps it with an int (cmsis_nn/conv.cc:33-38, depthwise_conv.cc:35-40).
    "CONV_2D": {"reference": (80, 56), "cmsis-nn": (80, 60)},
    "DEPTHWISE_CONV_2D": {"reference": (80, 56), "cmsis-nn": (80, 60)},
    # OpDataFullyConnected (kernels/fully_connected.h:26-61): 9 ints, 2
    # pointers, a bool, + 2 ints; CMSIS-NN adds 2 ints, a pointer and 3
    # int32 (cmsis_nn/fully_connected.cc:35-47).
    "FULLY_CONNECTED": {"reference": (72, 45), "cmsis-nn": (72, 72)},
    # SoftmaxParams (kernels/internal/types.h:968-988; softmax_common.cc:142):
    # a double, 7 ints, 5 pointers; CMSIS-NN adds 2 int32
    # (cmsis_nn/softmax.cc:32-36).
    "SOFTMAX": {"reference": (80, 56), "cmsis-nn": (80, 64)},
    # OpDataPooling (kernels/pooling.h:37-43; pooling.cc:96): 6 ints and 2
    # floats, no pointers; CMSIS-NN adds an int (cmsis_nn/pooling.cc:30-35),
    # which crosses a 16-byte boundary: larger on the device.
    "MAX_POOL_2D": {"reference": (32, 32), "cmsis-nn": (32, 36)},
    "AVERAGE_POOL_2D": {"reference": (32, 32), "cmsis-nn": (32, 36)},
}
# CMSIS-NN kernels with their own persistent data that OP_DATA does not
# model (cmsis_nn/svdf.cc, transpose_conv.cc, batch_matmul.cc,
# unidirectional_sequence_lstm.cc); CMSIS-NN's ADD keeps the reference
# layout (cmsis_nn/add.cc:37-62, add.h:31-54), and the other ops run the
# reference kernels.
CMSIS_NN_UNMODELLED_DATA = frozenset({
    "SVDF", "TRANSPOSE_CONV", "BATCH_MATMUL", "UNIDIRECTIONAL_SEQUENCE_LSTM",
})
# TFLM_DECODE's Prepare (kernels/decode.cc:60-61) allocates an array of
# DecodeState pointers, then a DecodeStateLut per output (decode_state.cc:
# 28-29): DecodeState's vtable and 2 pointers (decode_state.h:85-86) and
# decode_state_lut.h:77-84: 2 pointers, 3 size_t and 3 bytes.
DECODE_STATE_LUT = (72, 35)
DECODE_STATE_POINTER = (8, 4)
# micro_allocator.h:90-93: a pointer per scratch buffer request, in the tail
# (micro_allocator.cc:1214-1231); micro_allocator.h:62-71: a request {size_t,
# int, int} in the head while ops are prepared (micro_allocator.cc:695-764).
SCRATCH_HANDLE = (8, 4)
SCRATCH_REQUEST = (16, 12)


_RECOMPUTED = frozenset({
    "TfLiteEvalTensor data", "Persistent TfLiteTensor data",
    "Persistent TfLiteTensor quantization data", "Persistent buffer data",
    "TfLiteTensor variable buffer data", "NodeAndRegistration struct",
})


def round_up(n, to=ALIGNMENT):
    return n + (-n % to)


@dataclasses.dataclass
class DeviceArena:
    """The arena of a 32-bit device build, estimated from the wheel's.

    Attributes:
        kernels: `"reference"` or `"cmsis-nn"` (whose persistent OpData
            this counts; its scratch buffers are added by `firmware.arena`).
        head: The wheel's head: activations and reference scratch buffers.
        tail: `{part: bytes}` of the device's persistent data.
        wheel_tail: The wheel's tail.
        prepare_peak: An upper bound of the device's peak while preparing
            the ops, when the wheel's smallest arena exceeds its state after
            `AllocateTensors` (temporary tensors and per-channel zero points
            of the op being prepared); else 0.
    """

    kernels: str
    head: int
    tail: dict
    wheel_tail: int
    prepare_peak: int = 0

    @property
    def tail_bytes(self):
        return sum(self.tail.values())

    @property
    def after_allocation(self):
        return self.head + self.tail_bytes

    @property
    def total(self):
        return max(self.after_allocation, self.prepare_peak)


def _op_data_savings(op_names, decode_outputs, kernels):
    """Bytes the device's kernel persistent data saves over the wheel's."""
    saved = 0
    for name in op_names:
        sizes = OP_DATA.get(name)
        if sizes is not None:
            wheel, device = sizes[kernels]
            saved += round_up(wheel) - round_up(device)
    for outputs in decode_outputs:
        saved += round_up(DECODE_STATE_POINTER[0] * outputs) - round_up(
            DECODE_STATE_POINTER[1] * outputs)
        saved += outputs * (round_up(DECODE_STATE_LUT[0]) - round_up(DECODE_STATE_LUT[1]))
    return saved


def device_arena(recording, op_names, decode_outputs=(), kernels="reference",
                 wheel_arena_bytes=None):
    """A 32-bit device's arena from the wheel's `Recording`.

    Args:
        recording: The wheel's `Recording` of the model.
        op_names: The model's operator names, one per op (e.g.
            `"CONV_2D"`, `"TFLM_DECODE"`).
        decode_outputs: The number of outputs of each DECODE op.
        kernels: The device's kernel set, `"reference"` or `"cmsis-nn"`.
        wheel_arena_bytes: The wheel's smallest arena (`find_arena_size`);
            when it exceeds `recording.total` by a granule or more, the
            peak while preparing ops is bounded too.

    Returns:
        A `DeviceArena`.
    """
    r = recording
    eval_count = r.count("TfLiteEvalTensor data")
    tensor_count = r.count("Persistent TfLiteTensor data")
    quant_used = r.used("Persistent TfLiteTensor quantization data")
    node_count = r.count("NodeAndRegistration struct")
    buffers = r.used("Persistent buffer data")
    variables = r.used("TfLiteTensor variable buffer data")
    recorded = sum(used for used, _, _ in r.parts.values())
    # Recorded parts this does not recompute (e.g. 'Persistent compression
    # data' of a file with TFLM's compression metadata) are kept whole.
    other = sum(used for name, (used, _, _) in r.parts.items() if name not in _RECOMPUTED)
    # The wheel's unrecorded tail: its allocator objects, the builtin op data
    # (ints and enums, no pointers: kept), scratch buffer handles (8 bytes
    # each, kept at 8) and alignment.
    wheel_objects = sum(w for w, _ in ALLOCATOR_OBJECTS.values())
    device_objects = sum(d for _, d in ALLOCATOR_OBJECTS.values())
    unrecorded = r.tail - recorded
    runs = 3 + (1 if variables else 0)
    tail = {
        "allocator objects": device_objects,
        "TfLiteEvalTensor": eval_count * EVAL_TENSOR[1],
        "NodeAndRegistration": node_count * NODE_AND_REGISTRATION[1],
        "input/output TfLiteTensor": tensor_count * TFLITE_TENSOR[1],
        # One TfLiteAffineQuantization per quantized input/output tensor
        # (two allocations with its zero points).
        "input/output quantization": quant_used - (
            r.count("Persistent TfLiteTensor quantization data") // 2
        ) * (AFFINE_QUANTIZATION[0] - AFFINE_QUANTIZATION[1]),
        "kernel data": buffers - _op_data_savings(op_names, decode_outputs, kernels),
        "variable buffers": variables,
        "other recorded data": other,
        "builtin data, scratch handles": max(unrecorded - wheel_objects, 0),
        "alignment": runs * _RUN_PAD + _END_PAD,
    }
    tail = {k: v for k, v in tail.items() if v}
    estimate = DeviceArena(kernels, r.head, tail, r.tail)
    if wheel_arena_bytes is not None and wheel_arena_bytes - r.total >= GRANULE:
        # The wheel's smallest arena is a peak while preparing ops (after
        # the allocator objects, tensor and node arrays are allocated): on
        # the device those arrays are smaller; the rest is bounded by the
        # wheel's bytes.
        early = (wheel_objects - device_objects
                 + eval_count * (EVAL_TENSOR[0] - EVAL_TENSOR[1])
                 + node_count * (NODE_AND_REGISTRATION[0] - NODE_AND_REGISTRATION[1]))
        estimate.prepare_peak = wheel_arena_bytes - early + _RUN_PAD + _END_PAD
    return estimate
