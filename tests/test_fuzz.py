"""Fuzz test: random tiny models through the whole pipeline.

Each seed draws an architecture and LUT-Q settings (`benchmarks.fuzz_models`)
and runs quantize, fit, save/load, strip and an int8 export verified on
TFLM (`benchmarks.fuzz.run_case`). A fixed set of seeds runs in CI; the
script `python -m benchmarks.fuzz --seeds=N` runs many more.
"""

import re

import keras
import numpy as np
import pytest

from benchmarks import fuzz
from benchmarks import fuzz_models
from lutq_tf import registry

# The cheapest set found (seeds 0-399 drawn, candidates timed) that covers
# Sequential and Functional models, every layer type drawn (Dense, Conv1D,
# Conv2D, DepthwiseConv2D, SeparableConv2D, Conv2DTranspose), BN, max and
# average pooling, flatten and global pooling, Add / Concatenate branches
# with and without the identity, every activation, kernels with and without
# bias, every constraint and dictionary mode, pruning, XLA train steps and
# per-layer overrides (per tensor, fewer values, float):
#   11  Functional image: Add[x, 2 x Conv2D] (floated) > Conv2D > AvgPool >
#       Conv2D > flatten; K=2 uniform, per channel
#   54  Functional image: Concatenate[x, Conv2D] > Conv2DTranspose > MaxPool
#       > Concatenate[x, Conv2D] > gap; K=11 none, per tensor
#   104 Sequential sequence: Conv1D > gap; K=16 none, per channel, XLA
#   208 Sequential vector: Dense; K=13 pow2, scaled
#   234 Functional image: Conv2D > BN > SeparableConv2D > AvgPool >
#       DepthwiseConv2D > MaxPool > gap; K=13 uniform, per channel
#   341 Functional vector: Dense > BN; K=9 uniform, per tensor, pruned
# Most of a case's time is XLA compiling each LUT-Q tensor's k-means step
# (at quantize_model, in fit, and again at load); pruned and scaled tensors
# compile the slowest, so few of them here. The script runs the rest.
CI_SEEDS = (11, 35, 54, 59, 104, 208, 234, 341)
# Seeds whose outcome is not "ok", and what it must be: seed 59 draws K=8
# per tensor for a Conv1D of 4 weights; seed 35 a Concatenate of 11 inputs
# (TFLM's CONCATENATION takes at most 10). (Seed 19, K=7 per channel on
# pointwise channels of 4 weights, was refused until quantize_model fell
# back to per tensor for such layers.)
EXPECTED = {
    59: ("refused", r"K=8 dictionary entries exceed the 4 weights"),
    35: ("tflm_unsupported", r"CONCATENATION has 11 inputs.*at most 10"),
}


@pytest.mark.slow
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_pipeline_on_random_model(tmp_path, seed):
    record = fuzz.run_case(seed, str(tmp_path))
    outcome, message = EXPECTED.get(seed, ("ok", ""))
    assert record["outcome"] == outcome, (
        f"{record.get('case')}\nat {record['stage']}: {record['message']}\n"
        f"{record.get('traceback', '')}")
    # A clear refusal names what is wrong (and "ok" has no message).
    assert re.search(message, record["message"]) if message else (
        record["message"] == "")


def test_ci_seeds_cover_every_layer_constraint_and_mode():
    """What the comment above CI_SEEDS claims of the seeds that run through."""
    layers, activations, settings = set(), set(), set()
    for seed in CI_SEEDS:
        if seed in EXPECTED:
            continue
        case = fuzz_models.draw(seed, avoid_refusals=seed % 10 != 9)
        model, options = case.model, case.options
        settings.add(type(model).__name__)
        layers |= {type(layer).__name__ for layer in model.layers}
        activations |= {layer.get_config()["activation"] for layer in model.layers
                        if isinstance(layer, keras.layers.Activation)}
        settings |= {getattr(layer, "use_bias", None) for layer in model.layers} - {None}
        settings.add(options["constraint"])
        settings.add("channel" if options["per_channel"] else
                     "scaled" if options["channel_scales"] else "tensor")
        settings |= {"pruned"} if options["prune_rate"] else set()
        settings |= {"jit_compile"} if case.jit_compile else set()
        for override in (options.get("overrides") or {}).values():
            settings.add("float" if override is None else
                         "fewer values" if "num_values" in override else "per tensor")
        # A branch block whose first branch is the identity: "Add[x, ...]".
        settings |= {"identity branch"} if "[x, " in case.description else set()
    assert layers >= {
        "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D",
        "Conv2DTranspose", "BatchNormalization", "Add", "Concatenate",
        "MaxPooling2D", "AveragePooling2D", "Flatten", "GlobalAveragePooling1D",
        "GlobalAveragePooling2D"}
    assert activations == {"relu", "relu6", "tanh"}
    assert settings == {
        "Sequential", "Functional", True, False, *fuzz_models.CONSTRAINTS,
        *fuzz_models.MODES, "pruned", "jit_compile", "float", "fewer values",
        "per tensor", "identity branch"}


def test_draw_is_deterministic():
    a, b = fuzz_models.draw(3), fuzz_models.draw(3)
    assert a.describe() == b.describe()
    np.testing.assert_array_equal(a.x, b.x)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert fuzz_models.draw(4).describe() != a.describe()


def test_overrides_keep_every_table_at_least_k():
    for seed in range(30):
        case = fuzz_models.draw(seed)
        k = case.options["num_values"]
        overrides = case.options.get("overrides", {})
        for layer in case.model.layers:
            if not registry.is_supported(layer):
                continue
            options = overrides.get(layer.name, {})
            if options is None:
                continue
            per_channel = options.get("per_channel",
                                      case.options["per_channel"])
            sizes = fuzz_models.table_sizes(layer, per_channel)
            assert min(sizes) >= options.get("num_values", k), (
                case.describe(), layer.name)


def test_counts_cover_every_outcome():
    records = [{"outcome": "ok"}, {"outcome": "ok"}, {"outcome": "error"}]
    assert fuzz.counts(records) == {
        "ok": 2, "tflm_unsupported": 0, "refused": 0, "error": 1}
