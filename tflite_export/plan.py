"""Command line: plan index bits per layer for a flash budget.

    python -m tflite_export.plan MODEL --budget 64KiB --data x.npy
        [--labels y.npy --loss sparse_categorical_crossentropy]
        [--bits 1,2,3,4] [--modes tensor,channel]
        [--target cortex-m4-cmsis-nn|profile.json
         [--max_instructions_growth 2%] [--max_arena_growth_bytes 4KiB]
         [--budget_includes_code]]
        [--no_int4] [--out plan.json] [--quantized lutq.keras]

MODEL is a float `.keras` or `.h5` file; with `--labels` and no
`--loss`, the loss it was compiled with. Prints the plan table; `--out`
writes the plan as JSON (`tflite_export.Plan.load`), `--quantized`
the LUT-Q model `quantize_model(model, **plan)` ready for fine-tuning.
Export it with `python -m tflite_export ... --weight_quantization
per_channel --shared_tables true` (the plan's `export_options`).

`--target` names a device profile (`tflite_export.PROFILES`) or a
JSON file of one (`json.dump(target.to_dict(), f)`): the budget stays the
file's (with `--budget_includes_code`, the file's plus the code the plan
adds: DECODE's, once, if any layer is a LUT), and the plan also counts
and reports the firmware flash change against the all-int8 route
(DECODE's code once) and each layer's decode path and instructions
(`plan_budget(..., target=...)`). The printed export command passes the
same `--target` (and `--decode always` when a budget below the int8 file
forces a compression that grows the firmware).

Per layer the plan takes int8, native int4 (an int4-exact dictionary, no
DECODE; `--no_int4` offers none) or a LUT; the table prints each layer's
representation. With `--target`, `--max_instructions_growth` caps the
instructions the plan adds over the int8 model (`2%` or `0.02`) and
`--max_arena_growth_bytes` the arena it adds (bytes, or with a unit);
caps no plan meets are an error that gives the least achievable.

Budgets: a number of bytes, or with a unit: `B`, `K`/`KB`/`KiB` (1,024 B,
as in linker scripts), `M`/`MB`/`MiB` (1,048,576 B).
"""

import argparse
import os
import re
import sys
import warnings

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
          "m": 1024**2, "mb": 1024**2, "mib": 1024**2}
# `plan_costs.MAX_BITS` and `MODES`, written out: usage errors are reported
# before TensorFlow is imported (tests check that they agree).
MAX_BITS = 7
MODES = ("tensor", "scaled", "channel")


