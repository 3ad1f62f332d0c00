"""Keeps TFLM's decode buffers under a RAM limit: split, compress or keep int8.

TFLM decodes each compressed kernel into the arena right before the op
that reads it, so the arena grows by the largest decoded kernel (and by
~198 B of persistent state per DECODE op). Two ways to bound it, chosen per
weight tensor:

- `max_decode_bytes`: every compressed kernel that decodes to more than the
  limit is split into output-channel groups (`split.py`) that each decode
  to at most the limit. A layer that cannot be split (depthwise or
  transposed convolution, nested or shared layers) stays int8, which needs
  no decode buffer.
- `ram_bytes`: a budget for the whole arena. Among compress, split and
  keep int8 per tensor, the exporter takes the largest decode limit whose
  measured arena fits: a larger limit means fewer groups, so fewer DECODE
  ops, tables and CONCATENATIONs, the smallest file. Kernels whose single
  output channel decodes to more than the limit, and unsplittable ones
  above it, stay int8.

A split is made only if it pays: at least one group compressed and the
groups' savings above what their extra ops cost in the file. Groups too
small to compress would only add ops (and arena) to an int8 layer, so
such a layer stays int8, unsplit, with the reason in the report. This is
estimated before building and checked on the built file: a split whose
groups came out uncompressed, or that saves no bytes, is undone.

The report (`RamReport`) gives the main arena, the decode buffer, the
uncompressed twin's arena, and flash and host latency against the unsplit
compressed file.

Which arena `ram_bytes` counts (`ArenaBasis`): without a target, the
smallest arena measured on the host wheel (reference kernels, 64-bit
pointers); with one, the target's arena estimate for a 32-bit Cortex-M
build with its kernel set (`firmware.arena`: an upper bound, from the
wheel's recording of each file built, about a second each). Every
comparison of the search, and the report's arenas, use that one basis.
"""

import dataclasses
import hashlib
import numbers

import keras

from tflite_export.device import firmware
from tflite_export.device import latency
from tflite_export.pipeline import build
from tflite_export.pipeline import compress
from tflite_export.ram import split as split_lib
from tflite_export.result import RamChoice
from tflite_export.result import RamReport

# Arena bytes the estimate counts per DECODE op's state: none, as it mostly
# fits in the arena head's slack; every candidate is measured anyway.
DECODE_STATE_BYTES = 0
# Arena bytes each extra group op (FULLY_CONNECTED or CONV_2D, and the
# CONCATENATIONs) adds, for the estimate: TFLM's node and op data; the
# split twins of LeNet-5 (13 groups) and the digits CNN (fc1 in 5) measured
# ~215-240 B per extra op. The search corrects the estimate by each
# measured candidate.
GROUP_OP_BYTES = 220
# File bytes of one extra group beyond its weights and any DECODE op: the
# op, its weight, bias and output tensors, their quantisation and the
# CONCATENATION inputs. 39 extra one-channel groups of an int8 Dense
# measured ~265 B each (concatenations included).
GROUP_FILE_BYTES = 256
# Candidate models built at most when searching for a decode limit that
# fits `ram_bytes` (each is converted and its arena measured).
_MAX_TRIES = 6


