"""`plan_budget`: int8, native int4 or a LUT per layer for a flash budget.

    plan = tflite_export.plan_budget(model, 64 * 1024, x, labels=y)
    print(plan)                                    # the plan table
    q = lutq_tf.quantize_model(model, **plan)      # or **plan.quantize_options()
    ... fine-tune q ...
    tflite_export.export(q, "m.tflite", x, **plan.export_options())

Per layer the choices are: int8 (not LUT-Q); native int4 where TFLM runs
the op with int4 filters (CONV_2D and DEPTHWISE_CONV_2D per tensor or per
channel, FULLY_CONNECTED per tensor): an int4-exact dictionary
(`constraint="int4"`, K <= 16) stored 4 bits a weight with no tables and
no DECODE; or a LUT: K = 2**b for b in `bits` with one dictionary per
tensor, per channel-scaled tensor or per output channel. Each choice has a
byte cost (`plan_costs`: the exporter's own accounting, from one reference
conversion) and a sensitivity (`sensitivity`: Fisher-weighted k-means
distortion; for int4, that of the int4 grid's own fit). A multiple-choice
knapsack (`knapsack`) picks the least total sensitivity whose estimated
file fits the budget. The estimate is never below the written file (the
byte model counts every table entry and the exporter's per-tensor
overhead), so the export fits when called with `plan.export_options()`.
An int4 FULLY_CONNECTED layer makes the export quantise every Dense
kernel per tensor (`weight_quantization="dense_per_tensor"`): the planner
solves both ways and keeps the better; the per-channel scales that drops
(4 B per channel) are not credited, so such estimates are looser.

With `target=` (a `tflite_export.PROFILES` name or `Target`) the
budget is still the file's; the plan also counts the code it adds to a
firmware (DECODE once when any layer is a LUT, 0 when the firmware links
it anyway; int4 adds none) and reports the firmware flash change against
the all-int8 route, each layer's DECODE path, decode or int4-kernel
instructions and arena, and the totals against the int8 model. A plan
without DECODE (int8 and int4 layers) is taken whenever one meets the
budget (and caps); else LUTs that save more file than DECODE's code; only
when none meets them does a plan grow the firmware, and its notes say by
how much. Optional caps bound the arena
(`max_arena_growth_bytes`) and the instructions (`max_instructions_growth`)
the plan adds over the int8 model.
"""

import dataclasses
import json
import math
import numbers
import typing

import numpy as np

from lutq_tf.registry import all_layers
from lutq_tf.text import grid
from tflite_export.device import firmware
from tflite_export.device import target as targets
from tflite_export.planning import knapsack
from tflite_export.planning import plan_costs
from tflite_export.planning import sensitivity as sensitivity_lib
from tflite_export.planning.plan_costs import DENSE_PER_TENSOR
from tflite_export.planning.plan_costs import INT4
from tflite_export.planning.plan_costs import INT4_MAX_BITS
from tflite_export.planning.plan_costs import INT4_MODES
from tflite_export.planning.plan_costs import INT8
from tflite_export.planning.plan_costs import LUT
from tflite_export.planning.plan_costs import MAX_BITS
from tflite_export.planning.plan_costs import MODES
from tflite_export.planning.plan_costs import REPRESENTATIONS

# What is offered unless asked otherwise: the byte estimate is within 1 %
# of the file there (see `plan_costs`); 5-7 bits and scaled dictionaries
# are estimated on the safe side but looser.
DEFAULT_BITS = (1, 2, 3, 4)
DEFAULT_MODES = ("tensor", "channel")
# Inputs used for the reference conversion's int8 calibration.
_CALIBRATION_SAMPLES = 64


@dataclasses.dataclass
class LayerPlan:
    """The choice for one layer.

    Attributes:
        layer: Keras layer name.
        layer_type: Keras class name.
        weights: Kernel elements (int8 bytes).
        bits: Index bits, or None when the layer stays int8.
        mode: `"tensor"`, `"scaled"`, `"channel"` or `"int8"`.
        bytes: Estimated file bytes of the layer's weight tensors.
        sensitivity: Expected loss increase of the choice (see
            `sensitivity`), comparable across layers of one plan.
        decode_path: With a target, TFLM's DECODE path for the layer's
            tensors (`target.DECODE_PATHS`, joined with "+" where they
            differ); None for int8 or without a target.
        decode_instructions: With a target, estimated instructions to
            decode the layer once per inference (`firmware.decode_instructions`);
            None for int8 or without a target.
        representation: `"int8"`, `"int4"` (TFLM's native int4 weights: an
            int4-exact dictionary of K = 2**bits values, `constraint="int4"`,
            stored 4 bits a weight, no DECODE) or `"lut"` (packed indices
            and value tables that DECODE expands). Derived from `mode` when
            not given (int8 or lut, as in plans before schema 4).
        int4_instructions: With a target, the instructions per inference
            the layer's int4 kernel adds over int8 (`TensorFacts.
            int4_instructions`); None for other representations or without
            a target.
        arena_bytes: With a target, the arena the choice adds while its op
            runs: the decoded kernel plus DECODE's state for a LUT, the
            int4 kernels' extra scratch for int4 (the target's kernel set),
            0 for int8; None without a target.
    """

    layer: str
    layer_type: str
    weights: int
    bits: object
    mode: str
    bytes: int
    sensitivity: float
    decode_path: object = None
    decode_instructions: object = None
    representation: object = None
    int4_instructions: object = None
    arena_bytes: object = None

    def __post_init__(self):
        if self.representation is None:
            self.representation = INT8 if self.mode == INT8 else LUT

    @property
    def num_values(self):
        """K, or None for int8."""
        return None if self.bits is None else 2**self.bits

    @property
    def extra_instructions(self):
        """With a target, what the choice adds per inference over int8."""
        return (self.decode_instructions or 0.0) + (self.int4_instructions or 0.0)

    def options(self):
        """`quantize_model` options of this layer, or None (stays int8)."""
        if self.mode == INT8:
            return None
        if self.mode not in MODES:
            raise ValueError(
                f"layer '{self.layer}': mode {self.mode!r} is not one of "
                f"{MODES + (INT8,)}."
            )
        if self.representation == INT4:
            return {"bits": self.bits, "per_channel": self.mode == "channel",
                    "channel_scales": False, "constraint": "int4"}
        return {"bits": self.bits, "per_channel": self.mode == "channel",
                "channel_scales": self.mode == "scaled"}


