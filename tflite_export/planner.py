"""`plan_budget`: index bits, dictionary mode or int8 per layer for a flash budget.

    plan = tflite_export.planner.plan_budget(model, 64 * 1024, x, labels=y)
    print(plan)                                    # the plan table
    q = lutq_tf.quantize_model(model, **plan)      # or **plan.quantize_options()
    ... fine-tune q ...
    tflite_export.export(q, "m.tflite", x, **plan.export_options())

Per layer the choices are: K = 2**b for b in `bits` with one dictionary per
tensor, per channel-scaled tensor or per output channel, or int8 (not
LUT-Q). Each choice has a byte cost (`plan_costs`: the exporter's own
accounting, from one reference conversion) and a sensitivity
(`sensitivity`: Fisher-weighted k-means distortion). A multiple-choice
knapsack (`knapsack`) picks the least total sensitivity whose estimated
file fits the budget. The estimate is never below the written file (the
byte model counts every table entry and the exporter's per-tensor
overhead), so the export fits when called with `plan.export_options()`.

With `target=` (a `tflite_export.target` profile name or `Target`) the
budget is still the file's; the plan also counts the code it adds to a
firmware (DECODE once when any layer is compressed, 0 when the firmware
links it anyway) and reports the firmware flash change against the
all-int8 route and each layer's DECODE path and instructions per
inference. When the budget holds the int8 file, it compresses only where
that saves firmware flash; a budget below the int8 file forces
compression, and the plan's notes then say how much the firmware grows.
"""

import dataclasses
import json
import numbers

import numpy as np

from lutq_tf.registry import all_layers
from lutq_tf.text import grid
from tflite_export import device
from tflite_export import knapsack
from tflite_export import plan_costs
from tflite_export import sensitivity as sensitivity_lib
from tflite_export import target as targets
from tflite_export.plan_costs import INT8
from tflite_export.plan_costs import MAX_BITS
from tflite_export.plan_costs import MODES

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
            decode the layer once per inference (`device.decode_instructions`);
            None for int8 or without a target.
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

    @property
    def num_values(self):
        """K, or None for int8."""
        return None if self.bits is None else 2**self.bits

    def options(self):
        """`quantize_model` options of this layer, or None (stays int8)."""
        if self.mode == INT8:
            return None
        if self.mode not in MODES:
            raise ValueError(
                f"layer '{self.layer}': mode {self.mode!r} is not one of "
                f"{MODES + (INT8,)}."
            )
        return {"bits": self.bits, "per_channel": self.mode == "channel",
                "channel_scales": self.mode == "scaled"}


