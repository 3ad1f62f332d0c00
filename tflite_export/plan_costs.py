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

from tflite_export import build
from tflite_export import compress
from tflite_export import convert
from tflite_export import device
from tflite_export import lut_tensors
from tflite_export import shared_tables
from tflite_export import slim
from tflite_export.lut_tensors import MAX_TABLE_VALUES

# Dictionary modes: one per tensor, one over channel-RMS-scaled weights,
# one per output channel (`quantize_model`'s default, `channel_scales`,
# `per_channel`).
MODES = ("tensor", "scaled", "channel")
INT8 = "int8"
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
# TFLM's flatbuffer aligner starts every buffer's data on 16 bytes, so a
# buffer of n bytes takes ceil(n / 16) * 16 bytes plus a fixed part (its
# Buffer table and length prefix, in `overhead_bytes`). A compressed tensor
# adds two buffers, the packed indices and the ancillary DCM + tables, each
# padded by up to 15 B. The int8 buffer it replaces is counted unpadded (its
# padding, 0-15 B, is not credited), so the estimate stays on the safe side.
BUFFER_ALIGNMENT = 16


def _aligned(n):
    return -(-int(n) // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT


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
            per-weight loop at any width (`device.decode_path`).
    """

    layer: str
    tensor: str
    size: int
    channels: int
    shareable: bool
    negated: bool
    dead: bool
    alternate_axis: bool = False

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
    """

    int8_bytes: int
    tensors: dict

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

        Per tensor `device.decode_instructions` with its weights, the
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
            path, count = device.decode_instructions(
                target, facts.size, bits, facts.channels, facts.alternate_axis)
            if path not in paths:
                paths.append(path)
            total += count
        return "+".join(paths), total

    def estimate(self, choices):
        """Estimated file bytes of `{layer: (bits, mode)}` (others int8)."""
        total = self.int8_bytes + (DECODE_OPERATOR_BYTES if choices else 0)
        for layer, (bits, mode) in choices.items():
            cost = self.layer_bytes(layer, bits, mode)
            if cost is None:
                raise ValueError(
                    f"layer '{layer}': {bits} bits / {mode} would not make the "
                    "file smaller; the exporter keeps it int8."
                )
            total += cost - self.int8_layer_bytes(layer)
        return total


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
    tensors = {}
    for layout in layouts:
        match = layout.match
        weight = match.weight
        shared, _ = shared_tables.shared_codes(match)
        axis = weight.quantized_dimension
        tensors.setdefault(match.kernel.layer, []).append(TensorFacts(
            layer=match.kernel.layer,
            tensor=match.kernel.tensor,
            size=int(weight.array.size),
            channels=1 if axis is None else int(weight.array.shape[axis]),
            shareable=shared is not None,
            negated=bool(shared is not None and shared.negated),
            dead=_dead_channels(match),
            # As `device.decoded_tensors` reads it from a written file.
            alternate_axis=(axis is not None and weight.array.shape[axis] > 1
                            and axis == weight.array.ndim - 1),
        ))
    # A layer with an unmatched kernel (e.g. a SeparableConv whose pointwise
    # kernel the converter fused) cannot be planned tensor by tensor.
    expected = {}
    for kernel in kernels:
        expected[kernel.layer] = expected.get(kernel.layer, 0) + 1
    tensors = {name: facts for name, facts in tensors.items()
               if len(facts) == expected.get(name)}
    ordered = {name: tensors[name] for name in layers if name in tensors}
    return ByteModel(int8_bytes=len(slim_bytes), tensors=ordered)