@dataclasses.dataclass
class Plan:
    """Per-layer choices that fit a flash budget.

    Usable as keyword arguments of `lutq_tf.quantize_model`:
    `quantize_model(model, **plan)` quantises exactly the planned layers
    (`layer_names`) with their options (`overrides`: int4 layers get
    `constraint="int4"`); the others stay float and export as int8. It also
    passes each planned layer's weight count (`expected_weights`), so a
    model whose layers differ from the planned one's is refused rather
    than exported above the estimate.

    Attributes:
        budget_bytes: The flash budget: for the file, or with
            `budget_includes_code` for the file plus the code the plan adds.
        estimate_bytes: The estimated file (never below the written one).
        int8_bytes: The slim file with every layer int8.
        min_bytes: The smallest file the offered choices allow.
        layers: `LayerPlan`s in model order.
        fisher: How the sensitivities were weighted (`"labels"`,
            `"outputs"`, or `"none"`: plain squared error).
        target: The name of the `target.Target` planned for, or None.
        target_profile: Whether `target` names a shipped profile
            (`target.PROFILES`) with its figures: only then does
            `export_options` pass it to `export`.
        decode_code_bytes: With a target, the code DECODE adds to a
            firmware that uses it (`Target.decode_code_cost`: 0 when the
            firmware links it anyway); else None.
        flash_change: With a target, the estimated firmware flash change
            against the all-int8 route: the file change plus
            `decode_code_bytes` when any layer is a LUT; else None.
        weight_quantization: The export's int8 weight quantisation:
            `"per_channel"`, or `"dense_per_tensor"` when a
            FULLY_CONNECTED layer is int4 (TFLM takes int4 FULLY_CONNECTED
            weights per tensor only; every Dense kernel is then per tensor).
        int8_instructions: With a target, the int8 model's estimated MAC
            instructions per inference (`firmware.report`'s figure); else None.
        instructions_growth: With a target, the instructions the plan adds
            (decoding, int4 kernels) over `int8_instructions`, a fraction.
        arena_growth_bytes: With a target, an upper bound of the arena the
            plan adds over the int8 model on the target's kernel set: the
            largest layer's `arena_bytes` (one op runs at a time) plus
            DECODE's state for every decoded tensor.
        max_instructions_growth, max_arena_growth_bytes: The caps planned
            for, or None.
        dense_per_tensor_bytes: What `"dense_per_tensor"` changes in the
            file (0 under per-channel weights; `ByteModel.
            dense_per_tensor_bytes`): the Dense kernels' per-channel scales
            go, but TFLM checks a per-tensor FULLY_CONNECTED bias's scale
            at prepare, so the slim step that drops bias quantisation may
            have to stay off for the whole file (counted always).
        budget_includes_code: Whether `budget_bytes` also counts the code
            the plan adds to the firmware (DECODE's, once, when any layer
            is a LUT; a target's figure): then `estimate_bytes` plus that
            code fits the budget (`counted_bytes`).
    """

    budget_bytes: int
    estimate_bytes: int
    int8_bytes: int
    min_bytes: int
    layers: list
    fisher: str = "labels"
    target: object = None
    target_profile: bool = False
    decode_code_bytes: object = None
    flash_change: object = None
    weight_quantization: str = "per_channel"
    int8_instructions: object = None
    instructions_growth: object = None
    arena_growth_bytes: object = None
    max_instructions_growth: object = None
    max_arena_growth_bytes: object = None
    dense_per_tensor_bytes: int = 0
    budget_includes_code: bool = False

    @property
    def counted_bytes(self):
        """What the budget counts: the estimated file, plus DECODE's code
        when `budget_includes_code` and any layer is a LUT."""
        code = self.decode_code_bytes if self.compressed else 0
        return self.estimate_bytes + (code if self.budget_includes_code else 0)

    def quantize_options(self):
        """`{"layer_names", "overrides", "expected_weights"}` for `quantize_model`.

        `expected_weights` holds every planned layer's weight count (int8
        layers too: their bytes are part of the estimate).
        """
        chosen = [row for row in self.layers if row.mode != INT8]
        return {
            "layer_names": [row.layer for row in chosen],
            "overrides": {row.layer: row.options() for row in chosen},
            "expected_weights": {row.layer: row.weights for row in self.layers},
        }

    def export_options(self):
        """Keyword arguments of `tflite_export.export` the estimate assumes.

        Per-channel weights and shared tables (`plan_costs.EXPORT_OPTIONS`);
        `weight_quantization="dense_per_tensor"` when a FULLY_CONNECTED
        layer is int4; `int4="always"` when the int4 layers are the only
        quantised ones (a kernel off the int4 grid is then an error, not a
        silent LUT), `"auto"` when LUT layers are there too.

        With a shipped profile as target (`target_profile`), also
        `target=<its name>`, so that the export reports on the same device;
        and `decode="always"` when the plan's DECODE ops do not pay for
        their code on their own (`decode_forced`: a budget that only
        compression meets, or LUTs that save flash only with the int4
        layers): `"auto"` would write those layers int8, over the budget. A
        plan for a custom `Target` leaves both out: pass your `Target` to
        `export` yourself (with `decode="always"` when `plan.decode_forced`).
        """
        options = dict(plan_costs.EXPORT_OPTIONS)
        if self.weight_quantization == DENSE_PER_TENSOR:
            options["weight_quantization"] = DENSE_PER_TENSOR
        if self.int4_layers:
            options["int4"] = "auto" if self.compressed else "always"
        if self.target is not None and self.target_profile:
            options["target"] = self.target
            if self.decode_forced:
                options["decode"] = "always"
        return options

    # A mapping of `quantize_options`, so that `quantize_model(m, **plan)`.
    def keys(self):
        return self.quantize_options().keys()

    def __getitem__(self, key):
        return self.quantize_options()[key]

    @property
    def sensitivity(self):
        return float(sum(row.sensitivity for row in self.layers))

    @property
    def compressed(self):
        """Whether any layer is a LUT (the file has DECODE ops)."""
        return any(row.representation == LUT for row in self.layers)

    @property
    def int4_layers(self):
        """The names of the layers stored as native int4."""
        return [row.layer for row in self.layers if row.representation == INT4]

    @property
    def file_change(self):
        """The estimated file minus the all-int8 file, in bytes."""
        return self.estimate_bytes - self.int8_bytes

    @property
    def lut_saving(self):
        """File bytes the LUT layers save, less DECODE's operator bytes."""
        if not self.compressed:
            return 0
        return sum(r.weights - r.bytes for r in self.layers
                   if r.representation == LUT) - plan_costs.DECODE_OPERATOR_BYTES

    @property
    def forced_growth(self):
        """With a target: compressed although the firmware does not shrink
        (only a budget below the int8 file makes the planner do that)."""
        return (self.target is not None and self.compressed
                and self.flash_change >= 0)

    @property
    def decode_forced(self):
        """With a target: the plan's DECODE ops save no more file than their
        code costs (`export(decode="auto")` would drop them)."""
        return (self.target is not None and self.compressed
                and self.lut_saving <= self.decode_code_bytes)

    @property
    def decode_instructions(self):
        """With a target, the estimated decode instructions per inference."""
        if self.target is None:
            return None
        return float(sum(r.decode_instructions or 0.0 for r in self.layers))

    @property
    def int4_instructions(self):
        """With a target, the instructions the int4 kernels add per inference."""
        if self.target is None:
            return None
        return float(sum(r.int4_instructions or 0.0 for r in self.layers))

    def notes(self):
        """What the plan means on its target, as lines (none without one)."""
        if self.target is None:
            return []
        code = self.decode_code_bytes
        notes = []
        if not self.compressed and not self.int4_layers:
            saving = self.int8_bytes - self.min_bytes
            if saving <= code:
                notes.append(
                    f"all int8 on {self.target}: compressing would save at most "
                    f"{saving:,} B of file, not more than the {code:,} B of code "
                    f"DECODE adds, so every compressed plan grows the firmware.")
            else:
                notes.append(
                    f"all int8 on {self.target}: the most accurate plan within the "
                    f"budget. Compressing saves firmware only with a file below "
                    f"{self.int8_bytes - code:,} B (the int8 file less the {code:,} B "
                    f"of code DECODE adds), at most {saving - code:,} B of flash: "
                    f"give such a budget to trade accuracy for it.")
        elif not self.compressed:
            notes.append(
                f"no DECODE op: {len(self.int4_layers)} int4 layer(s) save "
                f"{-self.file_change:,} B of file and firmware on {self.target} "
                "(the int8 firmware's kernels take int4 filters); they cost "
                f"{self.int4_instructions:,.0f} instructions per inference.")
        elif self.forced_growth:
            notes.append(
                f"the firmware grows by {self.flash_change:,} B against the all-int8 "
                f"route on {self.target}: the file shrinks by {-self.file_change:,} B "
                f"but DECODE adds {code:,} B of code. Compressed anyway because no "
                f"plan without that growth meets the "
                f"{'budget' if self.budget_includes_code else 'file budget'} "
                f"{self.budget_bytes:,} B"
                + (f" (below the int8 file, {self.int8_bytes:,} B)"
                   if self.budget_bytes < self.int8_bytes else "")
                + " and the caps. Export with decode='always'"
                + (" (in export_options)" if self.target_profile else
                   " and your target")
                + ": decode='auto' would write the LUT layers int8, over the budget.")
        elif self.decode_forced:
            notes.append(
                f"the LUT layers save {self.lut_saving:,} B of file, not more than "
                f"DECODE's {code:,} B of code: the plan saves firmware with its int4 "
                "layers, and meets the budget only with the LUTs. Export with "
                "decode='always'" + (" (in export_options)" if self.target_profile
                                     else " and your target") + ".")
        slow = [r.layer for r in self.layers
                if r.decode_path is not None and "width_any" in r.decode_path]
        if slow:
            notes.append(
                f"{', '.join(slow)}: DECODE's per-weight path (~24 instructions per "
                "weight against ~3.4 on the 2-4-bit block paths), which 1-bit "
                "tables and per-channel depthwise kernels always take.")
        return notes

    def table(self):
        """The plan as a text table (layer, representation, K, mode, bytes,
        sensitivity; with a target, each layer's decode path, the
        instructions it adds and its arena)."""
        head = ("layer", "type", "repr.", "weights", "K", "bits", "mode", "bytes",
                "sensitivity")
        rows = [(r.layer, r.layer_type, r.representation, f"{r.weights:,}",
                 "-" if r.bits is None else str(r.num_values),
                 "8" if r.bits is None else "4" if r.representation == INT4
                 else str(r.bits), r.mode,
                 f"{r.bytes:,}", f"{r.sensitivity:.3g}") for r in self.layers]
        right = {3, 4, 5, 7, 8}
        if self.target is not None:
            head += ("decode path", "decode instr.", "int4 instr.", "arena B")

            def number(value):
                return "-" if value is None else f"{value:,.0f}"

            rows = [row + ("-" if r.decode_path is None else r.decode_path,
                           number(r.decode_instructions), number(r.int4_instructions),
                           number(r.arena_bytes))
                    for row, r in zip(rows, self.layers)]
            right |= {10, 11, 12}
        out = [grid(head, rows, right=right)]
        counted = f"estimated file {self.estimate_bytes:,} B"
        if self.budget_includes_code:
            counted += (f" + DECODE code {self.counted_bytes - self.estimate_bytes:,} B"
                        f" = {self.counted_bytes:,} B")
        out.append(
            f"{counted} of budget {self.budget_bytes:,} B"
            f"{' (file and code)' if self.budget_includes_code else ''} "
            f"({self.counted_bytes / self.budget_bytes:.1%}); "
            f"all int8 {self.int8_bytes:,} B; smallest possible {self.min_bytes:,} B; "
            f"total sensitivity {self.sensitivity:.3g} (Fisher from {self.fisher})"
        )
        if self.weight_quantization == DENSE_PER_TENSOR:
            out.append("FULLY_CONNECTED weights per tensor (an int4 FULLY_CONNECTED "
                       "layer needs it): weight_quantization='dense_per_tensor'")
        if self.target is not None:
            code = self.decode_code_bytes if self.compressed else 0
            out.append(
                f"on {self.target}: firmware flash {self.flash_change:+,} B against the "
                f"all-int8 route (file {self.file_change:+,} B, DECODE code {code:+,} B); "
                f"decode {self.decode_instructions:,.0f} instructions per inference"
            )
            if self.instructions_growth is not None:
                caps = []
                if self.max_instructions_growth is not None:
                    caps.append(f"cap {self.max_instructions_growth:+.1%}")
                line = (f"instructions {self.instructions_growth:+.1%} over the int8 "
                        f"model's {self.int8_instructions:,.0f} (decode "
                        f"{self.decode_instructions:,.0f}, int4 kernels "
                        f"{self.int4_instructions:,.0f})")
                line += f" ({caps[0]})" if caps else ""
                line += f"; arena at most {self.arena_growth_bytes:+,} B over int8"
                if self.max_arena_growth_bytes is not None:
                    line += f" (cap {self.max_arena_growth_bytes:+,} B)"
                out.append(line)
            out.extend(f"note: {line}" for line in self.notes())
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def to_dict(self):
        """The plan as JSON-ready data (`from_dict` reads it back)."""
        return {
            "schema": SCHEMA,
            "budget_bytes": self.budget_bytes,
            "estimate_bytes": self.estimate_bytes,
            "int8_bytes": self.int8_bytes,
            "min_bytes": self.min_bytes,
            "fisher": self.fisher,
            "target": self.target,
            "target_profile": self.target_profile,
            "decode_code_bytes": self.decode_code_bytes,
            "flash_change": self.flash_change,
            "weight_quantization": self.weight_quantization,
            "dense_per_tensor_bytes": self.dense_per_tensor_bytes,
            "int8_instructions": self.int8_instructions,
            "instructions_growth": self.instructions_growth,
            "arena_growth_bytes": self.arena_growth_bytes,
            "max_instructions_growth": self.max_instructions_growth,
            "max_arena_growth_bytes": self.max_arena_growth_bytes,
            "budget_includes_code": self.budget_includes_code,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "quantize_options": self.quantize_options(),
            "export_options": self.export_options(),
        }

    @classmethod
    def from_dict(cls, data, source="plan"):
        """A `Plan` from `to_dict`'s data, every field checked.

        Args:
            data: The dict (e.g. parsed JSON).
            source: What the data came from, for the messages (a path).

        Raises:
            ValueError: A missing, unknown, mistyped or out-of-range field,
                or numbers that disagree (an estimate that the layers'
                bytes do not give, a layer's bytes below what its bits
                need); the message names `source` and the field.
        """
        return _plan_from_dict(cls, data, str(source))

    def save(self, path):
        """Writes the plan as JSON (`Plan.load` reads it back).

        Raises:
            ValueError: The plan does not pass `from_dict`'s checks (e.g.
                an edited estimate); nothing is written.
        """
        data = self.to_dict()
        self.from_dict(data, source=f"plan to save as {path}")
        text = json.dumps(data, indent=1)
        with open(path, "w") as f:
            f.write(text)

    @classmethod
    def load(cls, path):
        """Reads a plan written by `save` (or the CLI's `--out`).

        Raises:
            OSError: The file cannot be read.
            ValueError: Not JSON (e.g. truncated), or a field fails
                `from_dict`'s checks; the message names the file and field.
        """
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path}: not a plan JSON file ({e}); it may be cut off. "
                "Write it again with Plan.save or `python -m "
                "tflite_export.plan ... --out`."
            ) from e
        return cls.from_dict(data, source=path)