@dataclasses.dataclass
class Plan:
    """Per-layer choices that fit a flash budget.

    Usable as keyword arguments of `lutq_tf.quantize_model`:
    `quantize_model(model, **plan)` quantises exactly the planned layers
    (`layer_names`) with their options (`overrides`); the others stay
    float and export as int8. It also passes each planned layer's weight
    count (`expected_weights`), so a model whose layers differ from the
    planned one's is refused rather than exported above the estimate.

    Attributes:
        budget_bytes: The flash budget for the file.
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
            `decode_code_bytes` when any layer is compressed; else None.
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

        With a shipped profile as target (`target_profile`), also
        `target=<its name>`, so that the export reports on the same device;
        and `decode="always"` when the plan compresses although the firmware
        grows (a budget below the int8 file forces it): `"auto"` would write
        the int8 file, which exceeds the budget. A plan for a custom
        `Target` leaves both out: pass your `Target` to `export` yourself
        (with `decode="always"` when `plan.forced_growth`).
        """
        options = dict(plan_costs.EXPORT_OPTIONS)
        if self.target is not None and self.target_profile:
            options["target"] = self.target
            if self.forced_growth:
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
        """Whether any layer is LUT-compressed (the file has DECODE ops)."""
        return any(row.mode != INT8 for row in self.layers)

    @property
    def file_change(self):
        """The estimated file minus the all-int8 file, in bytes."""
        return self.estimate_bytes - self.int8_bytes

    @property
    def forced_growth(self):
        """With a target: compressed although the firmware does not shrink
        (only a budget below the int8 file makes the planner do that)."""
        return (self.target is not None and self.compressed
                and self.flash_change >= 0)

    @property
    def decode_instructions(self):
        """With a target, the estimated decode instructions per inference."""
        if self.target is None:
            return None
        return float(sum(r.decode_instructions or 0.0 for r in self.layers))

    def notes(self):
        """What the plan means on its target, as lines (none without one)."""
        if self.target is None:
            return []
        code = self.decode_code_bytes
        notes = []
        if not self.compressed:
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
        elif self.forced_growth:
            notes.append(
                f"the firmware grows by {self.flash_change:,} B against the all-int8 "
                f"route on {self.target}: the file shrinks by {-self.file_change:,} B "
                f"but DECODE adds {code:,} B of code. Compressed anyway because the "
                f"file budget {self.budget_bytes:,} B is below the int8 file "
                f"({self.int8_bytes:,} B). Export with decode='always'"
                + (" (in export_options)" if self.target_profile else
                   " and your target")
                + ": decode='auto' would write the int8 file, over the budget.")
        slow = [r.layer for r in self.layers
                if r.decode_path is not None and "width_any" in r.decode_path]
        if slow:
            notes.append(
                f"{', '.join(slow)}: DECODE's per-weight path (~24 instructions per "
                "weight against ~3.4 on the 2-4-bit block paths), which 1-bit "
                "tables and per-channel depthwise kernels always take.")
        return notes

    def table(self):
        """The plan as a text table (layer, K, mode, bytes, sensitivity; with
        a target, each layer's decode path and instructions)."""
        head = ("layer", "type", "weights", "K", "bits", "mode", "bytes",
                "sensitivity")
        rows = [(r.layer, r.layer_type, f"{r.weights:,}",
                 "-" if r.bits is None else str(r.num_values),
                 "8" if r.bits is None else str(r.bits), r.mode,
                 f"{r.bytes:,}", f"{r.sensitivity:.3g}") for r in self.layers]
        right = {2, 3, 4, 6, 7}
        if self.target is not None:
            head += ("decode path", "decode instr.")
            rows = [row + ("-" if r.decode_path is None else r.decode_path,
                           "-" if r.decode_instructions is None
                           else f"{r.decode_instructions:,.0f}")
                    for row, r in zip(rows, self.layers)]
            right |= {9}
        out = [grid(head, rows, right=right)]
        out.append(
            f"estimated file {self.estimate_bytes:,} B of budget "
            f"{self.budget_bytes:,} B ({self.estimate_bytes / self.budget_bytes:.1%}); "
            f"all int8 {self.int8_bytes:,} B; smallest possible {self.min_bytes:,} B; "
            f"total sensitivity {self.sensitivity:.3g} (Fisher from {self.fisher})"
        )
        if self.target is not None:
            code = self.decode_code_bytes if self.compressed else 0
            out.append(
                f"on {self.target}: firmware flash {self.flash_change:+,} B against the "
                f"all-int8 route (file {self.file_change:+,} B, DECODE code {code:+,} B); "
                f"decode {self.decode_instructions:,.0f} instructions per inference"
            )
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
# instructions; 1 and 2 load as plans without a target.
SCHEMA = 3
_PLAN_FIELDS = ("budget_bytes", "estimate_bytes", "int8_bytes", "min_bytes", "layers")
_TARGET_FIELDS = ("target", "target_profile", "decode_code_bytes", "flash_change")
_OPTIONAL_FIELDS = ("schema", "fisher", "quantize_options",
                    "export_options") + _TARGET_FIELDS