def check_byte_limit(value, argument):
    """`max_decode_bytes` or `ram_bytes`: None or an int >= 1.

    The error names the argument and the unit.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{argument} must be an int number of bytes (e.g. 32 * 1024 for "
            f"32 KiB), got {value!r} ({type(value).__name__})."
        )
    if value < 1:
        raise ValueError(f"{argument} must be >= 1 byte, got {value}.")
    return int(value)


class ArenaBasis:
    """The arena `ram_bytes` budgets: the wheel's, or a target's estimate.

    Without a target, a file's arena is its smallest arena measured on the
    host wheel (`build.Built.arena_bytes`, reference kernels, 64-bit
    pointers). With one, it is `firmware.arena` of the file for the target's
    kernel set (reference or CMSIS-NN), from the wheel's measured arena and
    recording; estimates are cached by file, so a file is recorded once.

    Args:
        target: A `target.Target`, or None for the wheel.
        compiler: The firmware's compiler, for CMSIS-NN's scratch requests.
    """

    def __init__(self, target=None, compiler="gcc"):
        self.target = target
        self.compiler = compiler
        self._estimates = {}

    @property
    def label(self):
        """Short name of the basis, for reasons and errors."""
        if self.target is None:
            return "wheel"
        return f"{self.target.name} estimate, {self.kernels} kernels"

    @property
    def kernels(self):
        """The kernel set, as the report names it."""
        if self.target is None:
            return "reference"
        return "CMSIS-NN" if self.target.kernels == "cmsis-nn" else "reference"

    def description(self):
        """What the arenas of this basis count, for the report."""
        if self.target is None:
            return ("the host wheel's smallest arena (reference kernels, 64-bit "
                    "pointers)")
        return (
            f"the {self.target.name} estimate for a 32-bit Cortex-M build with "
            f"{self.kernels} kernels, an upper bound (firmware.arena)"
        )

    def estimate(self, model_bytes, wheel_arena_bytes):
        """`(arena_bytes, note)` of a file on the target (`firmware.arena`)."""
        key = (hashlib.sha256(bytes(model_bytes)).digest(), int(wheel_arena_bytes))
        if key not in self._estimates:
            self._estimates[key] = firmware.arena(
                self.target, model_bytes, wheel_arena_bytes, self.compiler)
        return self._estimates[key]

    def arena(self, model_bytes, wheel_arena_bytes):
        """A file's arena on this basis, from its wheel arena."""
        if self.target is None:
            return int(wheel_arena_bytes)
        return self.estimate(model_bytes, wheel_arena_bytes)[0]

    def file(self, built):
        """The arena of `built`'s file (`build.Built.compressed`)."""
        return self.arena(built.compressed, built.arena_bytes)

    def int8(self, built):
        """The arena of `built`'s uncompressed model (`build.Built.baseline`)."""
        return self.arena(built.baseline, built.baseline_arena)


@dataclasses.dataclass
class _Tensor:
    """A compressed kernel of the unsplit model, as the chooser sees it."""

    layer: str
    op: str
    decoded: int
    channels: int
    channel_bytes: int
    why_not: str  # why it cannot be split ("" if it can)
    before: int  # file bytes uncompressed
    after: int  # file bytes compressed, unsplit (data + per-tensor overhead)
    output_bytes: int = 0  # the layer's output; split, its groups' outputs
    # live beside it until the CONCATENATION
    elements: int = 0  # weights of the tensor
    tables: int = 1  # value tables unsplit (one per channel, or one)
    codes: int = 0  # entries of the fullest table
    itemsize: int = 1  # bytes per decoded weight


def _functional(model):
    """The Functional graph of a Sequential model (its layers' nodes)."""
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def _output_bytes(layer, itemsize):
    """Bytes of one sample of `layer`'s output (0 if unknown)."""
    try:
        shape = layer.output.shape[1:]
    except (AttributeError, ValueError):
        return 0
    if any(d is None for d in shape):
        return 0
    size = 1
    for d in shape:
        size *= int(d)
    return size * int(itemsize)