# Plan files: 2 adds `schema` and `quantize_options["expected_weights"]`;
# files without `schema` (1) hold the same layer fields and load alike. 3
# adds the target fields (`_TARGET_FIELDS`) and the layers' decode path and
# instructions; 1 and 2 load as plans without a target. 4 adds native int4:
# each layer's `representation` (int8, int4 or lut), int4 instructions and
# arena, and the plan's `weight_quantization` and device totals and caps
# (`_SCHEMA4_FIELDS`); 1-3 load as plans of int8 and LUT layers. 5 adds
# `budget_includes_code`; 1-4 load with it false.
SCHEMA = 5
_PLAN_FIELDS = ("budget_bytes", "estimate_bytes", "int8_bytes", "min_bytes", "layers")
_TARGET_FIELDS = ("target", "target_profile", "decode_code_bytes", "flash_change")
_DEVICE_FIELDS = ("int8_instructions", "instructions_growth", "arena_growth_bytes",
                  "max_instructions_growth", "max_arena_growth_bytes")
_SCHEMA4_FIELDS = ("weight_quantization", "dense_per_tensor_bytes") + _DEVICE_FIELDS
_SCHEMA5_FIELDS = ("budget_includes_code",)
_OPTIONAL_FIELDS = ("schema", "fisher", "quantize_options",
                    "export_options") + _TARGET_FIELDS + _SCHEMA4_FIELDS + _SCHEMA5_FIELDS
_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerPlan))
# The layer fields of schemas 1 and 2, and of 3.
_OLD_LAYER_FIELDS = _LAYER_FIELDS[:7]
_SCHEMA3_LAYER_FIELDS = _LAYER_FIELDS[:9]
_WEIGHT_QUANTIZATIONS = ("per_channel", DENSE_PER_TENSOR)
_FISHER_SOURCES = ("labels", "outputs", "none")
_REPLAN = ("Plans are measured, not edited: plan again (plan_budget with other "
           "bits=/modes=, or a budget) or pass quantize_model your own overrides.")


