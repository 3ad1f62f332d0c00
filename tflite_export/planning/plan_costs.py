"""File bytes of each per-layer choice (index bits, dictionary mode, int8).

The planner's byte model is the exporter's own accounting, not a second
formula: `compress.lut_bytes` (packed indices, DCM header, value tables)
plus `compress.overhead_bytes` (what a compressed tensor adds to a slim
file) for each compressed tensor, on top of the slim int8 file that
`export` writes when nothing is compressed. A file is then

    estimate = int8_bytes + sum over compressed tensors of
               (lut_bytes + overhead_bytes - int8 tensor bytes)
               (lut_bytes with its two buffers padded to 16 bytes)
               + DECODE_OPERATOR_BYTES if any tensor is compressed

What a choice costs also depends on facts that only the converted model
shows, so they are read once from a reference conversion (every candidate
layer at 1 index bit, one dictionary per tensor, the export's
`weight_quantization="per_channel"`):

- whether the tensor's channels can share one value table
  (`shared_tables.shared_codes`): a folded batch norm with a negative gamma
  puts negated codes into the table (up to 2K entries), an all-zero
  channel adds the code 0; a tensor read by several ops cannot share;
- its size and number of output channels (per-channel tables).

Every bound is taken on the safe side: a table is counted with all of its
K (or 2K + 1) entries although int8 rounding may merge some, so the
written file is never larger than the estimate. The exporter keeps the
smaller of a shared table and per-channel tables; so does the estimate.
The price: int8 rounding merges dictionary values closer than one int8
step, rare at K <= 16 but common at 5-7 bits (AD at 5-7 bits: the file
1.6 % below the estimate), and a scaled dictionary is counted at 2K
shared entries; so the planner offers 1-4 bits, per tensor or per
channel, unless asked for more.
"""

import dataclasses

import numpy as np

from tflite_export.device import firmware
from tflite_export.device import kernel_scratch
from tflite_export.pipeline import build
from tflite_export.pipeline import compress
from tflite_export.pipeline import convert
from tflite_export.pipeline import flatbuffer
from tflite_export.pipeline import int4 as int4_lib
from tflite_export.pipeline import lut_tensors
from tflite_export.pipeline import shared_tables
from tflite_export.pipeline import slim
from tflite_export.pipeline.lut_tensors import MAX_TABLE_VALUES

# Dictionary modes: one per tensor, one over channel-RMS-scaled weights,
# one per output channel (`quantize_model`'s default, `channel_scales`,
# `per_channel`).
MODES = ("tensor", "scaled", "channel")
INT8 = "int8"
# A layer's representation in the file: int8 weights, TFLM's native int4
# weights (an int4-exact dictionary, `constraint="int4"`: half the int8
# bytes, no tables, no DECODE), or a LUT that DECODE expands.
INT4 = "int4"
LUT = "lut"
REPRESENTATIONS = (INT8, INT4, LUT)
# Dictionary modes of an int4 layer (TFLM takes per-channel int4 for
# CONV_2D and DEPTHWISE_CONV_2D; FULLY_CONNECTED per tensor only).
INT4_MODES = ("tensor", "channel")
# An int4 dictionary holds at most 16 values (K = 2**4).
INT4_MAX_BITS = 4
# What `export` is called with when a FULLY_CONNECTED layer is int4: TFLM
# takes int4 FULLY_CONNECTED weights per tensor only, and the converter
# then quantises every Dense kernel per tensor.
DENSE_PER_TENSOR = "dense_per_tensor"
# What `export` must be called with for the estimate to hold (see
# `Plan.export_options`): per-channel int8 weights (the accounting's
# baseline), and shared tables whatever the agreement on the verification
# inputs (else `"auto"` may fall back to larger per-channel tables).
EXPORT_OPTIONS = {"weight_quantization": "per_channel", "shared_tables": True}
# TFLM's LUT decoding stores indices of 1 to 7 bits: the bits of
# `lut_tensors.MAX_TABLE_VALUES` (128) entries, its one home.
MAX_BITS = MAX_TABLE_VALUES.bit_length() - 1
# Beyond the exporter's per-tensor overhead, a file with any DECODE op
# holds its operator code (the custom op's name) once, and files are
# padded to 16 bytes: one compressed tensor of the digits CNN cost 144 to
# 184 B beyond its data (128 counted), two cost 272 (256 counted).
DECODE_OPERATOR_BYTES = 64
# A bias tensor's quantisation beyond its scales (4 B each): its table,
# vectors' lengths, a zero point. DS-CNN: 2,636 B for 10 biases of 588
# channels in all (28 B a tensor beyond the scales).
BIAS_QUANTIZATION_BYTES = 36
# TFLM's flatbuffer aligner starts every buffer's data on 16 bytes, so a
# buffer of n bytes takes ceil(n / 16) * 16 bytes plus a fixed part (its
# Buffer table and length prefix, in `overhead_bytes`). A compressed tensor
# adds two buffers, the packed indices and the ancillary DCM + tables, each
# padded by up to 15 B. The int8 buffer it replaces is counted unpadded (its
# padding, 0-15 B, is not credited), so the estimate stays on the safe side.
BUFFER_ALIGNMENT = 16


