"""What a written file costs on a microcontroller, for a `target.Target`.

Reads the files themselves (the export and the int8 route's slim file of the
same model), so it judges any .tflite the same way:

- firmware flash: the file change plus the code of ops the int8 route does
  not link (DECODE once, CONCATENATION for splits);
- decode instructions per inference: each DECODE output by its path, from
  the mechanism of TFLM's `decode_state_lut.cc` (block paths walk each
  channel from its index offset: weights before the first aligned block and
  after the last full one take the per-weight loop);
- the int8 model's instructions, from its MACs and the target's per-MAC
  costs, to put decoding in proportion;
- the arena for the target's kernel set (`arena`): an upper bound of a
  32-bit Cortex-M build's, from the wheel's recorded split (activations
  kept, persistent data recomputed for 32-bit pointers: `arena.device_arena`),
  plus the largest CMSIS-NN scratch request (`kernel_scratch`) for CMSIS-NN
  (without the reference kernels' int4 unpack buffers, which CMSIS-NN does
  not allocate).
"""

import dataclasses

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from tflite_export.device import kernel_scratch
from tflite_export.device import target as targets
from tflite_export.pipeline import arena as arena_lib
from tflite_export.pipeline import flatbuffer
from tflite_export.pipeline import int4 as int4_lib

DECODE_OP = "TFLM_DECODE"
# DCM byte 5 holds the index width in its low 3 bits (the kernel masks it).
_DCM_PARAMS = 5
_BIT_WIDTH_MASK = 0x07


@dataclasses.dataclass
class DecodedTensor:
    """One DECODE output and what decoding it costs per inference.

    Attributes:
        name: The decoded tensor's name in the file ("" in a slim file).
        elements: Weights it holds.
        bits: Index width.
        channels: Channels DECODE walks (the output's per-channel scales; 1
            per tensor).
        alternate_axis: Whether its channels are on the last axis (a
            per-channel depthwise kernel): DECODE then takes the per-weight
            loop at any width.
        path: The DECODE path (`target.DECODE_PATHS`).
        instructions: Estimated instructions per inference.
        index: The decoded tensor's index in subgraph 0.
    """

    name: str
    elements: int
    bits: int
    channels: int
    alternate_axis: bool
    path: str
    instructions: float
    index: int = -1


def decode_path(bits, int8_output=True, alternate_axis=False):
    """The DECODE path TFLM takes for a tensor (`decode_state_lut.cc`).

    Args:
        bits: Index width (1-7).
        int8_output: Whether the decoded tensor is int8.
        alternate_axis: Whether its channels are on its last axis.
    """
    if int8_output and not alternate_axis:
        if bits == 4:
            return "width4_16"
        if bits == 3:
            return "width3_32"
        if bits == 2:
            return "width2_16"
    return "width_any"


def decode_instructions(target, elements, bits, channels=1, alternate_axis=False,
                        int8_output=True):
    """Estimated instructions to decode one tensor once.

    Args:
        target: A `target.Target`.
        elements: Weights in the tensor.
        bits: Index width.
        channels: Channels of its quantisation (1 per tensor).
        alternate_axis: Whether the channels are on the last axis.
        int8_output: Whether the decoded tensor is int8.

    Returns:
        `(path, instructions)`.
    """
    path = decode_path(bits, int8_output, alternate_axis)
    cost = target.decode_paths[path]
    total = float(target.decode_tensor_instructions)
    if not cost.block:
        return path, total + elements * cost.per_weight + channels * cost.per_channel
    per_channel = elements // max(channels, 1)
    # Each channel starts where the previous one ended; the weights up to the
    # next block-aligned index and after its last full block are per weight.
    # Channels whose length is not a multiple of the block lose blocks to
    # this alignment: on 27-weight channels at 4 bits the walk gives 10.2
    # instructions per weight where a count of whole blocks per channel gives
    # the 8.7 issue 22 measured. Unresolved; the walk is what the source
    # does, and it errs high.
    starts = np.arange(channels, dtype=np.int64) * per_channel
    lead = np.minimum((-starts) % cost.block, per_channel)
    blocks = (per_channel - lead) // cost.block
    loose = per_channel - blocks * cost.block
    total += channels * cost.per_channel
    total += float(blocks.sum()) * cost.per_block + float(loose.sum()) * cost.per_weight
    return path, total


