"""The export pipeline: convert, lay out tables, compress, slim, measure, verify.

`export` (`exporter.py`) checks its arguments, calls this pipeline and
writes the files. The RAM search (`ram_budget`) builds its candidate models
here, and the flash planner's byte model (`plan_costs`) reads its
reference conversion and slim int8 file from here.

- `Settings`: the export's arguments that every build shares.
- `convert_and_choose_tables`: TF's converter, then each LUT kernel's
  weight tensor and its table layout (`compress.TableLayout`).
- `assemble`: that, then compression, slimming and arena sizes: a `Built`.
- `assemble_verified`: `assemble`, then verification on TFLM.
- `build_file`: the requantised twin and the compressed, slimmed file.
"""

import dataclasses
import typing

import keras

from tflite_export.errors import ExportError
from tflite_export.pipeline import arena
from tflite_export.pipeline import compress
from tflite_export.pipeline import convert
from tflite_export.pipeline import flatbuffer
from tflite_export.pipeline import int4 as int4_lib
from tflite_export.pipeline import lut_tensors
from tflite_export.pipeline import mapping
from tflite_export.pipeline import shared_tables
from tflite_export.pipeline import slim as slim_lib
from tflite_export.pipeline import tflm_limits
from tflite_export.pipeline import verify as verify_lib


@dataclasses.dataclass
class Settings:
    """The export's arguments that every build of a candidate model shares.

    `reference` is the Keras model TFLM's outputs are compared with (the
    model as given, also for a split model, which computes the same).
    """

    quantize: str
    data: object
    io_dtype: str
    weight_quantization: str
    shared_tables: object
    slim: bool
    verify: bool
    inputs: object
    source: str
    min_agreement: object
    reference: object
    int4: str = int4_lib.DEFAULT


@dataclasses.dataclass
class Built:
    """One model converted, laid out, compressed and measured (not verified).

    Attributes:
        baseline: The converter's file (uncompressed, unslimmed).
        twin: The requantised uncompressed twin of `compressed`.
        compressed: The file to write.
        layouts: `compress.TableLayout`s, one per matched weight tensor.
        unmatched: LUT kernels no weight tensor holds.
        chosen: The weight quantisation used.
        steps: Slimming steps applied.
        slim_baseline: `baseline` slimmed like `compressed`.
        arena_bytes: Smallest arena of `compressed`.
        baseline_arena: Smallest arena of `baseline`.
        shared: Whether a shared table was compressed.
        num_inputs: Inputs of the model.
        int4: `{weight tensor index: int4.Int4Tensor}` stored as int4.
    """

    baseline: bytes
    twin: bytes
    compressed: bytes
    layouts: list
    unmatched: list
    chosen: str
    steps: tuple
    slim_baseline: bytes
    arena_bytes: int
    baseline_arena: int
    shared: bool
    num_inputs: int
    int4: dict = dataclasses.field(default_factory=dict)

    @property
    def decode_buffer_bytes(self):
        """Bytes of the largest decoded kernel (DECODE's output), 0 if none."""
        return max(
            (t.match.weight.nbytes for t in self.layouts if t.compress), default=0
        )


class Conversion(typing.NamedTuple):
    """A converted model and the table layouts of its LUT kernels.

    Attributes:
        baseline: The converter's file.
        info: Its `flatbuffer.read` contents.
        layouts: `compress.TableLayout`s of the matched weight tensors
            (`compress` still False).
        unmatched: LUT kernels no weight tensor holds.
        chosen: The weight quantisation used (`"float"` for float32).
    """

    baseline: bytes
    info: object
    layouts: list
    unmatched: list
    chosen: str