def _plan_from_dict(cls, data, source):
    """`Plan.from_dict`: each field checked, then the numbers against each other."""

    def fail(field, message):
        return ValueError(f"{source}: {field}: {message}")

    def count(field, value, minimum=1):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise fail(field, f"must be a whole number, got {value!r}.")
        if value < minimum:
            raise fail(field, f"must be at least {minimum}, got {value}.")
        return int(value)

    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: not a plan: expected a JSON object with the fields "
            f"{list(_PLAN_FIELDS)}, got {type(data).__name__}."
        )
    schema = data.get("schema", 1)
    if schema not in range(1, SCHEMA + 1) or isinstance(schema, bool):
        raise fail("schema", f"{schema!r} is not a plan format this version reads "
                             f"(1 to {SCHEMA}); plan again with this version.")
    if schema < 3:
        newer = [k for k in _TARGET_FIELDS if k in data]
        if newer:
            raise fail(newer[0], f"a schema {schema} plan has no target fields; "
                                 "they came with schema 3.")
    if schema < 4:
        newer = [k for k in _SCHEMA4_FIELDS if k in data]
        if newer:
            raise fail(newer[0], f"a schema {schema} plan has no such field; it came "
                                 "with schema 4 (native int4).")
    if schema < 5:
        newer = [k for k in _SCHEMA5_FIELDS if k in data]
        if newer:
            raise fail(newer[0], f"a schema {schema} plan has no such field; it came "
                                 "with schema 5.")
    layer_fields = (_LAYER_FIELDS if schema >= 4 else _SCHEMA3_LAYER_FIELDS
                    if schema == 3 else _OLD_LAYER_FIELDS)
    missing = [k for k in _PLAN_FIELDS if k not in data]
    if missing:
        raise fail(missing[0], f"missing (a plan holds {list(_PLAN_FIELDS)}). {_REPLAN}")
    unknown = sorted(set(data) - set(_PLAN_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise fail(unknown[0], f"not a plan field (known: "
                               f"{list(_PLAN_FIELDS + _OPTIONAL_FIELDS)}).")
    budget, estimate, int8_bytes, minimum = (
        count(k, data[k]) for k in _PLAN_FIELDS[:4])
    fisher = data.get("fisher", "labels")
    if fisher not in _FISHER_SOURCES:
        raise fail("fisher", f"must be one of {_FISHER_SOURCES}, got {fisher!r}.")
    quantization = data.get("weight_quantization", "per_channel")
    if quantization not in _WEIGHT_QUANTIZATIONS:
        raise fail("weight_quantization", f"must be one of {_WEIGHT_QUANTIZATIONS}, "
                                          f"got {quantization!r}.")
    dense_bytes = data.get("dense_per_tensor_bytes", 0)
    if isinstance(dense_bytes, bool) or not isinstance(dense_bytes, numbers.Integral):
        raise fail("dense_per_tensor_bytes", f"must be a whole number of bytes, got "
                                             f"{dense_bytes!r}.")
    dense_bytes = int(dense_bytes)
    if dense_bytes and quantization != DENSE_PER_TENSOR:
        raise fail("dense_per_tensor_bytes", f"{dense_bytes:,} B under weight_quantization "
                                             f"{quantization!r}: only "
                                             f"'{DENSE_PER_TENSOR}' adds bytes.")
    if not isinstance(data["layers"], list):
        raise fail("layers", f"must be a list of layer rows, got {data['layers']!r}.")

    rows = []
    for i, row in enumerate(data["layers"]):
        where = f"layers[{i}]"
        if not isinstance(row, dict):
            raise fail(where, f"must be an object with {list(layer_fields)}, got {row!r}.")
        missing = [k for k in layer_fields if k not in row]
        unknown = sorted(set(row) - set(layer_fields))
        if missing or unknown:
            raise fail(where, f"must have exactly the fields {list(layer_fields)}; "
                              f"missing {missing}, unknown {unknown}.")
        name = row["layer"]
        if not isinstance(name, str) or not name:
            raise fail(f"{where}.layer", f"must be a layer name, got {name!r}.")
        where = f"layers[{i}] ('{name}')"
        if any(r.layer == name for r in rows):
            raise fail(where, "names a layer twice.")
        if not isinstance(row["layer_type"], str):
            raise fail(f"{where}.layer_type", f"must be a class name, got "
                                              f"{row['layer_type']!r}.")
        weights = count(f"{where}.weights", row["weights"])
        mode, bits, size = row["mode"], row["bits"], row["bytes"]
        if mode not in MODES + (INT8,):
            raise fail(f"{where}.mode", f"{mode!r} is not a dictionary mode: one of "
                                        f"{MODES + (INT8,)}.")
        kind = row.get("representation", INT8 if mode == INT8 else LUT)
        if kind not in REPRESENTATIONS:
            raise fail(f"{where}.representation", f"{kind!r} is not one of "
                                                  f"{REPRESENTATIONS}.")
        if (kind == INT8) != (mode == INT8):
            raise fail(f"{where}.mode", f"{mode!r} with representation {kind!r}: an int8 "
                                        "layer has mode 'int8', the others a "
                                        "dictionary mode.")
        if kind == INT4:
            if mode not in INT4_MODES:
                raise fail(f"{where}.mode", f"an int4 dictionary is per tensor or per "
                                            f"channel {INT4_MODES}, got {mode!r}.")
            if (isinstance(bits, bool) or not isinstance(bits, numbers.Integral)
                    or not 1 <= bits <= INT4_MAX_BITS):
                raise fail(f"{where}.bits", f"an int4 dictionary has 1..{INT4_MAX_BITS} "
                                            f"index bits (K <= 16), got {bits!r}.")
            if row["layer_type"] == "Dense" and quantization != DENSE_PER_TENSOR:
                raise fail(f"{where}.representation", (
                    "an int4 Dense layer needs weight_quantization "
                    f"'{DENSE_PER_TENSOR}' (TFLM takes int4 FULLY_CONNECTED weights "
                    f"per tensor only), got {quantization!r}."))
            if row["layer_type"] == "Dense" and mode != "tensor":
                raise fail(f"{where}.mode", "TFLM takes int4 FULLY_CONNECTED weights "
                                            f"per tensor only, got {mode!r}.")
        if mode == INT8:
            if bits is not None:
                raise fail(f"{where}.bits", f"must be null for an int8 layer, got {bits!r}.")
        elif (isinstance(bits, bool) or not isinstance(bits, numbers.Integral)
              or not 1 <= bits <= MAX_BITS):
            raise fail(f"{where}.bits", f"must be index bits in 1..{MAX_BITS} "
                                        f"(TFLM's LUT decoding), got {bits!r}.")
        elif 2**bits > weights:
            raise fail(f"{where}.bits", f"K = {2**bits} values for {weights} weights.")
        if (kind == LUT and quantization == DENSE_PER_TENSOR
                and row["layer_type"] == "Dense" and mode != "tensor"):
            raise fail(f"{where}.mode", (
                f"{mode!r}: under weight_quantization '{DENSE_PER_TENSOR}' a Dense "
                "kernel has one int8 scale, so its LUT is per tensor. " + _REPLAN))
        size = count(f"{where}.bytes", size)
        if mode == INT8 and size != weights:
            raise fail(f"{where}.bytes", f"an int8 layer's bytes are its weights "
                                         f"({weights:,}), got {size:,}.")
        if kind == INT4 and size < plan_costs.int4_bytes(weights):
            raise fail(f"{where}.bytes", (
                f"an int4 layer of {weights:,} weights takes at least "
                f"{plan_costs.int4_bytes(weights):,} B (two a byte, padded to 16, "
                f"and its buffer's entry), got {size:,}. {_REPLAN}"))
        if kind == LUT:
            floor = plan_costs.smallest_layer_bytes(weights, int(bits))
            if not floor <= size < weights:
                raise fail(f"{where}.bytes", (
                    f"{size:,} B for {weights:,} weights at {bits} bits: a compressed "
                    f"layer costs at least {floor:,} B and less than its int8 bytes "
                    f"({weights:,}). {_REPLAN}"))
        sens = row["sensitivity"]
        if (isinstance(sens, bool) or not isinstance(sens, numbers.Real)
                or not np.isfinite(sens) or sens < 0):
            raise fail(f"{where}.sensitivity", f"must be a finite number >= 0, got {sens!r}.")
        path, instructions = row.get("decode_path"), row.get("decode_instructions")
        if (path is None) != (instructions is None):
            raise fail(f"{where}.decode_path", (
                "decode_path and decode_instructions are given together or not at "
                f"all, got {path!r} and {instructions!r}."))
        if path is not None:
            instructions = _check_decode(fail, where, path, instructions, int(bits)
                                         if kind == LUT else None)
        int4_instructions = row.get("int4_instructions")
        if int4_instructions is not None:
            if kind != INT4:
                raise fail(f"{where}.int4_instructions", (
                    f"must be null for a {kind} layer, got {int4_instructions!r}."))
            int4_instructions = _number(fail, f"{where}.int4_instructions",
                                        int4_instructions)
        arena = row.get("arena_bytes")
        if arena is not None:
            arena = count(f"{where}.arena_bytes", arena, minimum=0)
        rows.append(LayerPlan(layer=name, layer_type=row["layer_type"],
                              weights=weights, bits=None if bits is None else int(bits),
                              mode=mode, bytes=size, sensitivity=float(sens),
                              decode_path=path, decode_instructions=instructions,
                              representation=kind, int4_instructions=int4_instructions,
                              arena_bytes=arena))

    # The numbers against each other: the estimate is what the layers' bytes
    # give on top of the all-int8 file (`plan_costs.ByteModel.estimate`).
    all_weights = sum(r.weights for r in rows)
    if int8_bytes <= all_weights:
        raise fail("int8_bytes", f"{int8_bytes:,} B cannot hold the layers' "
                                 f"{all_weights:,} int8 weights. {_REPLAN}")
    luts = [r for r in rows if r.representation == LUT]
    expected = (int8_bytes + sum(r.bytes - r.weights for r in rows)
                + (plan_costs.DECODE_OPERATOR_BYTES if luts else 0) + dense_bytes)
    if estimate != expected:
        raise fail("estimate_bytes", (
            f"{estimate:,} B, but int8_bytes and the layers' bytes give {expected:,} B "
            f"(smallest possible: min_bytes {minimum:,} B). {_REPLAN}"))
    floor = int8_bytes - all_weights + sum(
        min(r.weights, plan_costs.smallest_layer_bytes(r.weights, 1),
            plan_costs.int4_bytes(r.weights)) for r in rows)
    # Per-tensor Dense kernels drop 4 B per channel beyond the first (a
    # channel has at least 2 weights).
    floor -= 2 * sum(r.weights for r in rows if r.layer_type == "Dense")
    if not floor <= minimum <= min(estimate, int8_bytes):
        raise fail("min_bytes", (
            f"{minimum:,} B must lie between {floor:,} B (every layer at its least "
            f"bytes) and the estimate {estimate:,} B (and int8_bytes). {_REPLAN}"))
    if estimate > budget:
        raise fail("budget_bytes", (
            f"the estimate {estimate:,} B exceeds the budget {budget:,} B. {_REPLAN}"))

    device_fields = _check_target(fail, data, rows, budget, estimate, int8_bytes)
    with_code = data.get("budget_includes_code", False)
    if not isinstance(with_code, bool):
        raise fail("budget_includes_code", f"must be true or false, got {with_code!r}.")
    if with_code and not device_fields:
        raise fail("budget_includes_code", "true without a target: the code counted "
                                           "is a target's. " + _REPLAN)
    plan = cls(budget_bytes=budget, estimate_bytes=estimate, int8_bytes=int8_bytes,
               min_bytes=minimum, layers=rows, fisher=fisher,
               weight_quantization=quantization, dense_per_tensor_bytes=dense_bytes,
               budget_includes_code=with_code, **device_fields)
    if plan.counted_bytes > budget:
        raise fail("budget_bytes", (
            f"the estimate {estimate:,} B and DECODE's {plan.decode_code_bytes:,} B of "
            f"code exceed the budget {budget:,} B, which counts both. {_REPLAN}"))
    # Written for readers; loading derives them from the layers, so an
    # edited copy would be ignored: refuse it instead.
    written = data.get("quantize_options")
    derived = plan.quantize_options()
    if schema == 1:
        derived.pop("expected_weights")
    if written is not None and written != derived:
        raise fail("quantize_options", (
            f"{written!r} is not what the layers give ({derived!r}); it is derived "
            "from `layers`, which is what loads."))
    written = data.get("export_options")
    if written is not None and written != plan.export_options():
        raise fail("export_options", (
            f"{written!r}: the estimate assumes {plan.export_options()!r}, "
            "the export's own options."))
    return plan


def _number(fail, field, value, positive=False):
    """A finite real >= 0 (> 0 with `positive`), as a float."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not np.isfinite(value) or value < 0 or (positive and value == 0)):
        raise fail(field, f"must be a finite number {'>' if positive else '>='} 0, "
                          f"got {value!r}.")
    return float(value)


def _check_decode(fail, where, path, instructions, bits):
    """A LUT row's decode path and instructions; returns the latter."""
    if bits is None:
        raise fail(f"{where}.decode_path", f"must be null for a layer without "
                                           f"DECODE (int8 or int4), got {path!r}.")
    fast = firmware.decode_path(bits)
    allowed = sorted({fast, "width_any"})
    parts = path.split("+") if isinstance(path, str) else [None]
    if not all(p in allowed for p in parts) or len(set(parts)) != len(parts):
        raise fail(f"{where}.decode_path", (
            f"{path!r} is not a DECODE path of {bits}-bit tables: {allowed} (joined "
            "with '+' where the layer's tensors differ). " + _REPLAN))
    if (isinstance(instructions, bool) or not isinstance(instructions, numbers.Real)
            or not np.isfinite(instructions) or instructions <= 0):
        raise fail(f"{where}.decode_instructions",
                   f"must be a finite number > 0, got {instructions!r}.")
    return float(instructions)


def _check_target(fail, data, rows, budget, estimate, int8_bytes):
    """The target fields of a plan's data, checked against its numbers.

    Returns:
        The `Plan` keyword arguments of the target fields.
    """
    name = data.get("target")
    compressed = any(r.representation == LUT for r in rows)
    if name is None:
        given = [k for k in _TARGET_FIELDS[1:] + _DEVICE_FIELDS
                 if data.get(k) is not None
                 and not (k == "target_profile" and data[k] is False)]
        if given:
            raise fail(given[0], f"{data[given[0]]!r} without a target: a plan "
                                 "without one has null here. " + _REPLAN)
        decoded = [r.layer for r in rows if r.decode_path is not None
                   or r.int4_instructions is not None or r.arena_bytes is not None]
        if decoded:
            raise fail("target", f"null, but layers {decoded} have device costs (a "
                                 "decode path, int4 instructions or arena): a plan "
                                 "without a target has none. " + _REPLAN)
        return {}
    if not isinstance(name, str) or not name:
        raise fail("target", f"must be a target name or null, got {name!r}.")
    profile = data.get("target_profile", False)
    if not isinstance(profile, bool):
        raise fail("target_profile", f"must be true or false, got {profile!r}.")
    code = data.get("decode_code_bytes")
    if isinstance(code, bool) or not isinstance(code, numbers.Integral) or code < 0:
        raise fail("decode_code_bytes", f"must be the bytes of DECODE's code on "
                                        f"{name!r} (a whole number >= 0), got {code!r}.")
    if profile:
        shipped = targets.PROFILES.get(name)
        if shipped is None:
            raise fail("target_profile", (
                f"true, but {name!r} is not a shipped profile "
                f"({sorted(targets.PROFILES)}): a custom target has false here."))
        if code != shipped.decode_code_cost:
            raise fail("decode_code_bytes", (
                f"{code:,} B, but profile {name!r} counts {shipped.decode_code_cost:,} B "
                f"of DECODE code. {_REPLAN}"))
    missing = [r.layer for r in rows if r.representation == LUT and r.decode_path is None]
    if missing:
        raise fail("target", f"{name!r}, but LUT layers {missing} have no "
                             f"decode path. {_REPLAN}")
    change = data.get("flash_change")
    expected = estimate - int8_bytes + (int(code) if compressed else 0)
    if (isinstance(change, bool) or not isinstance(change, numbers.Integral)
            or change != expected):
        raise fail("flash_change", (
            f"{change!r}, but the file change {estimate - int8_bytes:+,} B"
            + (f" and DECODE's {int(code):,} B of code" if compressed else "")
            + f" give {expected:+,} B. {_REPLAN}"))
    if compressed and change >= 0 and budget >= int8_bytes:
        raise fail("flash_change", (
            f"{change:+,} B: a plan for a target compresses only when that saves "
            f"firmware, or when the budget ({budget:,} B) is below the int8 file "
            f"({int8_bytes:,} B). {_REPLAN}"))
    fields = {"target": name, "target_profile": profile, "decode_code_bytes": int(code),
              "flash_change": int(change)}
    fields.update(_check_device(fail, data, rows))
    return fields


def _check_device(fail, data, rows):
    """Schema 4's device totals and caps, against the layers' figures."""
    given = {k: data.get(k) for k in _DEVICE_FIELDS}
    if all(v is None for v in given.values()):
        late = [r.layer for r in rows if r.int4_instructions is not None
                or r.arena_bytes is not None]
        if late:
            raise fail("int8_instructions", f"null, but layers {late} have device "
                                            "figures. " + _REPLAN)
        return {}
    for key in _DEVICE_FIELDS[:3]:
        if given[key] is None:
            raise fail(key, "missing: a schema 4 plan for a target gives "
                            f"{list(_DEVICE_FIELDS[:3])}. " + _REPLAN)
    total = _number(fail, "int8_instructions", given["int8_instructions"])
    growth = _number(fail, "instructions_growth", given["instructions_growth"])
    arena = given["arena_growth_bytes"]
    if isinstance(arena, bool) or not isinstance(arena, numbers.Integral) or arena < 0:
        raise fail("arena_growth_bytes", f"must be a whole number >= 0, got {arena!r}.")
    absent = [r.layer for r in rows if r.arena_bytes is None
              or (r.representation == INT4 and r.int4_instructions is None)]
    if absent:
        raise fail("layers", f"{absent}: a plan for a target gives each layer's "
                             "arena_bytes (and an int4 layer's int4_instructions). "
                             + _REPLAN)
    added = sum(r.extra_instructions for r in rows)
    share = added / total if total else 0.0
    if not math.isclose(growth, share, rel_tol=1e-6, abs_tol=1e-12):
        raise fail("instructions_growth", (
            f"{growth!r}, but the layers' decode and int4 instructions "
            f"({added:,.0f}) over int8_instructions ({total:,.0f}) give "
            f"{share!r}. {_REPLAN}"))
    largest = max((r.arena_bytes for r in rows), default=0)
    if arena < largest:
        raise fail("arena_growth_bytes", (
            f"{arena:,} B is below the largest layer's arena_bytes ({largest:,} B). "
            + _REPLAN))
    cap = given["max_instructions_growth"]
    if cap is not None:
        cap = check_instructions_cap(cap)
        if growth > cap * (1 + 1e-9):
            raise fail("instructions_growth", f"{growth:.4g} exceeds the plan's cap "
                                              f"max_instructions_growth={cap:.4g}. "
                                              + _REPLAN)
    arena_cap = given["max_arena_growth_bytes"]
    if arena_cap is not None:
        arena_cap = check_arena_cap(arena_cap)
        if arena > arena_cap:
            raise fail("arena_growth_bytes", f"{arena:,} B exceeds the plan's cap "
                                             f"max_arena_growth_bytes={arena_cap:,}. "
                                             + _REPLAN)
    return {"int8_instructions": total, "instructions_growth": growth,
            "arena_growth_bytes": int(arena), "max_instructions_growth": cap,
            "max_arena_growth_bytes": arena_cap}


def check_instructions_cap(value, argument="max_instructions_growth"):
    """A cap on instructions over the int8 model: a fraction >= 0 (0.02 for
    +2 %), else a TypeError/ValueError naming `argument`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{argument} must be a number, the fraction of the int8 model's "
            f"instructions a plan may add (0.02 for +2 %), got {value!r} "
            f"({type(value).__name__}).")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument} must be a finite fraction >= 0 (0.02 for +2 %), "
                         f"got {value!r}.")
    return float(value)


def check_arena_cap(value, argument="max_arena_growth_bytes"):
    """A cap on the arena over the int8 model's: whole bytes >= 0, else a
    TypeError/ValueError naming `argument`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an int number of bytes, got {value!r} "
                        f"({type(value).__name__}).")
    if value < 0:
        raise ValueError(
            f"{argument} must be >= 0 bytes, got {value}: the estimates never put a "
            "plan's arena below the int8 model's.")
    return int(value)


def check_flash_budget(budget_bytes, argument="budget_bytes"):
    """`plan_budget`'s flash budget in bytes: a positive int, else a TypeError/ValueError."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral):
        hint = ""
        if isinstance(budget_bytes, str):
            hint = (" Strings are not parsed here; write 64 * 1024 for 64 KiB "
                    "(the command line accepts '64KiB').")
        elif isinstance(budget_bytes, numbers.Real):
            hint = f" Give whole bytes, e.g. {int(budget_bytes)}."
        raise TypeError(
            f"{argument} must be an int number of bytes (e.g. 65536 for 64 KiB), "
            f"got {budget_bytes!r} ({type(budget_bytes).__name__}).{hint}"
        )
    if budget_bytes <= 0:
        raise ValueError(f"{argument} must be a positive number of bytes, got {budget_bytes}.")
    return int(budget_bytes)


def _check_options(bits, modes):
    bits = list(bits)
    bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, numbers.Integral)
           or not 1 <= b <= MAX_BITS]
    if not bits or bad:
        raise ValueError(
            f"bits must be a non-empty list of index bits in 1..{MAX_BITS} "
            f"(TFLM's LUT decoding), got {bits!r}."
        )
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ValueError(f"modes must be a non-empty list from {MODES}, got {modes!r}.")
    return sorted({int(b) for b in bits}), modes


def _check_data(model, data, labels, loss):
    """`(x, y, loss)` checked against the model's single input."""
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            "model must be a built Sequential or Functional model (keras.Input)."
        )
    if len(model.inputs) != 1:
        raise ValueError(
            f"plan_budget takes models with one input; '{model.name}' has "
            f"{len(model.inputs)}."
        )
    expected = tuple(model.inputs[0].shape[1:])
    try:
        x = np.asarray(data)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"calibration_data must be an array: {e}") from e
    shown = "(N, " + ", ".join("?" if d is None else str(d) for d in expected) + ")"
    if x.ndim != len(expected) + 1 or any(
            d is not None and d != s for d, s in zip(expected, x.shape[1:])):
        raise ValueError(
            f"calibration_data must have shape {shown} for model "
            f"'{model.name}', got {x.shape}: give a batch of inputs (e.g. a "
            "few hundred training examples)."
        )
    if len(x) < 1 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(
            f"calibration_data must hold at least one numeric example, got "
            f"shape {x.shape}, dtype {x.dtype}."
        )
    x = x.astype(np.float32)
    if labels is None:
        return x, None, None
    y = np.asarray(labels)
    if len(y) != len(x):
        raise ValueError(
            f"labels must have one entry per calibration example: {len(y)} "
            f"labels for {len(x)} examples."
        )
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "labels were given but no loss: pass loss= (e.g. "
                "'sparse_categorical_crossentropy') or compile the model."
            )
    _check_labels(model, x, y, loss)
    return x, y, loss


