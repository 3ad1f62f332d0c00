"""What the accuracy-vs-bits benchmark runs: model variants and suites.

A *suite* is one model on one data set with its training budget; a
*variant* is one way of making that model small (float, int8 post-training
quantisation, LUT-Q with some bits / constraint / pruning / tables). Every
variant of a suite starts from the same float model (trained in float, or a
pretrained .h5) and is fine-tuned for the same epochs with the same
optimiser, so the float row is a fair reference.
"""

import dataclasses
import os

# The shared data of the development machine; only used as flag defaults.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model variant.

    Attributes:
        key: short name for `--variants` (e.g. `"lutq4_pc"`).
        label: name in tables and plots.
        options: `lutq_tf.quantize_model` arguments, or None for the float
            model itself.
        export: `"float32"` or `"int8"`.
    """

    key: str
    label: str
    options: object
    export: str


def _lutq(bits, per_channel, constraint="none", prune_rate=0.0):
    from experiments.pipeline import variant_label

    key = {"none": "lutq", "pow2": "pow2_", "uniform": "uniform_"}[constraint]
    key += str(bits)
    if prune_rate:
        key = f"prune{100 * prune_rate:.0f}_{bits}"
    key += "_pc" if per_channel else ""
    options = dict(bits=bits, constraint=constraint, prune_rate=prune_rate,
                   per_channel=per_channel)
    return Variant(key, variant_label(**options), options, "int8")


def all_variants():
    """Float, int8 post-training, then LUT-Q per tensor and per channel."""
    variants = [
        Variant("float", "float", None, "float32"),
        Variant("int8", "float + int8 post-training", None, "int8"),
    ]
    for per_channel in (False, True):
        variants += [_lutq(bits, per_channel) for bits in (1, 2, 3, 4)]
        variants.append(_lutq(4, per_channel, constraint="pow2"))
        variants += [_lutq(4, per_channel, prune_rate=rate)
                     for rate in (0.5, 0.75)]
    return variants


VARIANT_KEYS = tuple(v.key for v in all_variants())

# --quick runs these on MNIST and CIFAR-10 (all of them on digits).
QUICK_VARIANTS = ("float", "int8", "lutq2", "lutq4", "lutq4_pc", "pow2_4",
                  "prune50_4")
QUICK_CIFAR10_VARIANTS = ("float", "int8", "lutq4", "lutq4_pc")


def select_variants(keys):
    """The variants named in `keys` (None: all), in the canonical order.

    Raises:
        ValueError: an unknown key (the message names `--variants`).
    """
    if keys is None:
        return all_variants()
    unknown = sorted(set(keys) - set(VARIANT_KEYS))
    if unknown:
        raise ValueError(
            f"--variants: unknown variant(s) {unknown}; choose from "
            f"{', '.join(VARIANT_KEYS)}.")
    return [v for v in all_variants() if v.key in keys]


@dataclasses.dataclass
class Suite:
    """One model on one data set, with its training budget.

    Attributes:
        name: key (`"digits"`, `"mnist"`, `"cifar10"`).
        title: heading in the results.
        model: `"digits_cnn"`, `"lenet"` or `"resnet8"`.
        data: path of the data (None for the bundled digits).
        pretrained: path of a pretrained .h5 (ResNet-8), else None.
        pretrain_epochs: float epochs from scratch before the variants
            (without `pretrained`).
        epochs: fine-tuning epochs of every variant (float included).
        batch_size: batch size.
        pretrain_learning_rate: Adam learning rate of float pretraining.
        learning_rate: Adam (peak) learning rate of the fine-tuning.
        schedule: `"constant"` or `"cosine"` (decay to 0 over the
            fine-tuning; `benchmarks.recipe.learning_rate`).
        limit: use only this many train and test images (None: all).
        tflm_samples: TFLM runs on this many test images (None: all).
        variants: the `Variant`s to run.
        histogram_layer: the layer whose weights the histogram plot shows.
        histogram_variant: the variant key whose LUT-Q layer is plotted
            (if it is not run: the first LUT-Q variant).
    """

    name: str
    title: str
    model: str
    data: object
    pretrained: object = None
    pretrain_epochs: int = 0
    epochs: int = 1
    batch_size: int = 64
    pretrain_learning_rate: float = 1e-3
    learning_rate: float = 5e-4
    schedule: str = "constant"
    limit: object = None
    tflm_samples: object = None
    variants: list = dataclasses.field(default_factory=all_variants)
    histogram_layer: str = ""
    histogram_variant: str = "lutq4"

    def missing_data(self):
        """Why the suite cannot run (a missing file), or None."""
        for what, path in (("data", self.data),
                           ("pretrained model", self.pretrained)):
            if path is not None and not os.path.exists(path):
                return f"{what} not found: {path}"
        if self.model == "resnet8" and self.pretrained is None:
            return "no pretrained ResNet-8 .h5 given (--resnet8_h5)"
        if self.model != "digits_cnn" and self.data is None:
            return f"no data path given for {self.name}"
        return None

    def fine_tuning_rate(self, num_train):
        """The fine-tuning's Keras learning rate for `num_train` images."""
        from benchmarks.recipe import learning_rate

        steps = self.epochs * -(-num_train // self.batch_size)
        return learning_rate(self.learning_rate, self.schedule, steps)

    def describe(self):
        """One line: data, start, budget."""
        start = (f"pretrained {os.path.basename(self.pretrained)}"
                 if self.pretrained else
                 f"{self.pretrain_epochs} float epochs from scratch")
        size = f", limit {self.limit}" if self.limit else ""
        tflm = (f"TFLM on {self.tflm_samples} test images"
                if self.tflm_samples else "TFLM on the whole test set")
        return (f"{self.model}; start: {start}; every variant fine-tuned "
                f"{self.epochs} epoch(s), Adam lr {self.learning_rate}"
                f"{', cosine decay' if self.schedule == 'cosine' else ''}, "
                f"batch {self.batch_size}{size}; {tflm}")


def default_path(*parts):
    """`../shared/<parts>` if it exists, else None (flag defaults)."""
    path = os.path.join(SHARED, *parts)
    return path if os.path.exists(path) else None


def make_suites(quick, mnist=None, cifar10=None, resnet8_h5=None,
                variant_keys=None, epochs=None, pretrain_epochs=None):
    """The suites of a full or `--quick` run.

    Args:
        quick: the ~10 minute configuration (digits, and MNIST and CIFAR-10
            on subsets with fewer variants) instead of the full one.
        mnist, cifar10, resnet8_h5: data paths (None: missing).
        variant_keys: restrict every suite to these variants.
        epochs, pretrain_epochs: if not None, override every suite's
            fine-tuning and float pretraining epochs (tiny test runs).

    Returns:
        `{name: Suite}` for digits, mnist and cifar10.
    """
    def pick(quick_keys):
        if variant_keys is not None:
            return select_variants(variant_keys)
        return select_variants(quick_keys if quick else None)

    suites = {
        "digits": Suite(
            "digits", "scikit-learn digits, digits_cnn", "digits_cnn", None,
            pretrain_epochs=30, epochs=3 if quick else 10, batch_size=32,
            variants=pick(None), histogram_layer="fc1"),
        "mnist": Suite(
            "mnist", "MNIST, LeNet-5 (20-50-500)", "lenet", mnist,
            pretrain_epochs=2 if quick else 3, epochs=1,
            limit=6000 if quick else None,
            # TFLM runs ~30 s per variant on all 10,000 test images; 2,000
            # keep the suite in budget (Keras accuracy stays on all).
            tflm_samples=1000 if quick else 2000,
            variants=pick(QUICK_VARIANTS), histogram_layer="fc1"),
        "cifar10": Suite(
            "cifar10", "CIFAR-10 (JPEG copy), MLPerf Tiny ResNet-8",
            "resnet8", cifar10, pretrained=resnet8_h5, epochs=1,
            # The recipe's float row: cosine decay from 3e-4, chosen on the
            # validation split (recipe.md; a constant 3e-4 is too high).
            learning_rate=3e-4, schedule="cosine",
            limit=5000 if quick else None,
            tflm_samples=500 if quick else 1000,
            variants=pick(QUICK_CIFAR10_VARIANTS),
            histogram_layer="stack3_conv2"),
    }
    for suite in suites.values():
        if epochs is not None:
            suite.epochs = epochs
        if pretrain_epochs is not None:
            suite.pretrain_epochs = pretrain_epochs
    return suites