def _ops(model_bytes):
    """`(model, subgraph)` of a flatbuffer, unpacked."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    return model, model.subgraphs[0]


def decoded_tensors(target, model_bytes):
    """The `DecodedTensor`s of a file's DECODE ops."""
    model, subgraph = _ops(model_bytes)
    found = []
    for op in subgraph.operators:
        if flatbuffer.op_name(model, op) != DECODE_OP:
            continue
        for k, out in enumerate(op.outputs):
            ancillary = subgraph.tensors[int(op.inputs[2 * k + 1])]
            dcm = model.buffers[ancillary.buffer].data
            bits = int(dcm[_DCM_PARAMS]) & _BIT_WIDTH_MASK
            tensor = subgraph.tensors[int(out)]
            shape = [int(s) for s in tensor.shape]
            quant = tensor.quantization
            channels = len(quant.scale) if quant is not None and quant.scale is not None else 1
            channels = max(channels, 1)
            alternate = (
                channels > 1 and int(quant.quantizedDimension) == len(shape) - 1
            )
            int8 = tensor.type == schema.TensorType.INT8
            elements = int(np.prod(shape))
            path, count = decode_instructions(target, elements, bits, channels, alternate, int8)
            found.append(DecodedTensor(
                name=flatbuffer.text(tensor.name),
                elements=elements,
                bits=bits,
                channels=channels,
                alternate_axis=alternate,
                path=path,
                instructions=count,
                index=int(out),
            ))
    return found


def _op_macs(subgraph, op, name):
    """MACs of one CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED or
    TRANSPOSE_CONV op, from its tensors' shapes."""
    shape = [int(s) for s in subgraph.tensors[int(op.inputs[1])].shape]
    if name == "TRANSPOSE_CONV":
        # Every input value meets every filter tap of every output channel.
        data = subgraph.tensors[int(op.inputs[2])].shape
        return int(np.prod(data)) * int(np.prod(shape[:3]))
    out = int(np.prod(subgraph.tensors[int(op.outputs[0])].shape))
    if name == "CONV_2D":
        return out * int(np.prod(shape[1:]))  # [out, kh, kw, in]
    if name == "DEPTHWISE_CONV_2D":
        return out * int(np.prod(shape[1:3]))  # [1, kh, kw, out]
    return out * shape[-1]  # [units, in]


def macs(model_bytes):
    """`{op: MACs}` of a file's CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
    and TRANSPOSE_CONV ops, from their tensors' shapes."""
    model, subgraph = _ops(model_bytes)
    counts = {}
    for op in subgraph.operators:
        name = flatbuffer.op_name(model, op)
        if name in targets.MAC_OPS:
            counts[name] = counts.get(name, 0) + _op_macs(subgraph, op, name)
    return counts


@dataclasses.dataclass
class Int4Weights:
    """An op whose filter is native int4, and what that costs per inference.

    Attributes:
        op: The op's name, e.g. `"CONV_2D"`.
        elements: Weights of its filter.
        macs: Its MACs.
        instructions: Instructions it adds over its int8 kernel: the int4
            kernel's extra per MAC, plus an unpack per weight on kernel sets
            that unpack.
        saved_bytes: File bytes int4 saves over int8 (half the weights).
    """

    op: str
    elements: int
    macs: int
    instructions: float
    saved_bytes: int