def _check_labels(model, x, y, loss):
    """Labels that `loss` can compare with the model's output, else a ValueError.

    Checked here so that a wrong kind of label is named as such, not as
    whatever Keras or TF raise from inside the Fisher estimate.

    Args:
        model: The Keras model.
        x: Its inputs `(N, ...)`.
        y: The labels `(N, ...)`, an array.
        loss: A Keras loss (name, function or `Loss`).
    """
    import keras

    if y.dtype.kind not in "biuf":
        raise ValueError(
            f"labels must be numbers (class indices or targets), got dtype "
            f"{y.dtype}: map class names to indices 0..K-1 first."
        )
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError("labels hold NaN or infinite values; the Fisher estimate "
                         "would be NaN: drop or fix those examples.")
    try:
        loss_fn = keras.losses.get(loss)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"loss={loss!r} is not a Keras loss: give a name such as "
            f"'sparse_categorical_crossentropy' or a keras.losses.Loss ({e})."
        ) from e
    function = getattr(loss_fn, "fn", loss_fn)  # a LossFunctionWrapper's
    name = getattr(function, "__name__", type(function).__name__)
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) == 1 and len(outputs[0].shape) >= 2:
        output = tuple(outputs[0].shape[1:])
        shown = "(N, " + ", ".join("?" if d is None else str(d) for d in output) + ")"
        classes = output[-1]
        if "sparse_categorical" in name:
            if y.shape[1:] not in (output[:-1], output[:-1] + (1,)):
                hint = (" They look one-hot: pass labels.argmax(-1), or loss="
                        "'categorical_crossentropy'." if y.shape[1:] == output else "")
                raise ValueError(
                    f"labels of shape {y.shape} do not fit loss {name}: it takes "
                    f"class indices, one per output row (shape (N,) for output "
                    f"{shown}).{hint}"
                )
            if np.any(y != np.round(y)):
                raise ValueError(f"labels for {name} must be whole class indices, "
                                 f"got values such as {y[y != np.round(y)][0]}.")
            low, high = y.min(), y.max()
            if classes is not None and (low < 0 or high >= classes):
                raise ValueError(
                    f"labels must be class indices in 0..{classes - 1} for the "
                    f"{classes} outputs of model '{model.name}', got values "
                    f"{low}..{high}."
                )
        elif name == "categorical_crossentropy" and y.shape[1:] != output:
            raise ValueError(
                f"labels of shape {y.shape} do not fit loss {name} on output "
                f"{shown}: it takes one-hot labels of the output's shape. For "
                "class indices use 'sparse_categorical_crossentropy'."
            )
    # Whatever the loss: one evaluation on one example, with the error in
    # the labels' terms.
    try:
        value = np.asarray(loss_fn(y[:1], model(x[:1], training=False)))
    except Exception as e:  # noqa: BLE001 (Keras and TF raise many kinds)
        raise ValueError(
            f"loss {name} cannot compare labels of shape {y.shape}, dtype "
            f"{y.dtype} with the outputs of model '{model.name}': "
            f"{type(e).__name__}: {e}"
        ) from e
    if not np.all(np.isfinite(value)):
        raise ValueError(
            f"loss {name} is not finite on the first label ({value}): check "
            "that the labels and the loss's from_logits fit the model's output."
        )