def assemble(model, kernels, notes, settings, share=True, keep=None,
             previous=None):
    """Converts, lays out tables, compresses and measures one model.

    No verification (`assemble_verified` adds it).

    Args:
        model: The plain Keras model to convert (maybe split).
        kernels: Its `LutKernel`s.
        notes: List the build appends report notes to.
        settings: `Settings`.
        share: Whether shared tables may be chosen.
        keep: `{layer name: reason}`: LUT kernels to keep uncompressed
            (int8), e.g. whose decoded size exceeds a RAM limit.
        previous: A `Built` of the same model whose conversion is reused
            (only the table layouts are chosen again).

    Returns:
        A `Built`.
    """
    if previous is None:
        baseline, info, layouts, unmatched, chosen = convert_and_choose_tables(
            model, kernels, settings.quantize, settings.data, settings.io_dtype,
            settings.weight_quantization, share=share,
        )
        num_inputs = info.num_inputs
        tflm_limits.check(baseline, model)
        try:
            baseline_arena = arena.find_arena_size(
                baseline, num_inputs, "uncompressed model"
            )
        except ExportError as e:
            raise _explained(e, model) from e
    else:
        baseline, unmatched, chosen = (
            previous.baseline, previous.unmatched, previous.chosen
        )
        num_inputs, baseline_arena = previous.num_inputs, previous.baseline_arena
        layouts = [
            compress.table_layout(t.match, share=share) for t in previous.layouts
        ]
    for layout in layouts:
        compress.decide(layout, scales_kept=not settings.slim)
        reason = (keep or {}).get(layout.match.kernel.layer)
        if reason and layout.compress:
            layout.compress = False
            layout.note = "; ".join(filter(None, [layout.note, reason]))
    int4_tensors = int4_lib.choose(layouts, settings.int4,
                                   scales_kept=not settings.slim)
    wanted_steps = slim_lib.STEPS if settings.slim else ()
    twin, compressed, steps = build_file(
        baseline, layouts, wanted_steps, notes, settings.data, int4=int4_tensors
    )
    slim_baseline = slim_lib.slim(baseline, steps) if steps else baseline
    if (len(compressed) >= len(slim_baseline) and any(t.compress for t in layouts)
            and not int4_tensors):
        # The per-tensor size estimate was beaten by file overhead: keep
        # the smaller, uncompressed model.
        for layout in layouts:
            if layout.compress:
                layout.compress = False
                layout.note = "; ".join(
                    filter(None, [layout.note,
                                  "kept uncompressed: the file would grow"])
                )
        twin, compressed = baseline, slim_baseline
    arena_bytes = arena.find_arena_size(compressed, num_inputs, "compressed model")
    return Built(
        baseline=baseline, twin=twin, compressed=compressed, layouts=layouts,
        unmatched=unmatched, chosen=chosen, steps=steps,
        slim_baseline=slim_baseline, arena_bytes=arena_bytes,
        baseline_arena=baseline_arena,
        shared=any(t.mode == "shared" and t.compress for t in layouts),
        num_inputs=num_inputs, int4=int4_tensors,
    )


def assemble_verified(model, kernels, notes, settings, keep=None, built=None):
    """`assemble` (unless `built` is given), then verification if asked.

    With `shared_tables="auto"`, a model whose shared tables agree less
    with Keras than the converter's int8 model is laid out again with one
    table per channel.

    Args:
        model, kernels, notes, settings, keep: As for `assemble`.
        built: A `Built` of `model` to verify instead of assembling it.

    Returns:
        `(built, verification)`: the `Built` and its
        `verify.Verification`, None without `settings.verify`.
    """
    if built is None:
        built = assemble(
            model, kernels, notes, settings,
            share=settings.shared_tables is not False, keep=keep,
        )
    while True:
        verification = None
        if settings.verify:
            verification = verify_lib.verify(
                built.compressed,
                built.twin,
                settings.reference,
                settings.inputs,
                built.arena_bytes,
                built.baseline_arena,
                input_source=settings.source,
                min_agreement=settings.min_agreement,
                plain_int8=built.baseline if built.twin != built.baseline else None,
            )
        if not (
            settings.shared_tables == "auto"
            and built.shared
            and verification is not None
            and verification.worse_than_int8
        ):
            return built, verification
        # The shared tables' coarser scales cost agreement with Keras: fall
        # back to one table per channel, with the converter's own scales.
        notes.append(
            "shared value tables dropped: the requantised model agreed less "
            "with Keras than the converter's int8 model ("
            + verification.agreement()
            + ")"
        )
        built = assemble(
            model, kernels, notes, settings, share=False, keep=keep, previous=built
        )


def build_file(baseline, layouts, steps, notes, data=None, int4=None):
    """`(twin, compressed, steps)`: the requantised twin and the written file.

    The twin is the int8 model with the shared tables' scales and biases,
    uncompressed and unslimmed; the compressed file must run bit-exact
    with it. A slimming step that makes TFLM's outputs differ (or fail) on
    a probe input is dropped with a note. `data` (per-input arrays) gives
    the probe valid values for integer index inputs.

    Args:
        baseline: The converter's file.
        layouts: `compress.TableLayout`s (after `compress.decide`); those
            marked `compress` are compressed.
        steps: Slimming steps to try (`slim.STEPS`, or none).
        notes: List of report notes (appended to).
        data: Per-input arrays for the probe, or None.
        int4: `{weight tensor index: int4.Int4Tensor}` to store as int4.
    """
    rewrites = {
        t.match.weight.index: (t.shared, t.match.weight.bias_index)
        for t in layouts
        if t.compress and t.mode == "shared"
    }
    int4 = int4 or {}  # `int4.Int4Tensor`s by weight index: the twin holds their codes
    rewrites.update(int4_lib.twin_rewrites(int4))
    twin = shared_tables.requantize(baseline, rewrites)
    full = int4_lib.write(compress.compress_model(twin, layouts), int4)
    if not steps:
        return twin, full, ()
    probe = verify_lib.probe_outputs(full, data=data)

    def harmless(chosen):
        try:
            candidate = slim_lib.slim(full, chosen)
            return (
                candidate
                if verify_lib.probe_outputs(candidate, data=data) == probe
                else None
            )
        except Exception:  # TFLM or the flatbuffer tools refused it
            return None

    candidate = harmless(steps)
    if candidate is None:
        kept = [step for step in steps if harmless([step]) is not None]
        for step in steps:
            if step not in kept:
                notes.append(f"slimming step '{step}' dropped: it changed TFLM's outputs")
        steps = tuple(kept)
        candidate = harmless(steps) if steps else None
        if candidate is None:
            notes.append("slimming dropped: the steps together changed TFLM's outputs")
            return twin, full, ()
    return twin, candidate, tuple(steps)