_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerPlan))
# The layer fields of schemas 1 and 2.
_OLD_LAYER_FIELDS = _LAYER_FIELDS[:7]
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
    layer_fields = _LAYER_FIELDS if schema >= 3 else _OLD_LAYER_FIELDS
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
        if mode == INT8:
            if bits is not None:
                raise fail(f"{where}.bits", f"must be null for an int8 layer, got {bits!r}.")
        elif (isinstance(bits, bool) or not isinstance(bits, numbers.Integral)
              or not 1 <= bits <= MAX_BITS):
            raise fail(f"{where}.bits", f"must be index bits in 1..{MAX_BITS} "
                                        f"(TFLM's LUT decoding), got {bits!r}.")
        elif 2**bits > weights:
            raise fail(f"{where}.bits", f"K = {2**bits} values for {weights} weights.")
        size = count(f"{where}.bytes", size)
        if mode == INT8 and size != weights:
            raise fail(f"{where}.bytes", f"an int8 layer's bytes are its weights "
                                         f"({weights:,}), got {size:,}.")
        if mode != INT8:
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
                                         if mode != INT8 else None)
        rows.append(LayerPlan(layer=name, layer_type=row["layer_type"],
                              weights=weights, bits=None if bits is None else int(bits),
                              mode=mode, bytes=size, sensitivity=float(sens),
                              decode_path=path, decode_instructions=instructions))

    # The numbers against each other: the estimate is what the layers' bytes
    # give on top of the all-int8 file (`plan_costs.ByteModel.estimate`).
    all_weights = sum(r.weights for r in rows)
    if int8_bytes <= all_weights:
        raise fail("int8_bytes", f"{int8_bytes:,} B cannot hold the layers' "
                                 f"{all_weights:,} int8 weights. {_REPLAN}")
    compressed = [r for r in rows if r.mode != INT8]
    expected = (int8_bytes + sum(r.bytes - r.weights for r in compressed)
                + (plan_costs.DECODE_OPERATOR_BYTES if compressed else 0))
    if estimate != expected:
        raise fail("estimate_bytes", (
            f"{estimate:,} B, but int8_bytes and the layers' bytes give {expected:,} B "
            f"(smallest possible: min_bytes {minimum:,} B). {_REPLAN}"))
    floor = int8_bytes - all_weights + sum(
        min(r.weights, plan_costs.smallest_layer_bytes(r.weights, 1)) for r in rows)
    if not floor <= minimum <= min(estimate, int8_bytes):
        raise fail("min_bytes", (
            f"{minimum:,} B must lie between {floor:,} B (every layer at its least "
            f"bytes) and the estimate {estimate:,} B (and int8_bytes). {_REPLAN}"))
    if estimate > budget:
        raise fail("budget_bytes", (
            f"the estimate {estimate:,} B exceeds the budget {budget:,} B. {_REPLAN}"))

    device_fields = _check_target(fail, data, rows, budget, estimate, int8_bytes)
    plan = cls(budget_bytes=budget, estimate_bytes=estimate, int8_bytes=int8_bytes,
               min_bytes=minimum, layers=rows, fisher=fisher, **device_fields)
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


def _check_decode(fail, where, path, instructions, bits):
    """A compressed row's decode path and instructions; returns the latter."""
    if bits is None:
        raise fail(f"{where}.decode_path", f"must be null for an int8 layer (no "
                                           f"DECODE), got {path!r}.")
    fast = device.decode_path(bits)
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
    compressed = any(r.mode != INT8 for r in rows)
    if name is None:
        given = [k for k in _TARGET_FIELDS[1:] if data.get(k) is not None
                 and not (k == "target_profile" and data[k] is False)]
        if given:
            raise fail(given[0], f"{data[given[0]]!r} without a target: a plan "
                                 "without one has null here. " + _REPLAN)
        decoded = [r.layer for r in rows if r.decode_path is not None]
        if decoded:
            raise fail("target", f"null, but layers {decoded} have a decode path: "
                                 "a plan without a target has none. " + _REPLAN)
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
    missing = [r.layer for r in rows if r.mode != INT8 and r.decode_path is None]
    if missing:
        raise fail("target", f"{name!r}, but compressed layers {missing} have no "
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
    return {"target": name, "target_profile": profile, "decode_code_bytes": int(code),
            "flash_change": int(change)}


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
):
    """Chooses index bits, dictionary mode or int8 per layer for a flash budget.

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
        bits: Index bits to offer (each in 1..7; K = 2**b). Default 1-4:
            at 5-7 bits int8 rounding often merges dictionary values, and
            the estimate (which counts all K) exceeds the file by > 1 %.
        modes: Dictionary modes to offer, from `"tensor"`, `"scaled"`,
            `"channel"` (per-channel only where a channel has >= K
            weights). Default tensor and channel: a scaled dictionary's
            shared table is counted at 2K entries (rounding noise can
            split its codes), so it rarely pays.
        batch_size: Examples per gradient of the Fisher estimate.
        max_batches: Gradients averaged.
        kmeans_iterations: Lloyd steps of each choice's trial fit (LUT-Q's
            own initialisation; `quantize_model` runs 20, but the ranking of
            choices is settled after a few).
        target: Optional device (`tflite_export.target`): a profile name
            such as `"cortex-m4-cmsis-nn"`, or a `Target`. `budget_bytes`
            stays the file's budget; with a target the plan also counts the
            code it adds (DECODE once if any layer is compressed, 0 when
            `decode_linked`), never compresses when that does not save
            firmware flash unless the budget is below the int8 file (then
            the notes say by how much the firmware grows, and why), breaks
            ties of sensitivity towards faster decode paths, and reports
            each layer's decode path and instructions (see `Choices.plan`).

    Returns:
        A `Plan`: `print(plan)` shows the table; `quantize_model(model,
        **plan)` builds the LUT-Q model; export it with
        `**plan.export_options()`.

    Raises:
        TypeError: `budget_bytes` is not an int (e.g. a float or a string),
            or `target` is neither a profile name nor a `Target`.
        ValueError: A bad argument (named, an unknown target name too), or
            a budget below the smallest file the choices allow (the message
            gives that minimum).
    """
    budget = check_flash_budget(budget_bytes)
    targets.get(target)  # an unknown name is refused before any conversion
    return choices(model, calibration_data, labels=labels, loss=loss, bits=bits,
                   modes=modes, batch_size=batch_size, max_batches=max_batches,
                   kmeans_iterations=kmeans_iterations).plan(budget, target=target)