def plan_budget(
    model,
    budget_bytes,
    calibration_data,
    labels=None,
    loss=None,
    bits=DEFAULT_BITS,
    modes=DEFAULT_MODES,
    batch_size=16,
    max_batches=8,
    kmeans_iterations=8,
    target=None,
    int4=True,
    max_arena_growth_bytes=None,
    max_instructions_growth=None,
    budget_includes_code=False,
):
    """Chooses int8, native int4 or a LUT (bits, dictionary mode) per layer
    for a flash budget.

    Args:
        model: The float Keras model (Sequential or Functional, one input).
        budget_bytes: Flash for the .tflite file, in bytes (an int).
        calibration_data: Inputs, an array `(N,) + input shape`: a few
            batches of training data. The first 64 calibrate the reference
            int8 conversion; the first `batch_size * max_batches` give the
            Fisher estimate.
        labels: Optional targets `(N, ...)` for an empirical Fisher with
            `loss`; without them the outputs' Gauss-Newton diagonal is used
            (no labels needed, but random inputs make it meaningless).
        loss: A Keras loss (name or callable) for `labels`; default the
            compiled model's loss.
        bits: LUT index bits to offer (each in 1..7; K = 2**b). Default 1-4:
            at 5-7 bits int8 rounding often merges dictionary values, and
            the estimate (which counts all K) exceeds the file by > 1 %.
        modes: Dictionary modes to offer, from `"tensor"`, `"scaled"`,
            `"channel"` (per-channel only where a channel has >= K
            weights). Default tensor and channel: a scaled dictionary's
            shared table is counted at 2K entries (rounding noise can
            split its codes), so it rarely pays. int4 takes the tensor and
            channel modes among these.
        batch_size: Examples per gradient of the Fisher estimate.
        max_batches: Gradients averaged.
        kmeans_iterations: Lloyd steps of each choice's trial fit (LUT-Q's
            own initialisation; `quantize_model` runs 20, but the ranking of
            choices is settled after a few).
        target: Optional device (`tflite_export.PROFILES`): a profile name
            such as `"cortex-m4-cmsis-nn"`, or a `Target`. `budget_bytes`
            stays the file's budget (unless `budget_includes_code`); with a
            target the plan also counts the code it adds (DECODE once if any layer is a LUT, 0 when
            `decode_linked`; int4 adds none). It takes a plan without
            DECODE (int8 and int4) whenever one meets the budget and caps,
            else LUTs that save firmware against all int8, and grows the
            firmware only when nothing else meets them (the notes say by
            how much, and why); it breaks ties of sensitivity towards fewer
            instructions, and reports each layer's decode path,
            instructions and arena (see `Choices.plan`).
        int4: Offer TFLM's native int4 weights (True, default): an
            int4-exact dictionary (`constraint="int4"`, K <= 16) per layer
            whose op TFLM runs with int4 filters (CONV_2D and
            DEPTHWISE_CONV_2D per tensor or per channel, FULLY_CONNECTED
            per tensor: then every Dense kernel is exported per tensor).
            Its sensitivity is the int4 grid's own k-means distortion.
        max_arena_growth_bytes: With a target, a cap (an int, bytes >= 0)
            on the arena the plan adds over the int8 model's on the
            target's kernel set: a LUT adds its decoded kernel (while its
            op runs) and DECODE's state; int4 adds the kernels' unpack
            scratch (reference kernels: the filter; CMSIS-NN: only the s4
            depthwise's).
        max_instructions_growth: With a target, a cap on the instructions
            per inference the plan adds over the int8 model's estimate, as
            a fraction (0.02 for +2 %): decoding (per weight, by DECODE
            path) and int4 kernels ((int4_mac_factor - 1) x the per-MAC
            cost x MACs, plus any unpack per weight).
        budget_includes_code: With a target, True makes `budget_bytes` a
            budget for the file plus the code the plan adds (DECODE's,
            once, when any layer is a LUT): what the weights cost the
            firmware's flash. Default False: the file alone.

    Returns:
        A `Plan`: `print(plan)` shows the table; `quantize_model(model,
        **plan)` builds the LUT-Q model; export it with
        `**plan.export_options()`.

    Raises:
        TypeError: `budget_bytes` is not an int (e.g. a float or a string),
            `target` is neither a profile name nor a `Target`, or a cap or
            `int4` of the wrong type (named).
        ValueError: A bad argument (named, an unknown target name too), a
            cap or `budget_includes_code` without a target, a budget below
            the smallest file the choices allow (plus DECODE's code where
            the budget counts it; the message gives that minimum), or caps no plan
            within the budget meets (the message gives the least
            achievable).
    """
    budget = check_flash_budget(budget_bytes)
    profile = targets.get(target)  # an unknown name is refused before any conversion
    _check_caps(profile, max_arena_growth_bytes, max_instructions_growth)
    if not isinstance(int4, (bool, np.bool_)):
        raise TypeError(f"int4 must be True or False, got {int4!r}.")
    _code_counted(profile, budget_includes_code)
    return choices(model, calibration_data, labels=labels, loss=loss, bits=bits,
                   modes=modes, batch_size=batch_size, max_batches=max_batches,
                   kmeans_iterations=kmeans_iterations, int4=bool(int4)).plan(
        budget, target=target, max_arena_growth_bytes=max_arena_growth_bytes,
        max_instructions_growth=max_instructions_growth,
        budget_includes_code=bool(budget_includes_code))


def _code_counted(profile, budget_includes_code):
    """The code bytes a budget counts for a LUT plan: DECODE's on the
    target with `budget_includes_code`, else 0."""
    if not isinstance(budget_includes_code, (bool, np.bool_)):
        raise TypeError(f"budget_includes_code must be True or False, got "
                        f"{budget_includes_code!r}.")
    if not budget_includes_code:
        return 0
    if profile is None:
        raise ValueError("budget_includes_code=True needs a target: the code "
                         "counted is DECODE's on that device (pass target=).")
    return profile.decode_code_cost


def _check_caps(profile, max_arena_growth_bytes, max_instructions_growth):
    """The caps, checked (None where not given); they need a target."""
    arena = (None if max_arena_growth_bytes is None
             else check_arena_cap(max_arena_growth_bytes))
    instructions = (None if max_instructions_growth is None
                    else check_instructions_cap(max_instructions_growth))
    for name, value in (("max_arena_growth_bytes", arena),
                        ("max_instructions_growth", instructions)):
        if value is not None and profile is None:
            raise ValueError(
                f"{name} needs a target (target='cortex-m4-cmsis-nn' or a Target): "
                "the arena and instruction costs are the device's.")
    return arena, instructions


class Offer(typing.NamedTuple):
    """One choice for a layer.

    Attributes:
        bits: Index bits (K = 2**bits), None for int8.
        mode: `"int8"` or a dictionary mode.
        bytes: File bytes of the layer's weights.
        sensitivity: Expected loss increase.
        representation: `"int8"`, `"int4"` or `"lut"` (None: from `mode`).
        dense_per_tensor: None where the choice holds whatever the
            FULLY_CONNECTED weight quantisation; True where it needs
            `"dense_per_tensor"` (an int4 FULLY_CONNECTED layer, or a LUT
            costed so), False where it needs per-channel weights.
    """

    bits: object
    mode: str
    bytes: int
    sensitivity: float
    representation: object = None
    dense_per_tensor: object = None

    @property
    def kind(self):
        if self.representation is not None:
            return self.representation
        return INT8 if self.mode == INT8 else LUT


class _Cost(typing.NamedTuple):
    """An offer's device costs: instructions added per inference, arena its
    op adds while it runs, arena kept for the whole run (DECODE state),
    decoded tensors, DECODE path."""

    instructions: float
    buffer: int
    state: int
    path: object
    decode: object
    int4: object