def _candidate_quantizations(model, kernels, quantize, weight_quantization):
    """Weight quantisations to try, the smallest tables first."""
    if quantize == "float32":
        return ["float"]
    if weight_quantization != "auto":
        return [weight_quantization]
    # Scaled dictionaries differ per channel by a scale: not one table of a
    # per-tensor int8 tensor.
    per_tensor = {
        k.layer for k in kernels if not k.per_channel and k.channel_scales is None
    }
    layers = lut_tensors.weight_layers(model)
    candidates = []
    # Per-tensor weights give one small table instead of one per channel,
    # but would cost accuracy in layers that are not LUT-Q: only when every
    # weight layer (resp. every Dense) has a per-tensor dictionary.
    if per_tensor and all(layer.name in per_tensor for layer in layers):
        candidates.append("per_tensor")
    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    if dense and all(layer.name in per_tensor for layer in dense):
        candidates.append("dense_per_tensor")
    candidates.append("per_channel")
    return candidates


def convert_and_choose_tables(model, kernels, quantize, data, io_dtype,
                              weight_quantization, share=True):
    """Converts with each candidate weight quantisation until one keeps the LUTs.

    A quantisation keeps the LUTs when no table holds more codes than its
    dictionary has values (a per-tensor table of a kernel with a folded
    batch norm does) and no two dictionary values round to one code.

    Args:
        model: The plain Keras model.
        kernels: Its `LutKernel`s.
        quantize: `"int8"` or `"float32"`.
        data: Representative data (per-input arrays), or None.
        io_dtype: Type of the model's inputs and outputs.
        weight_quantization: `"auto"` or one of
            `convert.WEIGHT_QUANTIZATION`.
        share: Whether shared tables may be chosen.

    Returns:
        A `Conversion`.

    Raises:
        ExportError: int8 tables hold more codes than a dictionary has
            values (a batch norm folded into a per-tensor kernel).
    """
    candidates = _candidate_quantizations(model, kernels, quantize,
                                          weight_quantization)
    for chosen in candidates:
        baseline = convert.convert(
            model,
            quantize,
            data,
            io_dtype=io_dtype,
            weight_quantization=chosen if chosen != "float" else "per_channel",
        )
        info = flatbuffer.read(baseline)
        matches, unmatched = mapping.match(info.weights, kernels)
        layouts = [compress.table_layout(m, share=share) for m in matches]
        if not any(t.spread or t.merged for t in layouts):
            break
    if quantize == "int8":
        spread = [t for t in layouts if t.spread]
        if spread:
            raise ExportError(
                "int8 weight quantisation '" + chosen + "' gives tables with more "
                "codes than the LUT-Q dictionary has values: "
                + "; ".join(
                    f"layer '{t.match.kernel.layer}' ({t.match.weight.op}): "
                    f"{t.codes} codes, K={t.match.kernel.num_values}"
                    for t in spread
                )
                + ". A batch norm folded into a kernel needs per-channel "
                "tables: use weight_quantization='per_channel' (or 'auto')."
            )
    return Conversion(baseline, info, layouts, unmatched, chosen)


def _explained(error, model):
    """Adds what to do when TFLM lacks a kernel Keras' Embedding needs."""
    embedding = [
        layer.name for layer in lut_tensors.all_layers(model)
        if isinstance(layer, keras.layers.Embedding)
    ]
    if not embedding or "SELECT" not in str(error):
        return error
    return type(error)(
        f"{error}\nKeras' Embedding ({', '.join(embedding)}) wraps negative "
        "ids with LESS/ADD/SELECT, and TFLM has no SELECT kernel. TFLM runs "
        "GATHER with int32 ids: replace the Embedding with a layer whose "
        "call is `tf.gather(self.embeddings, ids)` (same weights), which "
        "exports and runs on TFLM."
    )