def parse_budget(text):
    """`"64KiB"` -> 65536; a ValueError naming the accepted forms otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(
            f"--budget={text!r}: give bytes (65536) or a number with a unit "
            "B, K, KB, KiB, M, MB or MiB (64KiB; K = 1024 B)."
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value != int(value) or value <= 0:
        raise ValueError(f"--budget={text!r} is not a positive whole number of bytes.")
    return int(value)


def parse_instructions_cap(text):
    """`"2%"` or `"0.02"` -> 0.02; a ValueError naming the flag otherwise."""
    value = str(text).strip()
    percent = value.endswith("%")
    try:
        number = float(value[:-1] if percent else value)
    except ValueError:
        number = float("nan")
    if not number >= 0 or number == float("inf"):
        raise ValueError(
            f"--max_instructions_growth={text!r}: give the share of the int8 model's "
            "instructions a plan may add, as a percentage (2%) or a fraction (0.02)."
        )
    return number / 100 if percent else number


def parse_arena_cap(text):
    """`"4KiB"` -> 4096, `"0"` -> 0; a ValueError naming the flag otherwise."""
    if str(text).strip() in ("0", "0B", "0b"):
        return 0
    try:
        return parse_budget(text)
    except ValueError:
        raise ValueError(
            f"--max_arena_growth_bytes={text!r}: give bytes >= 0 (4096) or a number "
            "with a unit B, K, KB, KiB, M, MB or MiB (4KiB; K = 1024 B)."
        ) from None


def parse_bits(text):
    """`"1,2,4"` -> [1, 2, 4]; a ValueError naming `--bits` otherwise."""
    parts = [b.strip() for b in str(text).split(",") if b.strip()]
    if not parts or not all(p.isdigit() and 1 <= int(p) <= MAX_BITS for p in parts):
        raise ValueError(
            f"--bits={text!r}: give index bits in 1..{MAX_BITS}, comma "
            "separated (e.g. 1,2,3,4)."
        )
    return [int(p) for p in parts]


def parse_modes(text):
    """`"tensor,channel"` -> a list; a ValueError naming `--modes` otherwise."""
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(
            f"--modes={text!r}: give dictionary modes from {', '.join(MODES)}, "
            "comma separated (e.g. tensor,channel)."
        )
    return modes


def load_array(path, flag):
    """The array in a `.npy` file; a ValueError naming the flag and file otherwise."""
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"{flag}={path}: not a .npy array file ({e}). Save the array "
            "with numpy.save(path, array)."
        ) from e
    if isinstance(array, np.lib.npyio.NpzFile):
        names = list(array.files)
        array.close()
        raise ValueError(
            f"{flag}={path}: an .npz archive (arrays {names}), not one array: "
            "save the one you mean with numpy.save(path, np.load(archive)[name])."
        )
    return array


def read_target(value):
    """`--target`: None, a profile name, or a JSON profile file (a `Target`).

    Raises:
        ValueError, TypeError: An unknown name, or a file that cannot be
            read or holds no valid profile (the message names `--target`,
            the file and the field).
    """
    from tflite_export.device import target as targets  # no TensorFlow

    try:
        return targets.from_flag(value)
    except (ValueError, TypeError) as e:
        text = str(e)
        raise type(e)(text if text.startswith("--target") else f"--target {text}") from None


def _load_model(path, loss_flag, labels_given):
    """The model in `path`, compiled from the file when its loss is needed."""
    import lutq_tf

    if not labels_given or loss_flag:
        return lutq_tf.load_model(path)
    # --labels without --loss: the loss the model was compiled with. The
    # optimizer's saved state is not needed (Keras warns that it skips it).
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
            model = lutq_tf.load_model(path, compile=True)
        problem = "was saved without compile(loss=...)"
    except Exception as e:  # noqa: BLE001 (a custom loss Keras cannot rebuild)
        model = lutq_tf.load_model(path)
        problem = f"has a compiled loss Keras cannot rebuild ({type(e).__name__}: {e})"
    if getattr(model, "loss", None) is None:
        raise ValueError(
            f"--labels needs a loss: {path} {problem}; pass --loss (e.g. "
            "--loss sparse_categorical_crossentropy)."
        )
    return model


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m tflite_export.plan",
        description="Choose int8, native int4 or a LUT (index bits, dictionary "
                    "mode) per layer so that the exported .tflite fits a flash "
                    "budget.")
    parser.add_argument("model", help="float Keras model (.keras or .h5)")
    parser.add_argument("--budget", required=True,
                        help="flash budget: bytes, or e.g. 64KiB (K = 1024 B)")
    parser.add_argument("--data", required=True,
                        help=".npy of calibration inputs, shape (N, ...input shape)")
    parser.add_argument("--labels", help=".npy of labels for --data (empirical Fisher)")
    parser.add_argument("--loss", help="Keras loss name for --labels")
    parser.add_argument("--bits", default="1,2,3,4",
                        help="index bits to offer, comma separated (1..7)")
    parser.add_argument("--modes", default="tensor,channel",
                        help="dictionary modes to offer: tensor, scaled, channel")
    parser.add_argument("--target",
                        help="device profile name (e.g. cortex-m4-cmsis-nn) or a JSON "
                             "profile file: report firmware flash and decode costs")
    parser.add_argument("--max_instructions_growth",
                        help="with --target: cap on the instructions the plan adds over "
                             "the int8 model, e.g. 2%% or 0.02")
    parser.add_argument("--max_arena_growth_bytes",
                        help="with --target: cap on the arena the plan adds over the "
                             "int8 model, bytes or e.g. 4KiB")
    parser.add_argument("--budget_includes_code", action="store_true",
                        help="with --target: the budget counts the file plus the code "
                             "the plan adds (DECODE's, once, if any layer is a LUT)")
    parser.add_argument("--no_int4", action="store_true",
                        help="offer no native int4 layers (int8 and LUTs only)")
    parser.add_argument("--out", help="write the plan as JSON here")
    parser.add_argument("--quantized", help="write the LUT-Q model (.keras) here")
    return parser


def _writable(path, flag):
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(directory):
        raise ValueError(f"{flag}={path!r}: not a file path in an existing directory.")
    return path


def main(argv=None):
    """Runs the command line; returns the exit code (0, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        budget = parse_budget(args.budget)
        bits = parse_bits(args.bits)
        modes = parse_modes(args.modes)
        target = read_target(args.target)
        instructions_cap = arena_cap = None
        if args.max_instructions_growth is not None:
            instructions_cap = parse_instructions_cap(args.max_instructions_growth)
        if args.max_arena_growth_bytes is not None:
            arena_cap = parse_arena_cap(args.max_arena_growth_bytes)
        capped = [flag for flag, value in (
            ("--max_instructions_growth", instructions_cap),
            ("--max_arena_growth_bytes", arena_cap),
            ("--budget_includes_code", args.budget_includes_code or None))
            if value is not None]
        if capped and target is None:
            raise ValueError(f"{capped[0]} needs --target (the costs are the device's).")
        for path, flag in ((args.model, "MODEL"), (args.data, "--data"),
                           (args.labels, "--labels")):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{flag}: no such file: {path}")
        if args.out:
            _writable(args.out, "--out")
        if args.quantized:
            _writable(args.quantized, "--quantized")
            if not args.quantized.endswith(".keras"):
                raise ValueError(f"--quantized={args.quantized!r} must end in .keras.")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import lutq_tf
    from tflite_export.planning import planner

    try:
        data = load_array(args.data, "--data")
        labels = load_array(args.labels, "--labels") if args.labels else None
        model = _load_model(args.model, args.loss, labels is not None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        plan = planner.plan_budget(model, budget, data, labels=labels,
                                   loss=args.loss, bits=bits, modes=modes,
                                   target=target, int4=not args.no_int4,
                                   max_arena_growth_bytes=arena_cap,
                                   max_instructions_growth=instructions_cap,
                                   budget_includes_code=args.budget_includes_code)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(plan.table())
    if args.out:
        plan.save(args.out)
        print(f"plan written to {args.out}")
    if args.quantized:
        lutq_tf.quantize_model(model, **plan).save(args.quantized)
        print(f"LUT-Q model written to {args.quantized}")
    options = plan.export_options()
    if target is not None and not plan.target_profile:
        # A JSON profile: the export CLI reads the same file.
        options["target"] = args.target
        if plan.decode_forced:
            options["decode"] = "always"
    options = " ".join(
        f"--{k} {v if k == 'target' else str(v).lower()}" for k, v in options.items())
    print(f"export with: python -m tflite_export MODEL {options}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