@dataclasses.dataclass
class Choices:
    """Every layer's choices with their bytes and sensitivities.

    What does not depend on the budget, so that several budgets are planned
    from one measurement (`choices(...).plan(budget)`).

    Attributes:
        byte_model: The `plan_costs.ByteModel`.
        offers: `{layer: [Offer]}` (plain `(bits or None, mode, bytes,
            sensitivity)` tuples are taken as int8 or LUT offers), int8
            first.
        layer_types: `{layer: Keras class name}`.
        bits: The index bits offered.
        modes: The dictionary modes offered.
        fisher: `"labels"` or `"outputs"`.
    """

    byte_model: object
    offers: dict
    layer_types: dict
    bits: list
    modes: list
    fisher: str

    def __post_init__(self):
        self.offers = {name: [Offer(*o) for o in opts]
                       for name, opts in self.offers.items()}

    def without_int4(self):
        """These choices with no native int4 (int8 and LUTs per channel
        only), e.g. to compare a plan with the LUT-only one."""
        offers = {name: [o for o in opts if o.kind != INT4 and not o.dense_per_tensor]
                  for name, opts in self.offers.items()}
        return dataclasses.replace(self, offers=offers)

    @property
    def fixed_bytes(self):
        """File bytes outside the candidate layers' weight tensors."""
        model = self.byte_model
        return model.int8_bytes - sum(model.int8_layer_bytes(n) for n in model.tensors)

    def _scenarios(self):
        """The FULLY_CONNECTED weight quantisations the offers need: per
        channel, and dense per tensor when an offer needs it."""
        needed = any(o.dense_per_tensor for opts in self.offers.values() for o in opts)
        return [False, True] if needed else [False]

    def _allowed(self, dense, lut):
        """`{layer: [offer index]}` under one weight quantisation, with or
        without LUTs."""
        return {name: [i for i, o in enumerate(opts)
                       if o.dense_per_tensor in (None, dense) and (lut or o.kind != LUT)]
                for name, opts in self.offers.items()}

    @property
    def min_bytes(self):
        """The smallest file the offered choices allow."""
        return self.least_budget()

    def least_budget(self, code=0):
        """The smallest budget a plan meets when a LUT plan's budget also
        counts `code` bytes (DECODE's): `min_bytes` when `code` is 0."""
        return self._smallest(code)[0]

    def _smallest(self, code=0):
        """`(bytes, dense, picks)` of the smallest plan, a LUT plan's bytes
        counting `code`."""
        # All int8 (per channel: offer 0) to start with: DECODE's operator
        # bytes can outweigh tiny savings.
        best = (self.byte_model.int8_bytes, False, {n: 0 for n in self.offers})
        for dense in self._scenarios():
            for lut in (False, True):
                allowed = self._allowed(dense, lut)
                picks = {n: min(idx, key=lambda i, n=n: self.offers[n][i].bytes)
                         for n, idx in allowed.items()}
                has_lut = any(self.offers[n][i].kind == LUT for n, i in picks.items())
                size = int(self._estimate(picks)) + (code if has_lut else 0)
                if size < best[0]:
                    best = (size, dense, picks)
        return best

    def _estimate(self, picks):
        """Estimated file of `{layer: offer index}`."""
        chosen = [self.offers[n][i] for n, i in picks.items()]
        lut = any(o.kind == LUT for o in chosen)
        dense = any(o.dense_per_tensor for o in chosen)
        return (self.fixed_bytes + sum(o.bytes for o in chosen)
                + (plan_costs.DECODE_OPERATOR_BYTES if lut else 0)
                + (self.byte_model.dense_per_tensor_bytes if dense else 0))

    def _costs(self, profile):
        """`{layer: [_Cost]}` of every offer on a target (zeros without)."""
        model = self.byte_model
        costs = {}
        for name, opts in self.offers.items():
            facts = model.tensors[name]
            row = []
            for o in opts:
                if profile is None or o.kind == INT8:
                    row.append(_Cost(0.0, 0, 0, None, None, None))
                elif o.kind == LUT:
                    path, count = model.decode_cost(profile, name, o.bits)
                    row.append(_Cost(float(count), sum(f.size for f in facts),
                                     profile.decode_state_bytes * len(facts),
                                     path, float(count), None))
                else:
                    count = sum(f.int4_instructions(profile) for f in facts)
                    scratch = sum(f.int4_scratch.get(
                        profile.kernels, f.size if profile.kernels == "reference" else 0)
                        for f in facts)
                    row.append(_Cost(float(count), int(scratch), 0, None, None,
                                     float(count)))
            costs[name] = row
        return costs

    def plan(self, budget_bytes, target=None, max_arena_growth_bytes=None,
             max_instructions_growth=None, budget_includes_code=False):
        """The least-sensitivity `Plan` whose estimated file fits the budget.

        Per layer: int8, native int4 (where offered) or a LUT. With a
        `target` (a profile name or a `target.Target`):

        - where DECODE costs code (not `decode_linked`), plans without
          DECODE (int8 and int4 layers only) come first: the
          least sensitive of them that meets the budget and caps is taken
          (no DECODE code, no decoded kernel in the arena, no decoding; the
          file change is the flash change). A LUT plan may be more
          accurate at the same file size, but it pays DECODE's code, arena
          and decoding: cap the instructions (`max_instructions_growth`)
          to trade int4's slower kernels for LUTs;
        - when none meets them, the least sensitive plan with LUTs whose
          file saving exceeds the code DECODE adds
          (`Target.decode_code_cost`; a tie counts as a loss, as with
          `export(decode="auto")`), i.e. that saves firmware;
        - only when none of those meets the budget and caps does the plan
          grow the firmware: the least sensitive plan within them, and its
          notes give the growth;
        - among choices of equal sensitivity, the one with fewer added
          instructions (e.g. 2 bits' block path over 1 bit's per-weight
          loop), where the budget allows;
        - each layer's decode path, decode or int4 instructions and arena
          are in the plan, and its totals against the int8 model;
        - with `budget_includes_code`, a plan with LUTs fits when its file
          plus DECODE's code does;
        - `max_arena_growth_bytes` and `max_instructions_growth` cap the
          plan's arena and instructions over the int8 model's (see
          `plan_budget`). The instruction cap is met by a Lagrangian search
          (sensitivity + lambda x instructions, bisected on lambda), the
          arena cap by trying each largest per-op buffer: the plan is
          within both caps, the most accurate such plan found (not always
          the exact optimum).

        Raises:
            TypeError, ValueError: as `plan_budget`.
        """
        budget = check_flash_budget(budget_bytes)
        profile = targets.get(target)
        arena_cap, instructions_cap = _check_caps(
            profile, max_arena_growth_bytes, max_instructions_growth)
        code = _code_counted(profile, budget_includes_code)
        minimum = self.min_bytes
        least = self.least_budget(code)
        if budget < least:
            hint = ""
            if budget < 4096 <= budget * 1024 and budget * 1024 >= least:
                hint = (f" Budgets are in bytes: if you meant {budget} KiB, "
                        f"pass {budget * 1024}.")
            what = (f"the smallest file plus DECODE's code ({code:,} B on "
                    f"{profile.name}) this model can have"
                    if code else "the smallest file this model can have")
            raise ValueError(
                f"budget_bytes={budget:,} is below {what} with bits={self.bits} "
                f"and modes={self.modes}: {least:,} bytes (all int8: "
                f"{self.byte_model.int8_bytes:,} bytes).{hint}"
            )
        int8_file = self.byte_model.int8_bytes
        costs = self._costs(profile)
        int8_instructions = (self.byte_model.int8_instructions(profile)
                             if profile is not None else None)
        solver = _Solver(self, costs, arena_cap,
                         None if instructions_cap is None
                         else instructions_cap * (int8_instructions or 0.0))
        scenarios = self._scenarios()

        def candidates(lut, limit):
            found = []
            for dense in scenarios:
                picks = solver.solve(self._allowed(dense, lut), limit, lut, dense)
                if picks is not None:
                    found.append((dense, picks))
            return found

        if profile is None:
            # Without LUTs too: a LUT scenario's capacity leaves room for
            # DECODE's operator, which an int8/int4-only plan does not need.
            found = candidates(False, budget) + candidates(True, budget)
        else:
            # No DECODE first (when it costs code); then DECODE where it
            # saves firmware against all int8; then whatever meets the
            # budget and caps.
            found = candidates(False, budget)
            if not profile.decode_code_cost:
                found += candidates(True, budget)
            # A LUT plan's file must leave room for the code the budget counts.
            lut_limit = budget - code
            if not found:
                saving = min(lut_limit, int8_file - profile.decode_code_cost - 1)
                found = candidates(True, saving)
            if not found:
                found = candidates(True, lut_limit)
        if not found:
            if arena_cap is None and instructions_cap is None:
                # Only the byte grid's rounding can leave nothing: the
                # smallest plan then fits (checked against the budget above).
                found = [self._smallest(code)[1:]]
            else:
                raise ValueError(solver.impossible(budget, scenarios, profile,
                                                   int8_instructions, code))

        def sensitivity(picks):
            return sum(self.offers[n][i].sensitivity for n, i in picks.items())

        dense, picks = min(found, key=lambda f: sensitivity(f[1]))
        return self._plan(budget, profile, picks, dense, costs, int8_instructions,
                          arena_cap, instructions_cap, minimum, bool(code))

    def _plan(self, budget, profile, picks, dense, costs, int8_instructions,
              arena_cap, instructions_cap, minimum, budget_includes_code):
        rows = []
        for name, index in picks.items():
            o, cost = self.offers[name][index], costs[name][index]
            rows.append(LayerPlan(
                layer=name, layer_type=self.layer_types[name],
                weights=self.byte_model.int8_layer_bytes(name), bits=o.bits,
                mode=o.mode, bytes=int(o.bytes), sensitivity=float(o.sensitivity),
                decode_path=cost.path, decode_instructions=cost.decode,
                representation=o.kind,
                int4_instructions=cost.int4,
                arena_bytes=(None if profile is None
                             else int(cost.buffer + cost.state))))
        estimate = int(self._estimate(picks))
        lut = any(r.representation == LUT for r in rows)
        # Per-tensor Dense kernels where a choice needs them (an int4 Dense
        # layer, or a LUT costed so).
        dense_used = any(self.offers[n][i].dense_per_tensor for n, i in picks.items())
        fields = {"weight_quantization": DENSE_PER_TENSOR if dense_used else "per_channel",
                  "dense_per_tensor_bytes": (self.byte_model.dense_per_tensor_bytes
                                             if dense_used else 0)}
        if profile is not None:
            code = profile.decode_code_cost
            added = sum(r.extra_instructions for r in rows)
            fields.update(
                target=profile.name,
                target_profile=targets.PROFILES.get(profile.name) == profile,
                decode_code_bytes=code,
                flash_change=estimate - self.byte_model.int8_bytes + (code if lut else 0),
                int8_instructions=float(int8_instructions),
                instructions_growth=(added / int8_instructions if int8_instructions
                                     else 0.0),
                arena_growth_bytes=int(_arena(
                    [costs[n][i] for n, i in picks.items()])),
                max_instructions_growth=instructions_cap,
                max_arena_growth_bytes=arena_cap)
        return Plan(budget_bytes=budget, estimate_bytes=estimate,
                    int8_bytes=self.byte_model.int8_bytes, min_bytes=int(minimum),
                    layers=rows, fisher=self.fisher,
                    budget_includes_code=budget_includes_code, **fields)


def _arena(costs):
    """Arena a plan adds: the largest op's buffer (one op runs at a time,
    and each DECODE sits right before its op) plus every DECODE's state."""
    return max((c.buffer for c in costs), default=0) + sum(c.state for c in costs)


