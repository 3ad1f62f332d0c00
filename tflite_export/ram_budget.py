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

The report (`RamReport`) gives the main arena, the decode buffer, the
uncompressed twin's arena, and flash and host latency against the unsplit
compressed file.
"""

import dataclasses
import numbers

from tflite_export import compress
from tflite_export import latency
from tflite_export import split as split_lib
from tflite_export.result import RamChoice
from tflite_export.result import RamReport

# TFLM's persistent arena state per DECODE op (node, two eval tensors, LUT
# state; DEVELOPERS.md), for the first estimate of how many bytes a decode
# limit leaves.
DECODE_STATE_BYTES = 198
# First guess of the arena bytes each extra group op (FULLY_CONNECTED or
# CONV_2D, and the CONCATENATIONs) adds beyond its DECODE's state: TFLM's
# node and op data; LeNet-5's 13-group split twin measured ~217 B per extra
# op. Corrected from each measured candidate.
GROUP_OP_BYTES = 220
# File bytes of one extra group, for ranking candidates only (the DECODE
# op and tensors, a DCM, the op and its bias and output tensors).
GROUP_FILE_BYTES = 256
# Candidate models built at most when searching for a decode limit that
# fits `ram_bytes` (each is converted and its arena measured).
_MAX_TRIES = 6


def check_budget(value, argument):
    """A byte count: None or an int >= 1; names the argument and the unit."""
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


def _tensors(plain, built):
    top = {layer.name: layer for layer in plain.layers}
    tensors = []
    for plan in built.plans:
        if not plan.compress:
            continue
        weight = plan.match.weight
        channels = int(weight.array.shape[weight.output_axis])
        layer = top.get(plan.match.kernel.layer)
        if layer is None:
            why = "inside a nested model, not split"
        elif plan.match.kernel.tensor != "kernel":
            why = f"its {plan.match.kernel.tensor} is not split"
        else:
            ok, why = split_lib.splittable(layer)
        if weight.uses != 1:
            why = "read by several ops, not split"
        tensors.append(_Tensor(
            layer=plan.match.kernel.layer, op=weight.op, decoded=weight.nbytes,
            channels=channels, channel_bytes=-(-weight.nbytes // channels),
            why_not=why, before=plan.bytes_before,
            after=plan.bytes_after + compress.overhead_bytes(),
        ))
    return tensors


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
        if groups is not None:
            sizes[t.layer] = groups
            largest = max(groups) * t.channel_bytes
            choices.append(RamChoice(
                t.layer, t.op, t.decoded, "split", len(groups), largest,
                f"decodes to {t.decoded} B > {limit} B: {len(groups)} groups "
                f"of <= {max(groups)} channels",
            ))
            continue
        reason = t.why_not or (
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
    """Decode limits at which some choice changes, up to `most` bytes."""
    limits = set()
    for t in tensors:
        limits.add(t.decoded)
        if not t.why_not:
            for count in range(1, t.channels):
                limits.add(count * t.channel_bytes)
    return sorted((limit for limit in limits if 0 < limit <= most), reverse=True)


def _arena(tensors, limit, base, op_bytes):
    """Estimated arena for a decode limit: int8 arena + largest decode + state."""
    _, _, choices = _decide(tensors, limit, "ram_bytes")
    decodes = sum(c.groups for c in choices)
    extra = sum(c.groups - 1 for c in choices if c.groups > 1)
    largest = max((c.group_bytes for c in choices), default=0)
    return base + largest + DECODE_STATE_BYTES * decodes + op_bytes * extra


def _flash(tensors, limit):
    """Estimated file bytes of the LUT kernels for a decode limit."""
    _, _, choices = _decide(tensors, limit, "ram_bytes")
    total = 0
    for t, c in zip(tensors, choices):
        if c.choice == "int8":
            total += t.before
        else:
            total += t.after + GROUP_FILE_BYTES * (c.groups - 1)
    return total


def _candidate(plain, kernels, sizes):
    """The model and kernels to convert for these splits."""
    if not sizes:
        return plain, kernels, {}
    model, info = split_lib.split_model(plain, sizes)
    return model, split_lib.split_kernels(kernels, info), info


def fit(plain, kernels, notes, settings, max_decode_bytes, ram_bytes,
        assemble, assemble_verified):
    """Builds the export under a decode limit or a RAM budget.

    Args:
        plain: The plain Keras model.
        kernels: Its `LutKernel`s.
        notes: The report's notes (appended to).
        settings: The exporter's `_Settings`.
        max_decode_bytes: Largest decoded kernel allowed, or None.
        ram_bytes: Arena budget, or None. One of the two is given.
        assemble: The exporter's `_assemble` (build without verification).
        assemble_verified: The exporter's `_assemble_verified`.

    Returns:
        `(built, verification, RamReport)`.

    Raises:
        ValueError: The limit is below one output channel of a layer that
            could be split (max_decode_bytes), or the budget is below the
            arena of the model with every kernel int8 (ram_bytes).
    """
    if max_decode_bytes is not None and ram_bytes is not None:
        raise ValueError(
            "give max_decode_bytes or ram_bytes, not both: ram_bytes chooses "
            "the decode limit itself."
        )
    share = settings.shared_tables is not False
    unsplit_notes = []
    unsplit = assemble(plain, kernels, unsplit_notes, settings, share=share)
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
        sizes, keep, choices = _decide(tensors, limit, argument)
        model, split_kernels, info = _candidate(plain, kernels, sizes)
        if sizes or keep:
            built, verification = assemble_verified(
                model, split_kernels, notes, settings, keep=keep
            )
        else:  # every decoded kernel fits already
            notes.extend(unsplit_notes)
            built, verification = assemble_verified(
                plain, kernels, notes, settings, built=unsplit
            )
    else:
        argument = "ram_bytes"
        if unsplit.baseline_arena > ram_bytes:
            raise ValueError(
                f"ram_bytes={ram_bytes} is below {unsplit.baseline_arena} B, "
                "the arena of this model with every kernel int8 (no decode "
                "buffer), the least any choice needs: give ram_bytes >= "
                f"{unsplit.baseline_arena} (it counts bytes: 32 KiB is 32768). "
                "Nothing was written."
            )
        built, verification, limit, choices, info = _search(
            plain, kernels, notes, settings, ram_bytes, tensors, unsplit,
            unsplit_notes, assemble, assemble_verified,
        )
    report = RamReport(
        argument=argument,
        limit=limit,
        ram_bytes=ram_bytes,
        arena_bytes=built.arena_bytes,
        decode_buffer_bytes=built.decode_buffer_bytes,
        twin_arena_bytes=built.baseline_arena,
        int8_arena_bytes=unsplit.baseline_arena,
        unsplit_arena_bytes=unsplit.arena_bytes,
        unsplit_decode_buffer_bytes=unsplit.decode_buffer_bytes,
        unsplit_size_bytes=len(unsplit.compressed),
        size_bytes=len(built.compressed),
        choices=choices,
        concat_ops={layer: entry["concat_ops"] for layer, entry in info.items()},
    )
    if info:
        report.latency_us, report.unsplit_latency_us = latency.host_latency_us(
            [built.compressed, unsplit.compressed],
            [built.arena_bytes, unsplit.arena_bytes],
        )
    return built, verification, report


def _search(plain, kernels, notes, settings, ram_bytes, tensors, unsplit,
            unsplit_notes, assemble, assemble_verified):
    """The decode limit that fits `ram_bytes` with the smallest file.

    Candidates are the limits at which a choice changes; the one with the
    smallest estimated file among those whose estimated arena fits is
    built and its arena measured; a miss corrects the estimate.

    Returns `(built, verification, limit, choices, split info)`.
    """
    if unsplit.arena_bytes <= ram_bytes:
        limit = max((t.decoded for t in tensors), default=0)
        _, keep, choices = _decide(tensors, limit, "ram_bytes")
        for choice in choices:
            choice.reason += f"; arena {unsplit.arena_bytes} B fits"
        notes.extend(unsplit_notes)
        built, verification = assemble_verified(
            plain, kernels, notes, settings, built=unsplit
        )
        return built, verification, limit, choices, {}
    base = unsplit.baseline_arena
    share = settings.shared_tables is not False
    op_bytes = GROUP_OP_BYTES
    limits = _candidate_limits(tensors, ram_bytes - base)
    for _ in range(_MAX_TRIES):
        # The smallest estimated file among the limits whose estimated
        # arena fits; then build it and measure.
        fitting = [
            (_flash(tensors, limit), -limit, limit) for limit in limits
            if _arena(tensors, limit, base, op_bytes) <= ram_bytes
        ]
        if not fitting:
            break
        _, _, limit = min(fitting)
        sizes, keep, choices = _decide(tensors, limit, "ram_bytes")
        model, split_kernels, info = _candidate(plain, kernels, sizes)
        candidate_notes = []
        built = assemble(model, split_kernels, candidate_notes, settings,
                         share=share, keep=keep)
        if built.arena_bytes <= ram_bytes:
            notes.extend(candidate_notes)
            for choice in choices:
                choice.reason += (
                    f"; decode limit {limit} B: arena {built.arena_bytes} B "
                    f"<= ram_bytes={ram_bytes}"
                )
            built, verification = assemble_verified(
                model, split_kernels, notes, settings, keep=keep, built=built
            )
            return built, verification, limit, choices, info
        # Learn what an extra group op really costs, and never try this
        # limit again.
        extra = sum(c.groups - 1 for c in choices if c.groups > 1)
        if extra:
            residual = built.arena_bytes - _arena(tensors, limit, base, 0)
            op_bytes = max(op_bytes, residual / extra)
        limits = [other for other in limits if other != limit]
    # Nothing compressed needs no decode buffer: the int8 arena, which fits.
    limit = 0
    keep = {t.layer: f"kept int8: no decode limit fits ram_bytes={ram_bytes}"
            for t in tensors}
    choices = [
        RamChoice(t.layer, t.op, t.decoded, "int8", 0, 0,
                  "no decode limit kept the arena within ram_bytes")
        for t in tensors
    ]
    built, verification = assemble_verified(
        plain, kernels, notes, settings, keep=keep
    )
    return built, verification, limit, choices, {}