def int4_weights(target, model_bytes):
    """The `Int4Weights` of a file's ops whose filter tensor is INT4."""
    model, subgraph = _ops(model_bytes)
    found = []
    for op in subgraph.operators:
        name = flatbuffer.op_name(model, op)
        if name not in targets.MAC_OPS:
            continue
        weights = subgraph.tensors[int(op.inputs[1])]
        if weights.type != schema.TensorType.INT4:
            continue
        elements = int(np.prod(weights.shape))
        count = _op_macs(subgraph, op, name)
        extra = (target.int4_mac_factor[name] - 1) * target.mac_instructions[name] * count
        found.append(Int4Weights(
            op=name, elements=elements, macs=count,
            instructions=extra + target.int4_unpack_instructions * elements,
            saved_bytes=elements - -(-elements // 2),
        ))
    return found


def op_names(model_bytes):
    """The names of a file's operators (builtin or custom), as a set."""
    model, subgraph = _ops(model_bytes)
    return {flatbuffer.op_name(model, op) for op in subgraph.operators}


@dataclasses.dataclass
class DeviceReport:
    """An export against the int8 route on one target.

    Attributes:
        target: The `target.Target` judged on.
        file_change: Written file bytes minus the slim int8 file's.
        code_added: `{op: bytes}` of code the export links beyond the int8
            route's (DECODE once, CONCATENATION for splits).
        decoded: A `DecodedTensor` per DECODE output.
        int8_instructions: Estimated instructions per inference of the int8
            model's MAC ops (the rest of the model is not counted).
        arena_bytes: Arena for the target's kernel set, or None where not
            estimated.
        arena_note: What `arena_bytes` is.
        declined: When the export wrote the int8 file because compressing
            saved no firmware flash on the target, the `DeviceReport` of
            the compressed file it declined (against the int8 file
            written); else None.
        int4: An `Int4Weights` per op with a native int4 filter.
    """

    target: object
    file_change: int
    code_added: dict
    decoded: list
    int8_instructions: float
    arena_bytes: object = None
    arena_note: str = ""
    declined: object = None
    int4: list = dataclasses.field(default_factory=list)

    @property
    def flash_change(self):
        """Firmware flash (text+data) change against the int8 route."""
        return self.file_change + sum(self.code_added.values())

    @property
    def decode_instructions(self):
        return sum(t.instructions for t in self.decoded)

    @property
    def decode_share(self):
        """Decode instructions over the int8 model's MAC instructions."""
        return self.decode_instructions / self.int8_instructions if self.int8_instructions else 0.0

    @property
    def int4_instructions(self):
        return sum(w.instructions for w in self.int4)

    @property
    def break_even_decode_bytes(self):
        """The DECODE code size at which this export's DECODE ops pay for
        themselves: what the file saves beyond its int4 weights and the
        other code it links (0 when no DECODE size would)."""
        other = self.file_change + sum(w.saved_bytes for w in self.int4) + sum(
            size for op, size in self.code_added.items() if op != DECODE_OP
        )
        return max(-other, 0)

    @property
    def wins(self):
        return self.flash_change < 0

    @property
    def decode_pays(self):
        """Whether the file's DECODE ops save firmware flash: the same file
        with those tensors int8 (int4 ones kept) would be larger."""
        cost = self.code_added.get(DECODE_OP, 0)
        return self.break_even_decode_bytes > cost

    def verdict(self):
        """One line: does compression pay in firmware flash on this target?"""
        change = self.flash_change
        if not self.decoded and self.declined is not None:
            d = self.declined
            text = (
                f"int8 written: compressing would change the file by "
                f"{_signed(d.file_change)} B but link {format_code(d.code_added)}, firmware "
                f"{_signed(d.flash_change)} B on {self.target.name}"
            )
            if DECODE_OP in d.code_added:
                text += (
                    f"; it pays only with DECODE's code under {d.break_even_decode_bytes:,} B "
                    f"(break-even; this target's {self.target.decode_code_cost:,} B)"
                )
            return text + ". decode='always' writes the compressed file anyway."
        if not self.decoded:
            return f"no DECODE op: firmware {_signed(change)} B against the int8 route."
        if change < 0:
            return (
                f"compression saves {-change:,} B of firmware flash on {self.target.name} "
                f"(break-even DECODE code {self.break_even_decode_bytes:,} B, "
                f"this target's {self.target.decode_code_cost:,} B)."
            )
        return (
            f"compression LOSES on {self.target.name}: firmware {_signed(change)} B against "
            f"the int8 route; DECODE's code would have to be under "
            f"{self.break_even_decode_bytes:,} B to break even "
            f"(this target's {self.target.decode_code_cost:,} B)."
        )

    def lines(self):
        """The report's device section, as lines of text."""
        t = self.target
        code = format_code(self.code_added)
        lines = [
            f"  device ({t.name}, {t.kernels} kernels; estimated from the target's costs):",
            f"    firmware flash {_signed(self.flash_change)} B against the int8 route "
            f"(file {_signed(self.file_change)} B, code added: {code})",
        ]
        if self.arena_bytes is not None:
            lines.append(f"    arena {self.arena_bytes:,} B ({self.arena_note})")
        elif self.arena_note:
            lines.append(f"    arena: {self.arena_note}")
        if self.decoded:
            lines.append(
                f"    decode {self.decode_instructions:,.0f} instructions per inference, "
                f"{100 * self.decode_share:.1f} % of the int8 model's MAC instructions "
                f"({self.int8_instructions:,.0f})"
            )
            for d in self.decoded:
                name = d.name or f"tensor {d.index}"
                lines.append(
                    f"      {name}: {d.path}, {d.bits}-bit, {d.elements} weights "
                    f"in {d.channels} channel(s): {d.instructions:,.0f}"
                )
        if self.int4:
            lines.append(
                f"    int4 weights in {len(self.int4)} op(s): "
                f"{sum(w.saved_bytes for w in self.int4):,} B saved, "
                f"+{self.int4_instructions:,.0f} instructions per inference "
                f"({100 * self.int4_instructions / max(self.int8_instructions, 1):.1f} % of "
                "the int8 model's MAC instructions; no code added: the generic "
                "registrations link int4 kernels)"
            )
        lines.append(f"    verdict: {self.verdict()}")
        return lines


def _signed(value):
    return f"{value:+,}"


def format_code(code_added):
    """`{op: bytes}` (`DeviceReport.code_added`) as text, e.g.
    `"TFLM_DECODE 21,408 B"`; `"none"` when empty."""
    return ", ".join(f"{op} {size:,} B" for op, size in code_added.items()) or "none"


def arena_ops(model_bytes):
    """`(op names, outputs of each DECODE op, number of inputs)` of a file."""
    model, subgraph = _ops(model_bytes)
    names = [flatbuffer.op_name(model, op) for op in subgraph.operators]
    decodes = [len(op.outputs) for op, name in zip(subgraph.operators, names)
               if name == DECODE_OP]
    return names, decodes, len(subgraph.inputs)


def _host_arena(target, model_bytes, wheel_arena_bytes, compiler, why):
    """The fallback without the wheel's split: the 64-bit host arena (an
    upper bound of a 32-bit reference build's) plus, for CMSIS-NN, its
    largest scratch request."""
    note = (
        f"the host wheel's arena (64-bit pointers, reference kernels): an upper bound "
        f"for a 32-bit build's ({why})"
    )
    if target.kernels == "reference":
        return wheel_arena_bytes, note
    extra, where, _, unmodelled = _cmsis_nn_scratch(model_bytes, compiler)
    return wheel_arena_bytes + extra, (
        f"{note} + the largest CMSIS-NN scratch request {extra:,} B{where}{unmodelled}"
    )


def _cmsis_nn_scratch(model_bytes, compiler):
    """`(largest aligned request, where, request count, note)` of the
    CMSIS-NN scratch buffers of a file (`kernel_scratch`)."""
    rows = kernel_scratch.op_scratch(model_bytes, compiler=compiler, aligned=True)
    largest = max(
        (r for r in rows if r.cmsis_nn is not None), key=lambda r: r.cmsis_nn, default=None
    )
    extra = largest.cmsis_nn if largest is not None else 0
    where = f", {largest.op} op {largest.index}" if largest is not None and extra else ""
    count = sum(len(c) for _, _, _, c in kernel_scratch.op_requests(model_bytes, compiler)
                if c is not None)
    unmodelled = sorted({
        r.op for r in rows if r.cmsis_nn is None and r.op in kernel_scratch.CMSIS_NN_OPS
    })
    note = ""
    if unmodelled:
        note = (
            f"; CMSIS-NN scratch of {', '.join(unmodelled)} not modelled, so "
            "not counted: the arena may be larger"
        )
    return extra, where, count, note


def arena(target, model_bytes, wheel_arena_bytes, compiler="gcc", recording=None):
    """The arena a file needs on the target's kernel set, and what it is.

    An upper bound of a 32-bit Cortex-M build's arena (TFLM 90b983c2), from
    the mechanism (`arena.device_arena`): the wheel's head (activations and
    scratch buffers, as planned; independent of pointer size) plus its
    persistent tail recomputed for 32-bit pointers from the recorded counts
    (eval tensors, nodes, input/output tensors) and struct sizes (the
    allocator's objects, the kernels' OpData and DECODE state), with the
    device's worst-case alignment padding; or, where the wheel's smallest
    arena is a peak while preparing the ops, a bound of that peak. For
    CMSIS-NN the largest CMSIS-NN scratch request (`kernel_scratch`,
    aligned to 16 B) is added, and a 4-byte handle per request; the
    reference kernels' own scratch, already in the wheel's head, is not
    subtracted (a scratch buffer lives only while its op runs, so the
    largest one bounds what CMSIS-NN adds to the plan), except the int4
    unpack buffers: for a file with INT4 filters the CMSIS-NN estimate is
    made on the wheel's arena of the file with those filters stored INT8
    (`int4.as_int8`: the same graph, which the reference kernels run
    without unpacking), with the int4 file's CMSIS-NN requests. The
    reference kernels unpack each INT4 filter into a scratch buffer of its
    element count (conv_common.cc:204-212, depthwise_conv_common.cc:202-210,
    fully_connected.cc:69-77 at 90b983c2); CMSIS-NN's kernels run s4
    filters packed and request only their own scratch: CONV_2D the s8
    im2col buffer (cmsis_nn/conv.cc:154-168), DEPTHWISE_CONV_2D
    `arm_depthwise_conv_wrapper_s4_get_buffer_size` (C x KH x KW int16 on
    the opt path, even for 3x3; cmsis_nn/depthwise_conv.cc:175-191),
    FULLY_CONNECTED none (cmsis_nn/fully_connected.cc:127).

    Args:
        target: A profile name or `target.Target`.
        model_bytes: The file's flatbuffer.
        wheel_arena_bytes: Its smallest arena measured on the wheel (e.g.
            `ExportResult.arena_bytes`).
        compiler: The firmware's compiler, `"gcc"` or `"armclang"`
            (CMSIS-NN's 1x1 convolution takes a buffer only with Arm
            Compiler 6).
        recording: The wheel's `arena.Recording` of the file, if already
            taken; None runs the wheel once to take it.

    Returns:
        `(arena_bytes, note)`.
    """
    target = targets.get(target)
    names, decodes, num_inputs = arena_ops(model_bytes)
    packed = None
    if target.kernels == "cmsis-nn":
        unpacked = int4_lib.as_int8(model_bytes)
        if unpacked is not None:
            # The wheel's head without the reference int4 unpack buffers.
            packed = model_bytes
            model_bytes = unpacked
            wheel_arena_bytes = arena_lib.find_arena_size(
                unpacked, num_inputs, "model with its int4 filters as int8")
            recording = None
    if recording is None:
        recording = arena_lib.record(
            model_bytes, wheel_arena_bytes + arena_lib.MARGIN, num_inputs)
    if recording is None:
        return _host_arena(target, packed or model_bytes, wheel_arena_bytes, compiler,
                           "the wheel reported no split of its arena")
    estimate = arena_lib.device_arena(
        recording, names, decodes, target.kernels, wheel_arena_bytes)
    basis = (
        f"estimated for a 32-bit Cortex-M build of TFLM {kernel_scratch.TFLM_COMMIT[:8]} "
        f"with {target.kernels} kernels, an upper bound: the wheel's activations and "
        f"scratch {estimate.head:,} B"
        + (" (of the file with its int4 filters as int8: CMSIS-NN runs them packed, "
           "without the reference kernels' unpack buffers)" if packed else "")
        + f" + persistent data recomputed for 32-bit pointers "
        f"{estimate.tail_bytes:,} B (the wheel's {estimate.wheel_tail:,} B)"
    )
    if packed is not None:
        model_bytes = packed
    total = estimate.after_allocation
    peak = estimate.prepare_peak
    if target.kernels == "cmsis-nn":
        extra, where, count, unmodelled = _cmsis_nn_scratch(model_bytes, compiler)
        handles = count * arena_lib.SCRATCH_HANDLE[1]
        total += extra + handles
        # Each request also holds a ScratchBufferRequest in the head while
        # the ops are prepared.
        peak += count * arena_lib.SCRATCH_REQUEST[1] if peak else 0
        basis += (
            f" + the largest CMSIS-NN scratch request {extra:,} B{where} (read from "
            f"CMSIS-NN {kernel_scratch.CMSIS_NN_COMMIT[:8]}, {compiler} build; "
            f"{'other ' if packed else ''}reference scratch not subtracted) + {handles} B "
            "of scratch handles"
        )
        data = sorted(set(names) & arena_lib.CMSIS_NN_UNMODELLED_DATA)
        if data:
            unmodelled += (
                f"; CMSIS-NN persistent data of {', '.join(data)} taken as the "
                "reference kernels'"
            )
        basis += unmodelled
    if peak > total:
        basis += (
            f"; the peak while preparing the ops bounds it: the wheel's smallest "
            f"arena {wheel_arena_bytes:,} B less the device's smaller tensor and node "
            f"arrays ({total:,} B after allocation)"
        )
        total = peak
    return total, basis


def arenas(model_bytes, wheel_arena_bytes, compiler="gcc"):
    """`{kernel set: (arena_bytes, note)}` of a file on the Cortex-M4
    profiles' kernel sets (`"reference"`, `"cmsis-nn"`), from one recording
    of the wheel's arena (`arena`)."""
    _, _, num_inputs = arena_ops(model_bytes)
    recording = arena_lib.record(
        model_bytes, wheel_arena_bytes + arena_lib.MARGIN, num_inputs)
    profiles = {"reference": "cortex-m4-ref", "cmsis-nn": "cortex-m4-cmsis-nn"}
    return {
        kernels: arena(name, model_bytes, wheel_arena_bytes, compiler, recording)
        for kernels, name in profiles.items()
    }


def report(target, model_bytes, int8_bytes, arena_bytes=None, arena_note=""):
    """A `DeviceReport` of a file against the int8 route's file.

    Args:
        target: A profile name or `target.Target`.
        model_bytes: The export's flatbuffer.
        int8_bytes: The int8 route's (slim, uncompressed) flatbuffer of the
            same model.
        arena_bytes: The arena for the target's kernel set, if known.
        arena_note: What `arena_bytes` is, or why it is missing.
    """
    target = targets.get(target)
    ours, theirs = op_names(model_bytes), op_names(int8_bytes)
    code = {}
    if DECODE_OP in ours and DECODE_OP not in theirs and target.decode_code_cost:
        code[DECODE_OP] = target.decode_code_cost
    for op, size in target.op_code_bytes.items():
        if op in ours and op not in theirs and size:
            code[op] = size
    counts = macs(int8_bytes)
    return DeviceReport(
        target=target,
        file_change=len(model_bytes) - len(int8_bytes),
        code_added=code,
        decoded=decoded_tensors(target, model_bytes),
        int8_instructions=sum(target.mac_instructions[op] * n for op, n in counts.items()),
        arena_bytes=arena_bytes,
        arena_note=arena_note,
        int4=int4_weights(target, model_bytes),
    )