class _Solver:
    """The knapsack under a plan's caps (`Choices.plan`)."""

    # Lagrangian bisection steps for the instruction cap.
    STEPS = 24

    def __init__(self, found, costs, arena_cap, instructions_cap):
        self.found = found
        self.costs = costs
        self.arena_cap = arena_cap
        self.instructions_cap = instructions_cap

    def _knapsack(self, allowed, capacity, weight=0.0, by_instructions=False):
        names = list(allowed)
        groups = []
        for name in names:
            group = []
            for i in allowed[name]:
                o, c = self.found.offers[name][i], self.costs[name][i]
                if by_instructions:
                    group.append((o.bytes, c.instructions, o.sensitivity))
                else:
                    group.append((o.bytes, o.sensitivity + weight * c.instructions,
                                  c.instructions))
            groups.append(group)
        picks = knapsack.solve(groups, capacity)
        if picks is None:
            return None
        return {name: allowed[name][p] for name, p in zip(names, picks)}

    def _instructions(self, picks):
        return sum(self.costs[n][i].instructions for n, i in picks.items())

    def _sensitivity(self, picks):
        return sum(self.found.offers[n][i].sensitivity for n, i in picks.items())

    def _capacity(self, limit, lut, dense):
        return (limit - self.found.fixed_bytes
                - (plan_costs.DECODE_OPERATOR_BYTES if lut else 0)
                - (self.found.byte_model.dense_per_tensor_bytes if dense else 0))

    def _within_instructions(self, allowed, capacity):
        """The least-sensitivity picks within the instruction cap, or None."""
        base = self._knapsack(allowed, capacity)
        cap = self.instructions_cap
        if base is None or cap is None or self._instructions(base) <= cap:
            return base
        low = self._knapsack(allowed, capacity, by_instructions=True)
        if self._instructions(low) > cap:
            return None
        best = low
        gap_s = max(self._sensitivity(low) - self._sensitivity(base), 1e-30)
        gap_i = max(self._instructions(base) - self._instructions(low), 1e-30)
        lo, hi = math.log(gap_s / gap_i) - 12.0, math.log(gap_s / gap_i) + 12.0
        for _ in range(self.STEPS):
            mid = 0.5 * (lo + hi)
            picks = self._knapsack(allowed, capacity, weight=math.exp(mid))
            if picks is not None and self._instructions(picks) <= cap:
                if self._sensitivity(picks) < self._sensitivity(best):
                    best = picks
                hi = mid
            else:
                lo = mid
        return self._improve(allowed, capacity, best)

    def _improve(self, allowed, capacity, picks):
        """Single-layer swaps that lower the sensitivity within the bytes and
        the instruction cap, best first, until none does: the Lagrangian
        search only reaches plans on its convex hull (with identical
        layers, one of each choice is never on it)."""
        picks = dict(picks)
        cap = self.instructions_cap
        while True:
            size = sum(self.found.offers[n][i].bytes for n, i in picks.items())
            count = self._instructions(picks)
            best, gain = None, 1e-12
            for name, idx in allowed.items():
                now = self.found.offers[name][picks[name]]
                cost = self.costs[name][picks[name]]
                for i in idx:
                    o, c = self.found.offers[name][i], self.costs[name][i]
                    if (size - now.bytes + o.bytes <= capacity
                            and count - cost.instructions + c.instructions <= cap
                            and now.sensitivity - o.sensitivity > gain):
                        best, gain = (name, i), now.sensitivity - o.sensitivity
            if best is None:
                return picks
            picks[best[0]] = best[1]

    def _thresholds(self, allowed):
        buffers = sorted({self.costs[n][i].buffer for n, idx in allowed.items()
                          for i in idx}, reverse=True)
        return [b for b in buffers if b <= self.arena_cap]

    @staticmethod
    def _below(allowed, costs, threshold):
        return {n: [i for i in idx if costs[n][i].buffer <= threshold]
                for n, idx in allowed.items()}

    def solve(self, allowed, limit, lut, dense):
        """The picks `{layer: offer index}` within `limit` file bytes and the
        caps, or None."""
        capacity = self._capacity(limit, lut, dense)
        if capacity < 0:
            return None
        if self.arena_cap is None:
            return self._within_instructions(allowed, capacity)
        for threshold in self._thresholds(allowed):
            below = self._below(allowed, self.costs, threshold)
            picks = self._within_instructions(below, capacity)
            if picks is None:
                if self._knapsack(below, capacity) is None:
                    return None  # smaller buffers leave even less
                continue
            if _arena([self.costs[n][i] for n, i in picks.items()]) <= self.arena_cap:
                return picks
        return None

    def impossible(self, budget, scenarios, profile, int8_instructions, code=0):
        """The message for caps that no plan within the budget meets: the
        least instructions and arena each achieves alone (a LUT plan's file
        within the budget less `code`, the DECODE code it counts)."""
        least_instructions, least_arena = math.inf, math.inf
        for dense in scenarios:
            for lut in (False, True):
                allowed = self.found._allowed(dense, lut)
                capacity = self._capacity(budget - (code if lut else 0), lut, dense)
                if capacity < 0:
                    continue
                picks = self._knapsack(allowed, capacity, by_instructions=True)
                if picks is not None:
                    least_instructions = min(least_instructions, self._instructions(picks))
                for threshold in sorted({self.costs[n][i].buffer
                                         for n, idx in allowed.items() for i in idx}):
                    below = self._below(allowed, self.costs, threshold)
                    groups = {n: idx for n, idx in below.items()}
                    names = list(groups)
                    state = [[(self.found.offers[n][i].bytes, self.costs[n][i].state,
                               self.found.offers[n][i].sensitivity) for i in groups[n]]
                             for n in names]
                    chosen = knapsack.solve(state, capacity)
                    if chosen is None:
                        continue
                    picks = {n: groups[n][p] for n, p in zip(names, chosen)}
                    least_arena = min(least_arena, _arena(
                        [self.costs[n][i] for n, i in picks.items()]))
        parts = []
        total = int8_instructions or 0.0
        if self.instructions_cap is not None:
            cap = self.instructions_cap / total if total else 0.0
            parts.append(
                f"max_instructions_growth={cap:.4g} (+{cap:.2%} over the int8 model's "
                f"{total:,.0f} instructions): the least a plan within budget_bytes="
                f"{budget:,} adds on {profile.name} is "
                f"{least_instructions / total if total else 0.0:.4g} "
                f"(+{least_instructions / total if total else 0.0:.2%}, "
                f"{least_instructions:,.0f} instructions)")
        if self.arena_cap is not None:
            parts.append(
                f"max_arena_growth_bytes={self.arena_cap:,}: the least arena growth a "
                f"plan within budget_bytes={budget:,} has on {profile.name} "
                f"({profile.kernels} kernels) is {least_arena:,.0f} B")
        met = ((self.instructions_cap is None
                or least_instructions <= self.instructions_cap)
               and (self.arena_cap is None or least_arena <= self.arena_cap))
        text = "no plan meets the caps: " + "; ".join(parts)
        if met:
            text += (". Each cap alone can be met, but no plan found meets both: "
                     "raise one of them")
        else:
            text += ". Raise the cap to at least that, or the budget"
        return text + "."


def choices(
    model,
    calibration_data,
    labels=None,
    loss=None,
    bits=DEFAULT_BITS,
    modes=DEFAULT_MODES,
    batch_size=16,
    max_batches=8,
    kmeans_iterations=8,
    weighting="fisher",
    int4=True,
):
    """Measures every layer's choices: bytes and sensitivity (no budget yet).

    Arguments as `plan_budget`, and `weighting`: `"fisher"` (default), or
    `"none"` for the plain squared error (a baseline for the benchmark).
    Returns a `Choices`; `.plan(budget_bytes)` gives the `Plan` for one
    budget.
    """
    from lutq_tf import registry

    if weighting not in ("fisher", "none"):
        raise ValueError(f"weighting must be 'fisher' or 'none', got {weighting!r}.")
    bits, modes = _check_options(bits, modes)
    x, y, loss = _check_data(model, calibration_data, labels, loss)

    byte_model = plan_costs.measure(model, x[:_CALIBRATION_SAMPLES])
    layers = {layer.name: layer for layer in all_layers(model)}
    kernels = {}
    specs = {}
    for name in byte_model.tensors:
        for spec in registry.quantizable_tensors(layers[name]):
            if spec.attribute == "embeddings":
                continue
            kernels[(name, spec.attribute)] = getattr(layers[name], spec.attribute)
            specs[(name, spec.attribute)] = spec
    if weighting == "fisher":
        fisher = sensitivity_lib.fisher(
            model, kernels, x, y, loss, batch_size=batch_size,
            max_batches=max_batches)
    else:
        fisher = {k: np.ones(v.shape) for k, v in kernels.items()}

    def sensitivity(name, b, mode, representation=LUT, per_tensor=False):
        total = 0.0
        for key in kernels:
            if key[0] != name:
                continue
            array = np.asarray(kernels[key].numpy())
            axes = specs[key].channel_axes
            if mode == INT8:
                total += sensitivity_lib.int8_distortion(array, axes, fisher[key],
                                                         per_tensor)
            elif representation == INT4:
                total += int4_distortion(array, axes, b, mode, fisher[key],
                                         kmeans_iterations)
            else:
                total += sensitivity_lib.kmeans_distortion(
                    array, axes, b, mode, fisher[key], kmeans_iterations)
        return total

    def int4_modes(name):
        return [m for m in byte_model.int4_modes(name) if m in modes] if int4 else []

    # An int4 FULLY_CONNECTED layer needs every Dense kernel per tensor:
    # then each Dense layer's int8 and LUTs are offered twice, costed per
    # channel (dense_per_tensor False) and per tensor (True: one int8 scale,
    # whose rounding counts in int8's sensitivity; one table).
    split = any(byte_model.is_dense(n) and int4_modes(n) for n in byte_model.tensors)
    offers = {}
    for name in byte_model.tensors:
        int8_bytes = byte_model.int8_layer_bytes(name)
        facts = byte_model.tensors[name]
        dense = byte_model.is_dense(name)
        if dense and split:
            offers[name] = [
                Offer(None, INT8, int8_bytes, sensitivity(name, None, INT8), INT8, False),
                Offer(None, INT8, int8_bytes,
                      sensitivity(name, None, INT8, per_tensor=True), INT8, True)]
        else:
            offers[name] = [Offer(None, INT8, int8_bytes, sensitivity(name, None, INT8))]
        for b in bits:
            for mode in modes:
                if not plan_costs.fits(facts, b, mode):
                    continue
                cost = byte_model.layer_bytes(name, b, mode)
                per_tensor = None
                if dense and split and mode == "tensor":
                    per_tensor = _dense_per_tensor_bytes(facts, b)
                if cost is None and per_tensor is None:
                    continue
                value = sensitivity(name, b, mode)
                if cost is not None:
                    offers[name].append(Offer(b, mode, cost, value, LUT,
                                              False if dense and split else None))
                if per_tensor is not None:
                    offers[name].append(Offer(b, mode, per_tensor, value, LUT, True))
        for mode in int4_modes(name):
            b = _int4_bits(facts, mode)
            if b is None:
                continue
            offers[name].append(Offer(
                b, mode, byte_model.int4_layer_bytes(name),
                sensitivity(name, b, mode, INT4), INT4, True if dense else None))
    return Choices(byte_model=byte_model, offers=offers,
                   layer_types={n: type(layers[n]).__name__ for n in offers},
                   bits=bits, modes=modes,
                   fisher=("none" if weighting == "none"
                           else "labels" if y is not None else "outputs"))


def _dense_per_tensor_bytes(tensors, bits):
    """A Dense layer's per-tensor LUT bytes under `DENSE_PER_TENSOR`, or
    None where that does not hold or pay."""
    total = 0
    for facts in tensors:
        cost = facts.dense_per_tensor_lut_bytes(bits)
        if cost is None:
            return None
        total += cost
    return total


def _int4_bits(tensors, mode):
    """The index bits of an int4 dictionary for a layer: 4 (K = 16) where
    each table has >= 16 weights, else the most its tables allow, or None."""
    for b in range(INT4_MAX_BITS, 0, -1):
        if plan_costs.fits(tensors, b, mode):
            return b
    return None


def int4_distortion(array, channel_axes, bits, mode, weights, iterations=20):
    """`1/2 sum F (w - q)^2` of LUT-Q's initial fit of an int4-exact dictionary.

    As `sensitivity.kmeans_distortion`, with the `Int4` constraint's own
    projection (`constraint="int4"`: every table s * k, k in [-8, 7]).

    Args:
        array: float32 kernel.
        channel_axes: Its output-channel axes.
        bits: Index bits (K = 2**bits <= 16).
        mode: `"tensor"` or `"channel"`.
        weights: F, shaped like `array`.
        iterations: Lloyd steps after the quantile seeds.
    """
    import tensorflow as tf

    from lutq_tf.quantizer import LUTQuantizer
    from lutq_tf.registry import channel_matrix

    w = channel_matrix(np.asarray(array, np.float32), channel_axes)
    f = channel_matrix(np.asarray(weights, np.float64), channel_axes)
    quantizer = LUTQuantizer(bits=bits, per_channel=mode == "channel",
                             constraint="int4", init_iterations=iterations)
    shaped = w if mode != "tensor" else w.reshape(-1, 1)
    _, _, q = quantizer.initialize(tf.constant(shaped))
    q = np.asarray(q, np.float64).reshape(w.shape)
    return 0.5 * float(np.sum(f * np.square(w - q)))
