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
"""

import dataclasses
import json
import numbers

import numpy as np

from lutq_tf.text import grid
from tflite_export import knapsack
from tflite_export import plan_costs
from tflite_export import sensitivity as sensitivity_lib
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
    """

    layer: str
    layer_type: str
    weights: int
    bits: object
    mode: str
    bytes: int
    sensitivity: float

    @property
    def num_values(self):
        """K, or None for int8."""
        return None if self.bits is None else 2**self.bits

    def options(self):
        """`quantize_model` options of this layer, or None (stays int8)."""
        if self.mode == INT8:
            return None
        return {"bits": self.bits, "per_channel": self.mode == "channel",
                "channel_scales": self.mode == "scaled"}


@dataclasses.dataclass
class Plan:
    """Per-layer choices that fit a flash budget.

    Usable as keyword arguments of `lutq_tf.quantize_model`:
    `quantize_model(model, **plan)` quantises exactly the planned layers
    (`layer_names`) with their options (`overrides`); the others stay
    float and export as int8.

    Attributes:
        budget_bytes: The flash budget.
        estimate_bytes: The estimated file (never below the written one).
        int8_bytes: The slim file with every layer int8.
        min_bytes: The smallest file the offered choices allow.
        layers: `LayerPlan`s in model order.
        fisher: How the sensitivities were weighted (`"labels"`,
            `"outputs"`).
    """

    budget_bytes: int
    estimate_bytes: int
    int8_bytes: int
    min_bytes: int
    layers: list
    fisher: str = "labels"

    def quantize_options(self):
        """`{"layer_names": [...], "overrides": {...}}` for `quantize_model`."""
        chosen = [row for row in self.layers if row.mode != INT8]
        return {
            "layer_names": [row.layer for row in chosen],
            "overrides": {row.layer: row.options() for row in chosen},
        }

    def export_options(self):
        """Keyword arguments of `tflite_export.export` the estimate assumes."""
        return dict(plan_costs.EXPORT_OPTIONS)

    # A mapping of `quantize_options`, so that `quantize_model(m, **plan)`.
    def keys(self):
        return self.quantize_options().keys()

    def __getitem__(self, key):
        return self.quantize_options()[key]

    @property
    def sensitivity(self):
        return float(sum(row.sensitivity for row in self.layers))

    def table(self):
        """The plan as a text table (layer, K, mode, bytes, sensitivity)."""
        head = ("layer", "type", "weights", "K", "bits", "mode", "bytes",
                "sensitivity")
        rows = [(r.layer, r.layer_type, f"{r.weights:,}",
                 "-" if r.bits is None else str(r.num_values),
                 "8" if r.bits is None else str(r.bits), r.mode,
                 f"{r.bytes:,}", f"{r.sensitivity:.3g}") for r in self.layers]
        out = [grid(head, rows, right={2, 3, 4, 6, 7})]
        out.append(
            f"estimated file {self.estimate_bytes:,} B of budget "
            f"{self.budget_bytes:,} B ({self.estimate_bytes / self.budget_bytes:.1%}); "
            f"all int8 {self.int8_bytes:,} B; smallest possible {self.min_bytes:,} B; "
            f"total sensitivity {self.sensitivity:.3g} (Fisher from {self.fisher})"
        )
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def to_dict(self):
        return {
            "budget_bytes": self.budget_bytes,
            "estimate_bytes": self.estimate_bytes,
            "int8_bytes": self.int8_bytes,
            "min_bytes": self.min_bytes,
            "fisher": self.fisher,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "quantize_options": self.quantize_options(),
            "export_options": self.export_options(),
        }

    @classmethod
    def from_dict(cls, data):
        layers = [LayerPlan(**row) for row in data["layers"]]
        return cls(budget_bytes=data["budget_bytes"],
                   estimate_bytes=data["estimate_bytes"],
                   int8_bytes=data["int8_bytes"], min_bytes=data["min_bytes"],
                   layers=layers, fisher=data.get("fisher", "labels"))

    def save(self, path):
        """Writes the plan as JSON (`Plan.load` reads it back)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


def check_budget(budget_bytes, argument="budget_bytes"):
    """A budget in bytes: a positive int, else a TypeError/ValueError."""
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
    return x, y, loss


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

    Returns:
        A `Plan`: `print(plan)` shows the table; `quantize_model(model,
        **plan)` builds the LUT-Q model; export it with
        `**plan.export_options()`.

    Raises:
        TypeError: `budget_bytes` is not an int (e.g. a float or a string).
        ValueError: A bad argument (named), or a budget below the smallest
            file the choices allow (the message gives that minimum).
    """
    budget = check_budget(budget_bytes)
    return choices(model, calibration_data, labels=labels, loss=loss, bits=bits,
                   modes=modes, batch_size=batch_size, max_batches=max_batches,
                   kmeans_iterations=kmeans_iterations).plan(budget)


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
        return self.byte_model.estimate(
            {n: (c[0], c[1]) for n, c in smallest.items() if c[1] != INT8})

    def plan(self, budget_bytes):
        """The least-sensitivity `Plan` whose estimated file fits the budget.

        Raises:
            TypeError, ValueError: as `plan_budget`.
        """
        budget = check_budget(budget_bytes)
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
        groups = [[(c[2], c[3]) for c in opts] for opts in self.offers.values()]
        # Any compressed layer adds the DECODE operator code once. Never
        # None but when only all-int8 fits: the smallest options fit
        # (checked above) and the grid rounds bytes above each layer's
        # smallest option only.
        picks = knapsack.solve(
            groups, budget - self.fixed_bytes - plan_costs.DECODE_OPERATOR_BYTES)
        if picks is None:
            picks = [0] * len(groups)  # each layer's first offer is int8
        rows = []
        for (name, opts), pick in zip(self.offers.items(), picks):
            b, mode, cost, sens = opts[pick]
            rows.append(LayerPlan(
                layer=name, layer_type=self.layer_types[name],
                weights=self.byte_model.int8_layer_bytes(name), bits=b,
                mode=mode, bytes=int(cost), sensitivity=float(sens)))
        estimate = self.byte_model.estimate(
            {r.layer: (r.bits, r.mode) for r in rows if r.mode != INT8})
        return Plan(budget_bytes=budget, estimate_bytes=int(estimate),
                    int8_bytes=self.byte_model.int8_bytes,
                    min_bytes=int(minimum), layers=rows, fisher=self.fisher)


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
    layers = {layer.name: layer for layer in model._flatten_layers(
        include_self=False, recursive=True)}
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
