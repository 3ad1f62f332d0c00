"""The absl flags the examples share, and their checks.

Each example calls `define_flags(...)` once at import, with its own
defaults, defines the flags that are only its own, and starts `main` with
`setup()`. Kept apart from `experiments.pipeline` (which imports TensorFlow) so
that a bad flag fails at once.

    define_flags("out/mnist", bits=2, batch_size=64, float_epochs=3,
                 lutq_epochs=2, data_help="mnist.npz ...")
    ...
    def main(argv):
        setup()
        options = lutq_options()     # bits, constraint, prune_rate, per_channel
"""

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def define_flags(out_dir, bits, batch_size, *, float_epochs=None,
                 lutq_epochs=None, epochs=None, learning_rate=None,
                 lutq_options=True, data_help=None,
                 seed_help="Seed of initialisation and shuffling.",
                 flag_values=FLAGS):
    """Defines the flags every example has, with this example's defaults.

    Always: `--out_dir`, `--bits`, `--per_channel`, `--batch_size`,
    `--seed`. Training schedule, one of:

    - `float_epochs` and `lutq_epochs` given: float training from scratch
      then LUT-Q fine-tuning (`--float_epochs`, `--lutq_epochs`,
      `--learning_rate` for float training, `--lutq_learning_rate`);
    - `epochs` given: a pretrained model fine-tuned in float and with LUT-Q
      for the same `--epochs` at the same `--learning_rate`.

    Args:
        out_dir, bits, batch_size: defaults of those flags.
        float_epochs, lutq_epochs, epochs, learning_rate: the schedule's
            defaults (see above; `learning_rate` defaults to 1e-3).
        lutq_options: also define `--constraint` and `--prune_rate`.
        data_help: if given, define `--data_dir` with this help, and
            `--limit`.
        seed_help: help of `--seed`.
        flag_values: where to define them (tests use their own).
    """
    if (epochs is None) == (float_epochs is None or lutq_epochs is None):
        raise ValueError("define_flags: give either epochs, or float_epochs "
                         "and lutq_epochs.")

    def define(kind, name, default, help_text, **kwargs):
        getattr(flags, f"DEFINE_{kind}")(name, default, help=help_text,
                                         flag_values=flag_values, **kwargs)

    if data_help is not None:
        define("string", "data_dir", None, data_help)
        define("integer", "limit", None,
               "Use only this many train and test images (quick runs).")
    define("string", "out_dir", out_dir,
           "Directory for the .tflite files and table.")
    define("integer", "bits", bits, "LUT-Q index bits (K = 2**bits).")
    if lutq_options:
        define("enum", "constraint", "none", "Dictionary constraint.",
               enum_values=["none", "pow2", "uniform"])
        define("float", "prune_rate", 0.0,
               "Fraction of each table's weights set to exactly 0.")
    define("boolean", "per_channel", False,
           "One dictionary per output channel.")
    if epochs is None:
        define("integer", "float_epochs", float_epochs,
               "Epochs of float training.")
        define("integer", "lutq_epochs", lutq_epochs,
               "Epochs of LUT-Q fine-tuning.")
    else:
        define("integer", "epochs", epochs,
               "Fine-tuning epochs, for the float and the LUT-Q copy.")
    define("integer", "batch_size", batch_size, "Batch size.")
    if epochs is None:
        define("float", "learning_rate", learning_rate or 1e-3,
               "Adam learning rate (float training).")
        define("float", "lutq_learning_rate", 5e-4,
               "Adam learning rate of LUT-Q fine-tuning.")
    else:
        define("float", "learning_rate", learning_rate or 1e-3,
               "Adam learning rate of both fine-tunings.")
    define("integer", "seed", 0, seed_help)


def check_flags(flag_values=FLAGS):
    """Raises `app.UsageError` naming the first shared flag out of range."""
    values = flag_values
    if not 1 <= values.bits <= 7:
        raise app.UsageError(
            f"--bits must be in 1..7 (TFLM indices have 1 to 7 bits), got "
            f"{values.bits}.")
    if "prune_rate" in values and not 0.0 <= values.prune_rate < 1.0:
        raise app.UsageError(
            f"--prune_rate must be in [0, 1), got {values.prune_rate}.")
    for name in ("float_epochs", "lutq_epochs", "epochs"):
        if name in values and values[name].value < 0:
            raise app.UsageError(
                f"--{name} must be >= 0, got {values[name].value}.")
    if values.batch_size < 1:
        raise app.UsageError(
            f"--batch_size must be >= 1, got {values.batch_size}.")
    if "limit" in values and values.limit is not None and values.limit < 1:
        raise app.UsageError(f"--limit must be >= 1, got {values.limit}.")


def setup(own_checks=None):
    """Start of an example's `main`: quiet logging, then the flag checks.

    `own_checks`: a function checking the example's own flags first.
    """
    logging.set_verbosity(logging.ERROR)  # TF/absl chatter drowns the output
    if own_checks is not None:
        own_checks()
    check_flags()


def lutq_options(flag_values=FLAGS):
    """`quantize_model` options from the flags (defaults where undefined)."""
    values = flag_values
    return dict(
        bits=values.bits,
        constraint=values.constraint if "constraint" in values else "none",
        prune_rate=values.prune_rate if "prune_rate" in values else 0.0,
        per_channel=values.per_channel)