@dataclasses.dataclass
class Choices:
    """Every layer's choices with their bytes and sensitivities.

    What does not depend on the budget, so that several budgets are planned
    from one measurement (`choices(...).plan(budget)`).

    Attributes:
        byte_model: The `plan_costs.ByteModel`.
        offers: `{layer: [(bits or None, mode, bytes, sensitivity)]}`, int8
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

    @property
    def fixed_bytes(self):
        """File bytes outside the candidate layers' weight tensors."""
        model = self.byte_model
        return model.int8_bytes - sum(model.int8_layer_bytes(n) for n in model.tensors)

    @property
    def min_bytes(self):
        """The smallest file the offered choices allow."""
        smallest = {n: min(o, key=lambda c: c[2]) for n, o in self.offers.items()}
        compressed = self.byte_model.estimate(
            {n: (c[0], c[1]) for n, c in smallest.items() if c[1] != INT8})
        # The DECODE operator code can outweigh tiny savings: all int8 is
        # then smaller.
        return min(compressed, self.byte_model.int8_bytes)

    def plan(self, budget_bytes, target=None):
        """The least-sensitivity `Plan` whose estimated file fits the budget.

        With a `target` (a profile name or a `target.Target`):

        - when the budget holds the all-int8 file, a compressed plan is
          chosen only if it saves firmware flash (file saving above the
          code DECODE adds, `Target.decode_code_cost`; a tie counts as a
          loss, as with `export(decode="auto")`) and is more accurate than
          all int8; otherwise the plan is all int8 and its notes say why;
        - a budget below the int8 file can only be met by compressing: the
          plan is the one without a target, and its notes give the firmware
          growth against int8 when DECODE's code outweighs the saving;
        - among choices of equal sensitivity, the one with fewer decode
          instructions (e.g. 2 bits' block path over 1 bit's per-weight
          loop), where the budget allows;
        - each compressed layer's decode path and instructions per
          inference (`device.decode_instructions`) are in the plan.

        Raises:
            TypeError, ValueError: as `plan_budget`.
        """
        budget = check_flash_budget(budget_bytes)
        profile = targets.get(target)
        minimum = self.min_bytes
        if budget < minimum:
            hint = ""
            if budget < 4096 <= budget * 1024 and budget * 1024 >= minimum:
                hint = (f" Budgets are in bytes: if you meant {budget} KiB, "
                        f"pass {budget * 1024}.")
            raise ValueError(
                f"budget_bytes={budget:,} is below the smallest file this model "
                f"can have with bits={self.bits} and modes={self.modes}: "
                f"{minimum:,} bytes (all int8: {self.byte_model.int8_bytes:,} "
                f"bytes).{hint}"
            )
        int8_file = self.byte_model.int8_bytes
        decode = {}  # (layer, bits) -> (path, instructions)
        if profile is not None:
            for name, opts in self.offers.items():
                for b, mode, _, _ in opts:
                    if mode != INT8 and (name, b) not in decode:
                        decode[(name, b)] = self.byte_model.decode_cost(profile, name, b)

        def tie(name, b, mode):
            return 0.0 if mode == INT8 or profile is None else decode[(name, b)][1]

        groups = [[(c[2], c[3], tie(name, c[0], c[1])) for c in opts]
                  for name, opts in self.offers.items()]
        all_int8 = [0] * len(groups)  # each layer's first offer is int8

        def solve(limit):
            # Any compressed layer adds the DECODE operator code once. None
            # when no compressed plan fits `limit`: then all int8 is taken,
            # which fits where this is called (the smallest options fit the
            # budget, checked above, and the grid rounds bytes above each
            # layer's smallest option only; all int8 is the smallest file
            # when no compressed one fits).
            picks = knapsack.solve(
                groups, limit - self.fixed_bytes - plan_costs.DECODE_OPERATOR_BYTES)
            return all_int8 if picks is None else picks

        def sensitivity(picks):
            return sum(opts[p][3] for opts, p in zip(self.offers.values(), picks))

        if profile is None or budget < int8_file:
            picks = solve(budget)
        else:
            # Compressed plans that save firmware against all int8, which fits.
            picks = solve(min(budget, int8_file - profile.decode_code_cost - 1))
            if sensitivity(picks) >= sensitivity(all_int8):
                picks = all_int8
        rows = []
        for (name, opts), pick in zip(self.offers.items(), picks):
            b, mode, cost, sens = opts[pick]
            path, instructions = (None, None) if mode == INT8 or profile is None \
                else decode[(name, b)]
            rows.append(LayerPlan(
                layer=name, layer_type=self.layer_types[name],
                weights=self.byte_model.int8_layer_bytes(name), bits=b,
                mode=mode, bytes=int(cost), sensitivity=float(sens),
                decode_path=path, decode_instructions=instructions))
        compressed = {r.layer: (r.bits, r.mode) for r in rows if r.mode != INT8}
        estimate = int(self.byte_model.estimate(compressed))
        device_fields = {}
        if profile is not None:
            code = profile.decode_code_cost
            device_fields = {
                "target": profile.name,
                "target_profile": targets.PROFILES.get(profile.name) == profile,
                "decode_code_bytes": code,
                "flash_change": estimate - int8_file + (code if compressed else 0),
            }
        return Plan(budget_bytes=budget, estimate_bytes=estimate,
                    int8_bytes=int8_file, min_bytes=int(minimum), layers=rows,
                    fisher=self.fisher, **device_fields)


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

    def sensitivity(name, b, mode):
        total = 0.0
        for key in kernels:
            if key[0] != name:
                continue
            array = np.asarray(kernels[key].numpy())
            axes = specs[key].channel_axes
            if mode == INT8:
                total += sensitivity_lib.int8_distortion(array, axes, fisher[key])
            else:
                total += sensitivity_lib.kmeans_distortion(
                    array, axes, b, mode, fisher[key], kmeans_iterations)
        return total

    offers = {}
    for name in byte_model.tensors:
        int8_bytes = byte_model.int8_layer_bytes(name)
        offers[name] = [(None, INT8, int8_bytes, sensitivity(name, None, INT8))]
        for b in bits:
            for mode in modes:
                if not _fits(byte_model.tensors[name], b, mode):
                    continue
                cost = byte_model.layer_bytes(name, b, mode)
                if cost is not None:
                    offers[name].append((b, mode, cost, sensitivity(name, b, mode)))
    return Choices(byte_model=byte_model, offers=offers,
                   layer_types={n: type(layers[n]).__name__ for n in offers},
                   bits=bits, modes=modes,
                   fisher=("none" if weighting == "none"
                           else "labels" if y is not None else "outputs"))


def _fits(tensors, bits, mode):
    """Whether LUT-Q takes this choice: K <= the weights of each table."""
    k = 2**bits
    for facts in tensors:
        per_table = facts.size // facts.channels if mode == "channel" else facts.size
        if per_table < k:
            return False
    return True