def _tensors(plain, built):
    """The `_Tensor`s of `built`'s compressed kernels (`plain` unsplit)."""
    top = {layer.name: layer for layer in plain.layers}
    tensors = []
    for layout in built.layouts:
        if not layout.compress:
            continue
        weight = layout.match.weight
        channels = int(weight.array.shape[weight.output_axis])
        layer = top.get(layout.match.kernel.layer)
        if layer is None:
            why = "inside a nested model, not split"
        elif layout.match.kernel.tensor != "kernel":
            why = f"its {layout.match.kernel.tensor} is not split"
        else:
            ok, why = split_lib.splittable(layer, _functional(plain))
        if weight.uses != 1:
            why = "read by several ops, not split"
        tensors.append(_Tensor(
            layer=layout.match.kernel.layer, op=weight.op, decoded=weight.nbytes,
            channels=channels, channel_bytes=-(-weight.nbytes // channels),
            why_not=why, before=layout.bytes_before,
            after=layout.bytes_after + compress.overhead_bytes(),
            output_bytes=_output_bytes(layer, weight.array.dtype.itemsize),
            elements=int(weight.array.size), tables=layout.tables, codes=layout.codes,
            itemsize=weight.array.dtype.itemsize,
        ))
    return tensors


def _split_saving(t, groups):
    """`(net, gross, compressed)`: estimated file bytes a split saves vs int8.

    A group is compressed only if its packed indices, tables and DECODE
    overhead take fewer bytes than its weights uncompressed (the rule of
    `compress.decide`); `gross` sums what the compressed groups save,
    `net` subtracts `GROUP_FILE_BYTES` per group beyond the first, and
    `compressed` counts the compressed groups.

    Args:
        t: The `_Tensor`.
        groups: Output channels per group (`split.group_sizes`).
    """
    per_channel = t.elements // t.channels
    gross, compressed = 0, 0
    for size in groups:
        tables = size if t.tables > 1 else 1  # one per channel, or shared
        after = compress.lut_bytes(
            size * per_channel, tables, t.codes, t.itemsize
        ) + compress.overhead_bytes()
        before = size * t.channel_bytes
        if after < before:
            gross += before - after
            compressed += 1
    return gross - GROUP_FILE_BYTES * (len(groups) - 1), gross, compressed


def _paying_limit(t):
    """The smallest decode limit at which `t` is compressed with a gain.

    A split into groups whose estimated net saving is positive, or the
    whole kernel compressed unsplit (it was, in the unsplit build).
    """
    last = None
    for per_group in range(1, t.channels):
        groups = split_lib.group_sizes(
            t.channels, t.channel_bytes, per_group * t.channel_bytes
        )
        if len(groups) == 1:
            break
        if len(groups) == last:  # the same split as a smaller limit's
            continue
        last = len(groups)
        net, _, compressed = _split_saving(t, groups)
        if compressed and net > 0:
            return max(groups) * t.channel_bytes
    return t.decoded


def _no_gain(t, groups, argument):
    """Why a split into `groups` is not made, or "" if it pays (estimated)."""
    net, gross, compressed = _split_saving(t, groups)
    if compressed and net > 0:
        return ""
    count, largest = len(groups), max(groups)
    if not compressed:
        why = (
            f"a split into {count} groups of <= {largest} channels "
            f"({largest * t.channel_bytes} B) would compress none of them (each "
            "group's indices, table and DECODE op would take more bytes than "
            "its int8 weights), so it would only add ops to an int8 layer"
        )
    else:
        why = (
            f"a split into {count} groups of <= {largest} channels would save "
            f"~{gross} B by compressing {compressed} of them, less than the "
            f"~{GROUP_FILE_BYTES * (count - 1)} B its extra ops cost"
        )
    return why + _hint(t, argument)


def _hint(t, argument):
    """What limit would let `t` be compressed (for `max_decode_bytes`)."""
    if argument != "max_decode_bytes":
        return ""
    least = _paying_limit(t)
    how = "split with a gain" if least < t.decoded else "compressed unsplit"
    return f"; it is {how} at max_decode_bytes >= {least}"


def _decide(tensors, limit, argument):
    """`(sizes, keep, choices)` for one decode limit.

    `sizes`: `{layer: group sizes}` to split; `keep`: `{layer: reason}` to
    keep int8; `choices`: a `RamChoice` per tensor.
    """
    sizes, keep, choices = {}, {}, []
    for t in tensors:
        if t.decoded <= limit:
            choices.append(RamChoice(
                t.layer, t.op, t.decoded, "compress", 1, t.decoded,
                f"decodes to {t.decoded} B <= {limit} B",
            ))
            continue
        groups = None if t.why_not else split_lib.group_sizes(
            t.channels, t.channel_bytes, limit
        )
        no_gain = _no_gain(t, groups, argument) if groups is not None else ""
        if groups is not None and not no_gain:
            sizes[t.layer] = groups
            largest = max(groups) * t.channel_bytes
            choices.append(RamChoice(
                t.layer, t.op, t.decoded, "split", len(groups), largest,
                f"decodes to {t.decoded} B > {limit} B: {len(groups)} groups "
                f"of <= {max(groups)} channels",
            ))
            continue
        reason = t.why_not or no_gain or (
            f"one output channel decodes to {t.channel_bytes} B > {limit} B"
        )
        keep[t.layer] = (
            f"kept int8: decodes to {t.decoded} B > {argument}={limit} B, {reason}"
        )
        choices.append(RamChoice(
            t.layer, t.op, t.decoded, "int8", 0, 0,
            f"decodes to {t.decoded} B > {limit} B and {reason}",
        ))
    return sizes, keep, choices


def _candidate_limits(tensors, most):
    """Decode limits at which some tensor's group count changes, <= `most`."""
    limits = set()
    for t in tensors:
        limits.add(t.decoded)
        if not t.why_not:
            for count in range(2, t.channels + 1):
                limits.add(-(-t.channels // count) * t.channel_bytes)
    return sorted((limit for limit in limits if 0 < limit <= most), reverse=True)


@dataclasses.dataclass(frozen=True)
class _Option:
    """One way to store a tensor under a decode limit, with its estimates."""

    choice: str  # "compress", "split" or "int8"
    groups: int
    group_bytes: int  # largest decoded group
    flash: int  # estimated file bytes
    state: int  # estimated persistent arena bytes (DECODE state, group ops)
    reason: str


def _options(t, limit):
    """The int8 option, and compress or split if the limit allows it."""
    keep = _Option("int8", 0, 0, t.before, 0, "")
    if t.decoded <= limit:
        return [keep, _Option("compress", 1, t.decoded, t.after,
                              DECODE_STATE_BYTES,
                              f"decodes to {t.decoded} B <= {limit} B")]
    if t.why_not:
        return [dataclasses.replace(keep, reason=f"decodes to {t.decoded} B > "
                                    f"{limit} B and {t.why_not}")]
    groups = split_lib.group_sizes(t.channels, t.channel_bytes, limit)
    if groups is None:
        return [dataclasses.replace(keep, reason=(
            f"one output channel decodes to {t.channel_bytes} B > {limit} B"))]
    count = len(groups)
    no_gain = _no_gain(t, groups, "ram_bytes")
    if no_gain:
        return [dataclasses.replace(keep, reason=(
            f"decodes to {t.decoded} B > {limit} B and {no_gain}"))]
    return [keep, _Option(
        "split", count, max(groups) * t.channel_bytes,
        t.before - _split_saving(t, groups)[0],
        DECODE_STATE_BYTES * count + GROUP_OP_BYTES * (count - 1)
        + t.output_bytes,
        f"decodes to {t.decoded} B > {limit} B: {count} groups of <= "
        f"{max(groups)} channels",
    )]


# Granule of the knapsack over persistent arena bytes: 32 B, coarser for a
# large budget so that no knapsack has more than 1024 cells.
_CELL = 32
_MAX_CELLS = 1024


def _choose_options(tensors, limit, room):
    """Per tensor the `_Option` that minimises flash within `room` state bytes.

    A 0/1 choice per tensor (int8, or its compress/split option), solved
    exactly by dynamic programming over the state bytes in cells of at
    least `_CELL` bytes (rounded up, so the choice never needs more).
    Returns the options, or None when `room` < 0. (A split's group outputs
    are counted as state too: a sum over splits, where TFLM's planner needs
    only the largest at a time; an overestimate on the safe side.)
    """
    if room < 0:
        return None
    cell = max(_CELL, -(-int(room) // _MAX_CELLS))
    cells = int(room // cell)
    # best[c]: (flash, options) using at most c cells.
    best = [(0, ())] * (cells + 1)
    for t in tensors:
        options = _options(t, limit)
        new = []
        for c in range(cells + 1):
            candidates = []
            for option in options:
                need = -(-option.state // cell)
                if need <= c:
                    flash, chosen = best[c - need]
                    candidates.append((flash + option.flash, chosen + (option,)))
            new.append(min(candidates, key=lambda x: x[0]))
        best = new
    return list(best[cells][1])


def _estimate(options, base):
    """Estimated arena: int8 arena + largest decoded group + state."""
    return base + max((o.group_bytes for o in options), default=0) + sum(
        o.state for o in options
    )


def _realise(tensors, options, limit, ram_bytes):
    """`(sizes, keep, choices)` to build the chosen options."""
    sizes, keep, choices = {}, {}, []
    for t, option in zip(tensors, options):
        reason = option.reason or (
            f"kept int8 to fit ram_bytes={ram_bytes}: compressing costs "
            "DECODE state that does not fit"
        )
        if option.choice == "split":
            sizes[t.layer] = split_lib.group_sizes(t.channels, t.channel_bytes, limit)
        elif option.choice == "int8":
            keep[t.layer] = f"kept int8: {reason}"
        choices.append(RamChoice(t.layer, t.op, t.decoded, option.choice,
                                 option.groups, option.group_bytes, reason))
    return sizes, keep, choices


def _candidate(plain, kernels, sizes):
    """The model and kernels to convert for these splits."""
    if not sizes:
        return plain, kernels, {}
    model, info = split_lib.split_model(plain, sizes)
    return model, split_lib.split_kernels(kernels, info), info


def _unpaid_splits(built, info):
    """`{layer: why}`: split layers whose built groups save no file bytes.

    Measured on the built candidate: at least one group must be compressed,
    and the compressed groups' savings (int8 bytes minus indices, tables and
    DECODE overhead) must exceed `GROUP_FILE_BYTES` per extra group.
    """
    unpaid = {}
    for layer, entry in info.items():
        names = set(entry.groups)
        count = len(names)
        compressed = [
            t for t in built.layouts if t.match.kernel.layer in names and t.compress
        ]
        gross = sum(
            t.bytes_before - t.bytes_after - compress.overhead_bytes()
            for t in compressed
        )
        cost = GROUP_FILE_BYTES * (count - 1)
        if not compressed:
            unpaid[layer] = (
                f"split into {count} groups, none of them came out compressed "
                "(each would take more bytes than its int8 weights), so the "
                "split would only add ops to an int8 layer"
            )
        elif gross <= cost:
            unpaid[layer] = (
                f"split into {count} groups, the {len(compressed)} compressed "
                f"ones saved ~{gross} B, less than the ~{cost} B its extra ops "
                "cost"
            )
    return unpaid


def _build_candidate(plain, kernels, settings, decision, unsplit, tensors, limit,
                     label):
    """Builds a candidate, undoing splits the built file shows do not pay.

    A split layer whose groups are all uncompressed, or save less than the
    extra ops cost (`_unpaid_splits`), is kept int8 unsplit instead and the
    model is built again.

    Args:
        plain, kernels, settings: As for `fit`.
        decision: `(sizes, keep, choices)` (`_decide`, `_realise`); updated
            in place for the splits undone.
        unsplit: The unsplit build (its conversion is reused when nothing
            is split).
        tensors: The `_Tensor`s.
        limit: The decode limit, and `label` its name for the report
            (`"max_decode_bytes="` or `"the decode limit "`).

    Returns:
        `(built, model, kernels, info, notes)` of the model built.
    """
    sizes, keep, choices = decision
    share = settings.shared_tables is not False
    by_layer = {t.layer: t for t in tensors}
    while True:
        model, split_kernels, info = _candidate(plain, kernels, sizes)
        built_notes = []
        if info:
            built = build.assemble(model, split_kernels, built_notes, settings,
                                   share=share, keep=keep)
        else:
            built = build.assemble(plain, kernels, built_notes, settings,
                                   share=share, keep=keep, previous=unsplit)
        unpaid = _unpaid_splits(built, info)
        if not unpaid:
            return built, model, split_kernels, info, built_notes
        for layer, why in unpaid.items():
            t = by_layer[layer]
            del sizes[layer]
            keep[layer] = f"kept int8: decodes to {t.decoded} B > {label}{limit} B, {why}"
            for i, choice in enumerate(choices):
                if choice.layer == layer:
                    choices[i] = RamChoice(
                        t.layer, t.op, t.decoded, "int8", 0, 0,
                        f"decodes to {t.decoded} B > {limit} B and {why}",
                    )


def _unsplit_if_larger(plain, kernels, settings, built, decision, info, unsplit,
                       tensors, limit, label):
    """The build with every split layer int8 instead, if its file is no larger.

    The last, measured check that a split pays (the extra ops' file bytes
    are estimated until here).

    Returns:
        `(built, info, notes)`: `built` and `info` as given and notes None
        when the split file is the smaller; else the build with the split
        layers int8 (the conversion of `unsplit` reused), `{}` and its
        notes, and `decision` updated.
    """
    if not info:
        return built, info, None
    sizes, keep, choices = decision
    by_layer = {t.layer: t for t in tensors}
    why = {
        layer: (
            f"split into {len(entry.groups)} groups the file was "
            f"{len(built.compressed)} B, not smaller than with it int8"
        )
        for layer, entry in info.items()
    }
    alt_keep = dict(keep)
    for layer in info:
        alt_keep[layer] = (
            f"kept int8: decodes to {by_layer[layer].decoded} B > {label}{limit} B, "
            f"{why[layer]}"
        )
    alt_notes = []
    alt = build.assemble(plain, kernels, alt_notes, settings,
                         share=settings.shared_tables is not False, keep=alt_keep,
                         previous=unsplit)
    if len(alt.compressed) > len(built.compressed):
        return built, info, None
    for layer in info:
        t = by_layer[layer]
        del sizes[layer]
        keep[layer] = alt_keep[layer]
        for i, choice in enumerate(choices):
            if choice.layer == layer:
                choices[i] = RamChoice(
                    t.layer, t.op, t.decoded, "int8", 0, 0,
                    f"decodes to {t.decoded} B > {limit} B and {why[layer]}",
                )
    return alt, {}, alt_notes


@dataclasses.dataclass
class Fitted:
    """What `fit` built.

    Attributes:
        built: The `build.Built` to write (verified).
        verification: Its `verify.Verification`, None without verification.
        report: The `RamReport`.
        unsplit: The first build of the unsplit model, no limit applied:
            its conversion is the int8 route's.
        basis: The `ArenaBasis` the report's arenas count.
    """

    built: object
    verification: object
    report: RamReport
    unsplit: object
    basis: ArenaBasis = dataclasses.field(default_factory=ArenaBasis)


def below_int8(ram_bytes, least, basis):
    """The error for a `ram_bytes` below `least`, the least arena any
    choice needs (the model with every kernel int8), on `basis`."""
    return ValueError(
        f"ram_bytes={ram_bytes} is below {least} B, the least arena any choice "
        "needs: that of this model with every kernel int8 (no decode buffer), "
        f"counted as {basis.description()}. Give ram_bytes >= {least} (it "
        "counts bytes: 32 KiB is 32768). Nothing was written."
    )


def fit(plain, kernels, notes, settings, max_decode_bytes, ram_bytes, basis=None):
    """Builds the export under a decode limit or a RAM budget.

    Args:
        plain: The plain Keras model.
        kernels: Its `LutKernel`s.
        notes: The report's notes (appended to).
        settings: The export's `build.Settings`.
        max_decode_bytes: Largest decoded kernel allowed, or None.
        ram_bytes: Arena budget, or None. Exactly one of the two is given
            (`exporter.check_combinations` refuses both).
        basis: The `ArenaBasis` `ram_bytes` counts (a target's estimate);
            None, or under `max_decode_bytes`, the wheel's arena.

    Returns:
        A `Fitted`.

    Raises:
        ValueError: The limit is below one output channel of a layer that
            could be split (max_decode_bytes), or the budget is below the
            arena of the model with every kernel int8 (ram_bytes).
    """
    if basis is None or ram_bytes is None:
        basis = ArenaBasis()
    share = settings.shared_tables is not False
    unsplit_notes = []
    unsplit = build.assemble(plain, kernels, unsplit_notes, settings, share=share)
    tensors = _tensors(plain, unsplit)
    if max_decode_bytes is not None:
        limit, argument = max_decode_bytes, "max_decode_bytes"
        small = [
            t for t in tensors
            if not t.why_not and t.decoded > limit and t.channel_bytes > limit
        ]
        if small:
            least = max(t.channel_bytes for t in small)
            raise ValueError(
                f"max_decode_bytes={limit} is below what one output channel "
                "decodes to in "
                + ", ".join(f"layer '{t.layer}' ({t.op}, {t.channel_bytes} B)"
                            for t in small)
                + f", so no split fits: give max_decode_bytes >= {least} "
                "(it counts bytes: 32 KiB is 32768), or ram_bytes to let the "
                "exporter keep such layers int8. Nothing was written."
            )
        decision = _decide(tensors, limit, argument)
        sizes, keep, choices = decision
        if sizes or keep:
            label = "max_decode_bytes="
            built, model, split_kernels, info, built_notes = _build_candidate(
                plain, kernels, settings, decision, unsplit, tensors, limit, label,
            )
            built, info, alt_notes = _unsplit_if_larger(
                plain, kernels, settings, built, decision, info, unsplit, tensors,
                limit, label,
            )
            if alt_notes is not None:
                model, split_kernels, built_notes = plain, kernels, alt_notes
            notes.extend(built_notes)
            built, verification = build.assemble_verified(
                model, split_kernels, notes, settings, keep=keep, built=built
            )
        else:  # every decoded kernel fits already
            info = {}
            notes.extend(unsplit_notes)
            built, verification = build.assemble_verified(
                plain, kernels, notes, settings, built=unsplit
            )
    else:
        argument = "ram_bytes"
        if basis.int8(unsplit) > ram_bytes:
            raise below_int8(ram_bytes, basis.int8(unsplit), basis)
        built, verification, limit, choices, info = _search(
            plain, kernels, notes, settings, ram_bytes, tensors, unsplit,
            unsplit_notes, basis,
        )
    report = RamReport(
        argument=argument,
        limit=limit,
        ram_bytes=ram_bytes,
        arena_bytes=basis.file(built),
        decode_buffer_bytes=built.decode_buffer_bytes,
        twin_arena_bytes=basis.int8(built),
        int8_arena_bytes=basis.int8(unsplit),
        unsplit_arena_bytes=basis.file(unsplit),
        unsplit_decode_buffer_bytes=unsplit.decode_buffer_bytes,
        unsplit_size_bytes=len(unsplit.compressed),
        size_bytes=len(built.compressed),
        choices=choices,
        concat_ops={layer: entry.concat_ops for layer, entry in info.items()},
        arena_basis=basis.label,
        arena_note=basis.description(),
    )
    if info:
        report.latency_us, report.unsplit_latency_us = latency.host_latency_us(
            [built.compressed, unsplit.compressed],
            [built.arena_bytes, unsplit.arena_bytes],
        )
    return Fitted(built, verification, report, unsplit, basis)


@dataclasses.dataclass
class _Best:
    """The smallest candidate file `_search` built that fits the budget."""

    bytes: int  # its file's bytes
    estimate: int  # its estimated file bytes
    limit: int  # the decode limit
    built: object  # the `build.Built`
    choices: list  # `RamChoice`s
    keep: dict  # `{layer: reason}` kept int8
    model: object  # the Keras model built (maybe split)
    kernels: list  # its `LutKernel`s
    info: dict  # `split.split_model`'s info: `{layer: split.SplitLayer}`
    notes: list  # notes of its build


def _search(plain, kernels, notes, settings, ram_bytes, tensors, unsplit,
            unsplit_notes, basis):
    """The decode limit that fits `ram_bytes` with the smallest file.

    Candidates are the limits at which a choice changes. The one with the
    smallest estimated file among those whose estimated arena fits is
    built and its arena measured; the measurement corrects the estimate
    (up or down), and the next candidate that could give a smaller file is
    tried. When the estimate admits none, the choices whose decode buffer
    alone fits are tried too (the estimate is pessimistic about group ops).
    At most `_MAX_TRIES` builds; the smallest file that fits wins. Arenas
    are on `basis` (an `ArenaBasis`): the int8 arena, the estimate's
    corrections and the fit of each candidate.

    Returns `(built, verification, limit, choices, split info)`.
    """
    if basis.file(unsplit) <= ram_bytes:
        limit = max((t.decoded for t in tensors), default=0)
        _, keep, choices = _decide(tensors, limit, "ram_bytes")
        for choice in choices:
            choice.reason += f"; arena {basis.file(unsplit)} B ({basis.label}) fits"
        notes.extend(unsplit_notes)
        built, verification = build.assemble_verified(
            plain, kernels, notes, settings, built=unsplit
        )
        return built, verification, limit, choices, {}
    base = basis.int8(unsplit)
    # Up to the whole budget: TFLM's planner can put a decode buffer over
    # activations that are dead by then (LeNet-5: arena +24,464 B for a
    # 31,200 B buffer); the estimate, corrected by measurements, filters.
    limits = _candidate_limits(tensors, ram_bytes)
    # Measured arena minus the estimate of the last candidate built: TFLM's
    # planner may place a decode buffer where earlier activations lived
    # (the estimate is then high), a conv's group outputs live until the
    # CONCATENATION (then it is low).
    bias = 0
    tried = set()
    best = None

    def untried(room):
        """Untried choices, by limit, that beat the best file's estimate."""
        found = {}
        for limit in limits:
            options = _choose_options(tensors, limit, room(limit))
            if options is None or all(o.choice == "int8" for o in options):
                continue
            key = tuple((o.choice, o.groups) for o in options)
            flash = sum(o.flash for o in options)
            if key not in tried and (best is None or flash < best.estimate):
                found.setdefault(key, (flash, -limit, limit, options))
        return found

    for _ in range(_MAX_TRIES):
        candidates = untried(lambda limit: ram_bytes - bias - base - limit)
        if not candidates:
            # The estimate counts every group op and split output, though
            # TFLM's planner may put some in slack: then also try, smallest
            # file first, the choices that need only their decode buffer to fit
            # (the AD autoencoder at int8 + 18 KB: 153,040 B, not 157,312 B).
            # (Room for every option's state twice over: the knapsack rounds
            # states up to its cells.)
            candidates = untried(lambda limit: -1 if base + limit > ram_bytes else 2 * sum(
                max(o.state for o in _options(t, limit)) for t in tensors))
        if not candidates:
            break
        key, (flash, _, limit, options) = min(candidates.items(), key=lambda x: x[1][:2])
        tried.add(key)
        decision = _realise(tensors, options, limit, ram_bytes)
        _, keep, choices = decision
        built, model, split_kernels, info, candidate_notes = _build_candidate(
            plain, kernels, settings, decision, unsplit, tensors, limit,
            "the decode limit ",
        )
        arena_bytes = basis.file(built)
        bias = arena_bytes - _estimate(options, base)
        if arena_bytes <= ram_bytes and (
            best is None or len(built.compressed) < best.bytes
        ):
            best = _Best(bytes=len(built.compressed), estimate=flash, limit=limit,
                         built=built, choices=choices, keep=keep, model=model,
                         kernels=split_kernels, info=info, notes=candidate_notes)
    int8_reason = "no decode limit kept the arena within ram_bytes"
    if best is not None and best.bytes >= len(unsplit.slim_baseline):
        # Splits whose extra ops outweigh what their groups save.
        int8_reason = (
            f"the smallest file that fit ({best.bytes} B) was not smaller "
            f"than with every kernel int8 ({len(unsplit.slim_baseline)} B)"
        )
        best = None
    if best is not None:
        notes.extend(best.notes)
        for choice in best.choices:
            choice.reason += (
                f"; arena {basis.file(best.built)} B ({basis.label}) <= "
                f"ram_bytes={ram_bytes}, the smallest file of {len(tried)} tried"
            )
        built, verification = build.assemble_verified(
            best.model, best.kernels, notes, settings, keep=best.keep,
            built=best.built,
        )
        return built, verification, best.limit, best.choices, best.info
    # Nothing compressed needs no decode buffer: the int8 arena, which fits.
    limit = 0
    keep = {t.layer: f"kept int8: {int8_reason} (ram_bytes={ram_bytes})"
            for t in tensors}
    choices = [
        RamChoice(t.layer, t.op, t.decoded, "int8", 0, 0, int8_reason)
        for t in tensors
    ]
    int8_notes = []
    built = build.assemble(plain, kernels, int8_notes, settings,
                           share=settings.shared_tables is not False, keep=keep,
                           previous=unsplit)
    if basis.file(built) > ram_bytes:  # the slim int8 file over its twin's arena
        raise below_int8(ram_bytes, basis.file(built), basis)
    notes.extend(int8_notes)
    built, verification = build.assemble_verified(
        plain, kernels, notes, settings, keep=keep, built=built
    )
    return built, verification, limit, choices, {}
