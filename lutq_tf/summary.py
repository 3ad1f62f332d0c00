"""`summary`: what LUT-Q did to each quantised tensor of a model."""

from collections.abc import Callable
import dataclasses
from typing import Optional

import keras
import numpy as np

from lutq_tf.model import lutq_layers
from lutq_tf.text import grid


@dataclasses.dataclass(frozen=True)
class TensorSummary:
    """One quantised weight tensor.

    Attributes:
        layer: the layer's name.
        tensor: the weight's attribute ("kernel", "depthwise_kernel", ...).
        num_values: K, dictionary entries per table.
        per_channel: one dictionary per output channel (else per tensor).
        in_use: distinct entries that some weight is assigned to (the
            largest count over tables when per channel).
        prune_rate: fraction of weights pruned: assigned to the pruning
            entry (fixed at 0) of a quantizer with `prune_rate > 0`; 0
            without pruning, whatever zeros the dictionary holds.
        index_bits: bits per assignment index, ceil(log2 K).
        weight_count: number of weights.
        constraint: the dictionary constraint's description.
        mode: what one dictionary serves: "tensor", "channel" (one per
            output channel) or "scaled" (one per tensor over the weights
            divided by their channel's scale): the quantizer's
            `granularity` "per_tensor", "per_channel" or
            "per_channel_scaled" (`granularity` gives that name).
        channel_scales: in "scaled" mode, s as a float32 numpy array `[C]`
            (columns of the tensor state's `to_matrix`: the layer's output
            channels), with Q[m, c] = s[c] * d[A[m, c]]; else None.
        zeros: fraction of quantised weights that are exactly 0, pruned or
            not (a ternary dictionary's middle entry, a uniform grid's 0).
        per_channel_fallback: per tensor because `per_channel` was asked
            but the layer's output channels hold fewer than K weights each
            (`quantize_model`); the table shows "tensor (channels < K)".
    """

    layer: str
    tensor: str
    num_values: int
    per_channel: bool
    in_use: int
    prune_rate: float
    index_bits: int
    weight_count: int
    constraint: str
    mode: Optional[str] = None
    # An array: left out of ==, which would be ambiguous.
    channel_scales: Optional[np.ndarray] = dataclasses.field(
        default=None, compare=False)
    zeros: Optional[float] = None
    per_channel_fallback: bool = False

    def __post_init__(self):
        # Rows made without a mode (older callers) get it from per_channel.
        if self.mode is None:
            object.__setattr__(
                self, "mode", "channel" if self.per_channel else "tensor")

    @property
    def granularity(self) -> str:
        """`mode` as the quantizer's `granularity`: "per_tensor",
        "per_channel" or "per_channel_scaled"."""
        return {"tensor": "per_tensor", "channel": "per_channel",
                "scaled": "per_channel_scaled"}[self.mode]


def summary(model: keras.Model,
            print_fn: Optional[Callable[[str], object]] = print,
            ) -> list[TensorSummary]:
    """Per quantised tensor: K, what one dictionary serves (per tensor,
    channel, or scaled; per-channel fallbacks marked), entries in use,
    pruning, index bits, size.

    Args:
        model: a Keras model containing `LUTQWrapper` layers.
        print_fn: called with the table as one string; None prints nothing.

    Returns:
        A list of `TensorSummary` (empty if `model` has no LUT-Q layers):
        `summary_rows(model)`.
    """
    rows = _rows(model, "lutq_tf.summary")
    if print_fn is not None:
        print_fn(format_table(rows))
    return rows


def summary_rows(model: keras.Model) -> list[TensorSummary]:
    """One `TensorSummary` per quantised tensor of `model`, in layer order.

    The data of `summary` without its table: what the exporter reads to
    know which kernels are look-up tables, their K, their layout and
    channel scales.

    Args:
        model: a Keras model containing `LUTQWrapper` layers.

    Returns:
        A list of `TensorSummary` (empty if `model` has no LUT-Q layers).

    Raises:
        TypeError: `model` is not a Keras model.
    """
    return _rows(model, "lutq_tf.summary_rows")


def _rows(model, who):
    """`summary_rows`; `who` names the function in the error."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{who} takes a Keras model with LUTQWrapper layers "
            f"(from lutq_tf.quantize_model), got {type(model).__name__}."
        )
    rows = []
    for layer in lutq_layers(model):
        quantizer = layer.quantizer
        for state in layer.tensor_states:
            assignment = state.to_matrix(state.assignment.value).numpy()
            # Scaled mode has one table over all channels.
            tables = state.dictionary.shape[1]
            assignment = assignment.reshape(-1, tables)
            quantized = state.quantized.numpy()
            scales = state.channel_scales
            in_use = max(
                len(np.unique(assignment[:, c]))
                for c in range(assignment.shape[1])
            )
            rows.append(TensorSummary(
                layer=layer.name,
                tensor=state.spec.attribute,
                num_values=quantizer.num_values,
                per_channel=quantizer.per_channel,
                in_use=in_use,
                # Row 0 is the pruning entry when the quantizer prunes
                # (kmeans.py); other zeros are values the k-means chose.
                prune_rate=(float(np.mean(assignment == 0))
                            if quantizer.prune_rate > 0 else 0.0),
                index_bits=quantizer.index_bits,
                weight_count=int(quantized.size),
                constraint=repr(quantizer.constraint),
                mode=quantizer.mode,
                channel_scales=(None if scales is None
                                else scales.numpy().copy()),
                zeros=float(np.mean(quantized == 0)),
                per_channel_fallback=quantizer.per_channel_fallback,
            ))
    return rows


def format_table(rows: list[TensorSummary]) -> str:
    """Renders `TensorSummary` rows as a fixed-width text table."""
    header = ("layer", "tensor", "K", "tables", "in use", "pruned", "zeros",
              "bits", "weights", "constraint")
    body = [
        (r.layer, r.tensor, str(r.num_values),
         f"{r.mode} (channels < K)" if r.per_channel_fallback else r.mode,
         str(r.in_use),
         f"{100 * r.prune_rate:.1f}%",
         "" if r.zeros is None else f"{100 * r.zeros:.1f}%",
         str(r.index_bits),
         f"{r.weight_count:,}", r.constraint)
        for r in rows
    ]
    return grid(header, body)