def _aligned(n):
    return -(-int(n) // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT


def int4_bytes(size):
    """File bytes of an int4 weight tensor of `size` elements: two codes a
    byte, its buffer padded to 16 bytes, and up to 16 more for what lies
    between two buffers' data (the Buffer table, the next length prefix:
    12 B here); the int8 buffer it replaces is counted unpadded, on the
    safe side as for LUTs."""
    return _aligned(-(-int(size) // 2)) + BUFFER_ALIGNMENT


def unshared_bias_bytes(size):
    """File bytes a bias buffer of `size` bytes adds when a rewrite (an
    int4 tensor's requantised bias) gives it its own buffer where the
    converter shared it with an identical one: its data and what lies
    between buffers, and an entry of the buffers vector (aligned)."""
    return 0 if not size else _aligned(size) + 2 * BUFFER_ALIGNMENT


def padded_lut_bytes(size, tables, entries):
    """`compress.lut_bytes` with each of its two buffers padded to 16 bytes.

    Args:
        size: Elements of the weight tensor.
        tables: Number of value tables (1 for a shared or per-tensor table).
        entries: Entries per table.
    """
    packed = -(-int(size) * compress.index_bits(entries) // 8)
    ancillary = compress.lut_bytes(size, tables, entries) - packed
    return _aligned(packed) + _aligned(ancillary)


@dataclasses.dataclass
class TensorFacts:
    """What the byte cost of one weight tensor depends on.

    Attributes:
        layer: Keras layer name.
        tensor: Kernel attribute (`"kernel"`, `"depthwise_kernel"`, ...).
        size: Elements (= int8 bytes) of the weight tensor.
        channels: Output channels (per-channel tables).
        shareable: Whether one value table can serve every channel.
        negated: Whether some channel's codes are negated (folded negative
            batch-norm factor): a shared table then holds up to 2K codes.
        dead: Whether some channel is all zero (adds the code 0).
        alternate_axis: Whether its channels are on its last axis (a
            per-channel depthwise kernel): TFLM's DECODE then takes the
            per-weight loop at any width (`firmware.decode_path`).
        op: The TFLite op that reads it (`"CONV_2D"`, ...; "" unknown).
        macs: That op's multiply-accumulates per inference.
        uses: Ops that read the tensor (int4 needs exactly one).
        shared_bias: Bytes of its op's bias where the converter shares
            that bias's buffer with another tensor (identical values), else
            0: stored as int4, the requantised bias needs its own buffer.
        folded: Whether the converter scaled its channels differently (a
            folded batch norm): its channels then cannot share one int4
            step, so a FULLY_CONNECTED kernel (per tensor only) cannot be
            int4, nor a per-tensor LUT under `DENSE_PER_TENSOR`.
        int4_scratch: `{kernel set: bytes}` the op's scratch buffers grow
            by when its filter is int4 instead of int8 (reference kernels
            unpack the filter into one as big; CMSIS-NN's s4 depthwise
            asks for C*KH*KW int16s), `kernel_scratch`'s figures, aligned.
    """

    layer: str
    tensor: str
    size: int
    channels: int
    shareable: bool
    negated: bool
    dead: bool
    alternate_axis: bool = False
    op: str = ""
    macs: int = 0
    uses: int = 1
    shared_bias: int = 0
    folded: bool = False
    int4_scratch: dict = dataclasses.field(default_factory=dict)

    def int4_modes(self):
        """The dictionary modes in which this tensor can be native int4."""
        per_channel = int4_lib.PER_CHANNEL_OPS.get(self.op)
        if per_channel is None or self.uses != 1:
            return ()
        if not per_channel:
            return () if self.folded else ("tensor",)
        return INT4_MODES

    def int4_instructions(self, target):
        """Instructions per inference an int4 filter adds over int8 on
        `target`: (int4_mac_factor - 1) x the op's int8 instructions per MAC
        x its MACs, plus an unpack per weight where the kernels unpack."""
        if self.op not in target.mac_instructions:
            return 0.0
        factor = target.int4_mac_factor[self.op]
        return float((factor - 1) * target.mac_instructions[self.op] * self.macs
                     + target.int4_unpack_instructions * self.size)

    def dense_per_tensor_lut_bytes(self, bits):
        """A per-tensor LUT's bytes when the converter quantises this
        FULLY_CONNECTED kernel per tensor (`DENSE_PER_TENSOR`): one table of
        K codes (one more for an all-zero channel), or None where that does
        not hold (a folded batch norm spreads the codes) or does not pay."""
        if self.folded:
            return None
        entries = 2**bits + int(self.dead)
        cost = padded_lut_bytes(self.size, 1, entries) + compress.overhead_bytes()
        return cost if cost < self.size else None

    def lut_bytes(self, bits, mode):
        """Bytes of the compressed tensor (data + overhead) at `bits`, `mode`."""
        k = 2**bits
        per_channel = padded_lut_bytes(self.size, self.channels, k)
        best = per_channel
        if mode != "channel" and self.shareable:
            # A scaled dictionary's shared codes are round(127 s_c d / (s_c
            # max|d|)): the division's rounding noise can put one value on
            # two codes (VWW at 3 bits: 9 codes for K = 8), so count 2K.
            doubled = self.negated or mode == "scaled"
            entries = (2 * k if doubled else k) + int(self.dead)
            if entries <= MAX_TABLE_VALUES:
                best = min(best, padded_lut_bytes(self.size, 1, entries))
        return best + compress.overhead_bytes()

    def bytes(self, bits, mode):
        """File bytes of this tensor for a choice, or None if it doesn't pay.

        The exporter leaves a tensor int8 when compressing it would not make
        the file smaller (`compress.decide`); such a choice costs accuracy
        for nothing, so the planner never offers it.
        """
        if mode == INT8:
            return self.size
        cost = self.lut_bytes(bits, mode)
        return cost if cost < self.size else None


@dataclasses.dataclass
class ByteModel:
    """The file's bytes as a function of the per-layer choices.

    Attributes:
        int8_bytes: The slim file with every weight int8 (nothing compressed).
        tensors: `{layer name: [TensorFacts]}` of the candidate layers.
        macs: `{op: MACs}` of the int8 file (`firmware.macs`).
        dense_per_tensor_bytes: What exporting with `DENSE_PER_TENSOR`
            changes in the file (may be negative), counted whenever a plan
            needs it: each FULLY_CONNECTED kernel keeps one scale instead of
            one per channel (-4 B per channel beyond the first, +4 B for
            alignment); TFLM checks
            a per-tensor FULLY_CONNECTED bias's scale at prepare
            (`kernel_util.cc`: |input scale x filter scale - bias scale| /
            output scale <= 0.02), so the slim step that drops every bias's
            quantisation is kept off when that would fail: each bias then
            keeps its scales (4 B each, one for a FULLY_CONNECTED bias) and
            ~36 B of tables (`BIAS_QUANTIZATION_BYTES`), counted always.
    """

    int8_bytes: int
    tensors: dict
    macs: dict = dataclasses.field(default_factory=dict)
    dense_per_tensor_bytes: int = 0

    def int8_instructions(self, target):
        """Estimated instructions per inference of the int8 model's MAC ops
        on `target` (`firmware.report`'s figure: MACs x instructions per MAC)."""
        return float(sum(target.mac_instructions.get(op, 0.0) * n
                         for op, n in self.macs.items()))

    def is_dense(self, layer):
        """Whether a layer's weights are FULLY_CONNECTED filters."""
        return any(f.op == "FULLY_CONNECTED" for f in self.tensors[layer])

    def int4_modes(self, layer):
        """The modes in which a layer can be native int4 (one tensor only)."""
        facts = self.tensors[layer]
        return facts[0].int4_modes() if len(facts) == 1 else ()

    def int4_layer_bytes(self, layer):
        """File bytes of a layer's weights as native int4."""
        return sum(int4_bytes(f.size) + unshared_bias_bytes(f.shared_bias)
                   for f in self.tensors[layer])

    def layer_bytes(self, layer, bits, mode):
        """Bytes of a layer's weight tensors for one choice, or None."""
        total = 0
        for facts in self.tensors[layer]:
            cost = facts.bytes(bits, mode)
            if cost is None:
                return None
            total += cost
        return total

    def int8_layer_bytes(self, layer):
        return sum(f.size for f in self.tensors[layer])

    def decode_cost(self, target, layer, bits):
        """`(path, instructions)` of decoding a layer's tensors at `bits` once.

        Per tensor `firmware.decode_instructions` with its weights, the
        channels of its int8 per-channel quantisation (DECODE walks them
        whatever the table layout) and whether they are on its last axis;
        the instructions are summed, the paths joined with `"+"` where a
        layer's tensors take different ones.

        Args:
            target: A `target.Target`.
            layer: A layer of `tensors`.
            bits: Index bits.
        """
        paths, total = [], 0.0
        for facts in self.tensors[layer]:
            path, count = firmware.decode_instructions(
                target, facts.size, bits, facts.channels, facts.alternate_axis)
            if path not in paths:
                paths.append(path)
            total += count
        return "+".join(paths), total

    def estimate(self, choices):
        """Estimated file bytes of `{layer: (bits, mode)}` (others int8).

        A choice may be `(bits, mode, representation)`: `LUT` (the default)
        or `INT4` (its bits and mode are the dictionary's; the file holds 4
        bits a weight and no DECODE op). Every LUT layer is costed as under
        per-channel int8 weights; under `DENSE_PER_TENSOR` a per-tensor LUT
        of a FULLY_CONNECTED kernel costs `dense_per_tensor_lut_bytes`, at
        most that.
        """
        luts = {k: v for k, v in choices.items() if len(v) < 3 or v[2] == LUT}
        total = self.int8_bytes + (DECODE_OPERATOR_BYTES if luts else 0)
        for layer, choice in choices.items():
            bits, mode = choice[:2]
            if layer not in luts:
                total += self.int4_layer_bytes(layer) - self.int8_layer_bytes(layer)
                continue
            cost = self.layer_bytes(layer, bits, mode)
            if cost is None:
                raise ValueError(
                    f"layer '{layer}': {bits} bits / {mode} would not make the "
                    "file smaller; the exporter keeps it int8."
                )
            total += cost - self.int8_layer_bytes(layer)
        return total


def fits(tensors, bits, mode):
    """Whether LUT-Q takes a choice: K = 2**bits <= the weights of each table.

    Args:
        tensors: A layer's `TensorFacts`.
        bits: Index bits.
        mode: A dictionary mode (`"channel"`: one table per output channel).
    """
    k = 2**bits
    for facts in tensors:
        per_table = facts.size // facts.channels if mode == "channel" else facts.size
        if per_table < k:
            return False
    return True


def smallest_layer_bytes(weights, bits):
    """A lower bound of a compressed layer's bytes at `bits`, in any mode.

    The packed indices of all `weights`, one table of K = 2**bits entries
    and one tensor's overhead: `TensorFacts.bytes` is never below it (a
    layer of several tensors pays a table and an overhead for each).
    """
    return compress.lut_bytes(weights, 1, 2**bits) + compress.overhead_bytes()


def candidate_layers(model):
    """Names of the layers whose kernels LUT-Q can take and TFLM can decode."""
    from lutq_tf import registry

    names = []
    for layer in lut_tensors.weight_layers(model):
        specs = [s for s in registry.quantizable_tensors(layer)
                 if s.attribute != "embeddings"]
        if not specs:
            continue
        # A per-tensor dictionary of K = 2 needs at least 2 weights.
        if min(int(np.prod(getattr(layer, s.attribute).shape)) for s in specs) < 2:
            continue
        names.append(layer.name)
    return names


def _dead_channels(match):
    """Whether some output channel is all zero or has a zero factor."""
    layout = np.moveaxis(np.abs(match.layout), match.weight.output_axis, 0)
    peaks = layout.reshape(layout.shape[0], -1).max(axis=1)
    factors = np.asarray(match.channel_factors)
    return bool(np.any(peaks == 0) or np.any(factors == 0))


_PADDING = {0: "same", 1: "valid"}  # schema.Padding


def _op_facts(model_bytes):
    """`({weight tensor index: (op, MACs, {kernel set: int4 scratch
    growth}, shared bias bytes)}, bias quantisation bytes)` of a converted
    file's CONV_2D,
    DEPTHWISE_CONV_2D, FULLY_CONNECTED and TRANSPOSE_CONV ops (filter =
    input 1), from their tensors' shapes; the second, what exporting with
    `DENSE_PER_TENSOR` changes (`ByteModel.dense_per_tensor_bytes`)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    subgraph = model.subgraphs[0]

    def shape(index):
        found = subgraph.tensors[int(index)].shape
        return tuple(int(d) for d in found) if found is not None else ()

    # Tensors per buffer: the converter shares one buffer among identical
    # constants (e.g. two equal biases).
    users = {}
    for tensor in subgraph.tensors:
        users[tensor.buffer] = users.get(tensor.buffer, 0) + 1
    facts = {}
    bias_bytes = 0
    for op in subgraph.operators or []:
        name = flatbuffer.op_name(model, op)
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED",
                        "TRANSPOSE_CONV"):
            continue
        weight = int(op.inputs[1])
        filter_shape, out = shape(weight), shape(op.outputs[0])
        outputs = int(np.prod(out)) if out else 0
        if name == "TRANSPOSE_CONV":
            macs = int(np.prod(shape(op.inputs[2]))) * int(np.prod(filter_shape[:3]))
        elif name == "CONV_2D":
            macs = outputs * int(np.prod(filter_shape[1:]))
        elif name == "DEPTHWISE_CONV_2D":
            macs = outputs * int(np.prod(filter_shape[1:3]))
        else:
            macs = outputs * int(filter_shape[-1])
        scratch = {}
        if name in int4_lib.PER_CHANNEL_OPS:
            params = {"per_channel": name != "FULLY_CONNECTED"}
            options = op.builtinOptions
            if name != "FULLY_CONNECTED":
                params["strides"] = (options.strideH, options.strideW)
                params["padding"] = _PADDING.get(options.padding, "valid")
                params["dilation"] = (options.dilationHFactor, options.dilationWFactor)
            for kernels in kernel_scratch.KERNEL_SETS:
                sizes = [kernel_scratch.scratch_bytes(
                    kernels, name, shape(op.inputs[0]), filter_shape, out,
                    dict(params, filter_dtype=dtype), aligned=True)
                    for dtype in ("int8", "int4")]
                scratch[kernels] = max(sizes[1] - sizes[0], 0)
        shared_bias = 0
        if len(op.inputs) > 2 and int(op.inputs[2]) >= 0:
            bias = subgraph.tensors[int(op.inputs[2])]
            data = model.buffers[bias.buffer].data
            if data is not None and users.get(bias.buffer, 0) > 1:
                shared_bias = len(data)
        facts.setdefault(weight, (name, macs, scratch, shared_bias))
        dense = name == "FULLY_CONNECTED"
        if dense:
            # Per tensor, its kernel keeps one scale of its C (4 B each).
            quant = subgraph.tensors[weight].quantization
            scales = 0 if quant is None or quant.scale is None else len(quant.scale)
            if scales > 1:
                # Less 4 B: the 8-byte alignment of its int64 zero points
                # can move (fuzz seeds 13 and 29: files 4 B over).
                bias_bytes -= 4 * (scales - 1) - 4
        if len(op.inputs) > 2 and int(op.inputs[2]) >= 0:
            bias = subgraph.tensors[int(op.inputs[2])]
            quant = bias.quantization
            scales = 0 if quant is None or quant.scale is None else len(quant.scale)
            if scales:
                bias_bytes += 4 * (1 if dense else scales) + BIAS_QUANTIZATION_BYTES
    return facts, bias_bytes


def _scaled_channels(match, negated):
    """Whether the converter scaled the kernel's output channels by
    different factors (a batch norm folded in): the per-channel int8 scale
    is max|w_c| / 127, so scale_c * 127 / max|keras_c| is channel c's
    factor |g_c| (exactly, unlike the least-squares `match.folded`, which
    int8 rounding moves on a dictionary of few values); or some channel's
    factor is negative."""
    weight = match.weight
    if negated:
        return True
    if weight.scales is None or weight.quantized_dimension is None:
        return bool(match.folded)
    layout = np.moveaxis(np.abs(match.layout), weight.output_axis, 0)
    peaks = layout.reshape(layout.shape[0], -1).max(axis=1).astype(np.float64)
    scales = np.asarray(weight.scales, np.float64)
    if scales.size != peaks.size:
        return bool(match.folded)
    live = peaks > 0
    if not np.any(live):
        return False
    factors = scales[live] * 127.0 / peaks[live]
    return bool(factors.max() > factors.min() * (1 + 1e-3))


def measure(model, representative_data, layers=None):
    """Reads the byte model of `model` from one reference conversion.

    Args:
        model: A float Keras model (Sequential or Functional).
        representative_data: Calibration inputs for the int8 conversion, as
            for `tflite_export.export` (e.g. an array `(N,) + input shape`).
        layers: Candidate layer names (default: `candidate_layers(model)`).

    Returns:
        A `ByteModel`. Layers whose kernels the converted model does not
        hold as a weight tensor of their own are left out (they stay int8).
    """
    import lutq_tf

    layers = candidate_layers(model) if layers is None else list(layers)
    # One dictionary of K = 2 per tensor: fast to fit, and enough to see
    # each tensor's channel factors (their signs) in the converted model.
    reference = lutq_tf.quantize_model(model, bits=1, layer_names=layers,
                                       init_iterations=1)
    plain, kernels, _ = lut_tensors.find_lut_kernels(reference)
    specs = convert.input_specs(plain, representative_data)
    data = convert.check_representative_data(plain, representative_data, "int8", specs)
    baseline, _, layouts, _, _ = build.convert_and_choose_tables(
        plain, kernels, "int8", data, "int8", "per_channel", share=True)
    # The slim file as `export` writes it when nothing is compressed: the
    # same slimming steps, each checked on TFLM.
    _, slim_bytes, _ = build.build_file(baseline, [], slim.STEPS, [], data)
    ops, bias_bytes = _op_facts(baseline)
    tensors = {}
    for layout in layouts:
        match = layout.match
        weight = match.weight
        shared, _ = shared_tables.shared_codes(match)
        axis = weight.quantized_dimension
        op, macs, scratch, shared_bias = ops.get(weight.index, (weight.op, 0, {}, 0))
        tensors.setdefault(match.kernel.layer, []).append(TensorFacts(
            layer=match.kernel.layer,
            tensor=match.kernel.tensor,
            size=int(weight.array.size),
            channels=1 if axis is None else int(weight.array.shape[axis]),
            shareable=shared is not None,
            negated=bool(shared is not None and shared.negated),
            dead=_dead_channels(match),
            # As `firmware.decoded_tensors` reads it from a written file.
            alternate_axis=(axis is not None and weight.array.shape[axis] > 1
                            and axis == weight.array.ndim - 1),
            op=op,
            macs=int(macs),
            uses=int(weight.uses),
            shared_bias=int(shared_bias),
            folded=_scaled_channels(
                match, bool(shared is not None and shared.negated)),
            int4_scratch=scratch,
        ))
    # A layer with an unmatched kernel (e.g. a SeparableConv whose pointwise
    # kernel the converter fused) cannot be planned tensor by tensor.
    expected = {}
    for kernel in kernels:
        expected[kernel.layer] = expected.get(kernel.layer, 0) + 1
    tensors = {name: facts for name, facts in tensors.items()
               if len(facts) == expected.get(name)}
    ordered = {name: tensors[name] for name in layers if name in tensors}
    return ByteModel(int8_bytes=len(slim_bytes), tensors=ordered,
                     macs=firmware.macs(slim_bytes), dense_per_tensor_bytes=bias_bytes)
