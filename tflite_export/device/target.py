"""Device profiles: what a firmware build pays for the parts an export adds.

A `Target` holds the costs that decide whether a compressed export beats the
int8 one on a microcontroller: the DECODE kernel's code, the instructions
each DECODE path spends per weight, the instructions per MAC of the int8
kernels (to put decoding in proportion) and the code of ops a split adds.

    target = tflite_export.PROFILES["cortex-m4-cmsis-nn"]
    mine = dataclasses.replace(target, name="my-board", decode_code_bytes=19_800)

Every figure of the shipped profiles was measured outside this project, on
firmware built from TFLM's source (see `PROVENANCE`); measure your own build
and pass a profile of your own where it differs.
"""

import dataclasses
import json
import math
import os

# Where the shipped figures come from. They were measured on firmware, not
# here: nothing in this project builds TFLM.
PROVENANCE = (
    "TFLM upstream main 90b983c2 (2026-08-20) built for Cortex-M4 with "
    "gcc-arm-none-eabi 12.2 and TFLM's cortex_m_qemu flags (-Os core, -O2 "
    "kernels), run in qemu-system-arm 7.2 (mps2-an386), instructions counted "
    "per Invoke() by a TCG plugin; code as the firmware's text+data change "
    "(lutq-tf issue 22)"
)

KERNEL_SETS = ("reference", "cmsis-nn")

# DECODE's LUT paths (TFLM kernels/decode_state_lut.cc): int8 output at 2, 3
# or 4 bits off the alternate axis takes a block path; everything else, 1-bit
# tables and per-channel depthwise kernels included, the per-weight loop.
DECODE_PATHS = ("width4_16", "width3_32", "width2_16", "width_any")

# Ops whose MACs the int8 instruction estimate counts.
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


@dataclasses.dataclass(frozen=True)
class DecodePathCost:
    """Instructions one DECODE path spends.

    A block path decodes `block` weights at a time from aligned indices; the
    weights of a channel before the first aligned block and after the last
    full one go through its per-weight loop.

    Attributes:
        block: Weights per block (16 or 32), or 0 for a per-weight path.
        per_block: Instructions per full block (0 without blocks).
        per_weight: Instructions per weight outside full blocks.
        per_channel: Instructions per channel (the loop's set-up).
    """

    block: int
    per_block: float
    per_weight: float
    per_channel: float

    def __post_init__(self):
        _check_int(f"{type(self).__name__}.block", self.block)
        if self.block not in (0, 16, 32):
            raise ValueError(
                f"DecodePathCost.block must be 0, 16 or 32 (weights per block), "
                f"got {self.block}."
            )
        for field in ("per_block", "per_weight", "per_channel"):
            _check_cost(f"DecodePathCost.{field}", getattr(self, field))


@dataclasses.dataclass(frozen=True)
class Target:
    """What a firmware build pays for an export.

    Attributes:
        name: A short name for reports.
        kernels: The kernel set, `"reference"` or `"cmsis-nn"`.
        decode_code_bytes: Flash (text+data) that linking and registering
            DECODE adds to a firmware.
        decode_linked: Whether the firmware links DECODE anyway (then an
            export's DECODE ops cost no code).
        decode_tensor_instructions: Instructions per decoded tensor per
            inference, beyond its paths' per-weight and per-channel costs.
        decode_paths: `{path: DecodePathCost}` for every name in
            `DECODE_PATHS`.
        mac_instructions: `{op: instructions per MAC}` of the int8 kernels,
            for every name in `MAC_OPS`.
        op_code_bytes: `{op: bytes}`, flash an op adds when the int8 model
            does not use it already (e.g. `"CONCATENATION"` for splits).
        decode_state_bytes: Arena bytes each DECODE op keeps (node, eval
            tensors, decode state).
        int4_mac_factor: `{op: factor}` for every name in `MAC_OPS`: the
            instructions per MAC of the op's int4-filter kernel over its int8
            kernel's (1 where the kernel set unpacks int4 to int8 first).
        int4_unpack_instructions: Instructions per int4 weight per inference
            to unpack it to int8 (reference kernels; 0 for packed kernels).
        provenance: Where the figures come from.
    """

    name: str
    kernels: str
    decode_code_bytes: int
    decode_linked: bool
    decode_tensor_instructions: float
    decode_paths: dict
    mac_instructions: dict
    op_code_bytes: dict
    decode_state_bytes: int
    int4_mac_factor: dict
    int4_unpack_instructions: float
    provenance: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Target.name must be a non-empty string, got {self.name!r}.")
        if self.kernels not in KERNEL_SETS:
            raise ValueError(
                f"Target.kernels must be one of {KERNEL_SETS}, got {self.kernels!r}."
            )
        _check_int("Target.decode_code_bytes", self.decode_code_bytes)
        _check_int("Target.decode_state_bytes", self.decode_state_bytes)
        if not isinstance(self.decode_linked, bool):
            raise TypeError(
                f"Target.decode_linked must be True or False, got {self.decode_linked!r}."
            )
        _check_cost("Target.decode_tensor_instructions", self.decode_tensor_instructions)
        _check_keys("Target.decode_paths", self.decode_paths, DECODE_PATHS)
        for path, cost in self.decode_paths.items():
            if not isinstance(cost, DecodePathCost):
                raise TypeError(
                    f"Target.decode_paths[{path!r}] must be a DecodePathCost, "
                    f"got {type(cost).__name__}."
                )
        _check_keys("Target.mac_instructions", self.mac_instructions, MAC_OPS)
        for op, cost in self.mac_instructions.items():
            _check_cost(f"Target.mac_instructions[{op!r}]", cost)
        _check_keys("Target.int4_mac_factor", self.int4_mac_factor, MAC_OPS)
        for op, factor in self.int4_mac_factor.items():
            _check_cost(f"Target.int4_mac_factor[{op!r}]", factor)
        _check_cost("Target.int4_unpack_instructions", self.int4_unpack_instructions)
        if not isinstance(self.op_code_bytes, dict):
            raise TypeError("Target.op_code_bytes must be a dict {op name: bytes}.")
        for op, size in self.op_code_bytes.items():
            if not isinstance(op, str):
                raise TypeError(f"Target.op_code_bytes keys are op names, got {op!r}.")
            _check_int(f"Target.op_code_bytes[{op!r}]", size)

    @property
    def decode_code_cost(self):
        """Flash the first DECODE op adds: 0 when the firmware links it anyway."""
        return 0 if self.decode_linked else self.decode_code_bytes

    def to_dict(self):
        """The profile as JSON-ready data (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, source="target"):
        """A `Target` from `to_dict`'s data.

        Args:
            data: A dict with every field of `Target`.
            source: What the data came from (a file name), for errors.
        """
        if not isinstance(data, dict):
            raise TypeError(
                f"{source}: a target profile is a JSON object, got {type(data).__name__}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown = sorted(set(data) - fields)
        missing = sorted(required - set(data))
        if unknown or missing:
            raise ValueError(
                f"{source}: a target profile has the fields {sorted(fields)}; "
                + (f"unknown: {unknown}. " if unknown else "")
                + (f"missing: {missing}." if missing else "")
            )
        data = dict(data)
        paths = data["decode_paths"]
        if not isinstance(paths, dict):
            raise TypeError(f"{source}: decode_paths must be an object {{path: costs}}.")
        converted = {}
        for path, cost in paths.items():
            if not isinstance(cost, dict):
                raise TypeError(f"{source}: decode_paths[{path!r}] must be an object.")
            try:
                converted[path] = DecodePathCost(**cost)
            except TypeError as error:
                raise TypeError(
                    f"{source}: decode_paths[{path!r}] takes block, per_block, "
                    f"per_weight and per_channel ({error})."
                ) from None
            except ValueError as error:
                raise ValueError(f"{source}: decode_paths[{path!r}]: {error}") from None
        data["decode_paths"] = converted
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{source}: {error}") from None


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer (bytes), got {value!r}.")


def _check_cost(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}.")


def _check_keys(name, mapping, names):
    if not isinstance(mapping, dict):
        raise TypeError(f"{name} must be a dict with the keys {list(names)}.")
    missing = [key for key in names if key not in mapping]
    unknown = [key for key in mapping if key not in names]
    if missing or unknown:
        raise ValueError(
            f"{name} needs exactly the keys {list(names)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
            + "."
        )


# DECODE's per-path costs are the same for both kernel sets (the decode code
# is identical). Block paths: 54 instructions per 16 weights (4 and 2 bits),
# 126 per 32 (3 bits); leftover weights ~13.7 (4 bits) or ~17 (2 and 3 bits);
# ~30 per channel (not measured separately at 3 bits: the 2- and 4-bit
# figure). The per-weight loop: 21-24 per weight, the upper end kept.
_DECODE_PATHS = {
    "width4_16": DecodePathCost(block=16, per_block=54, per_weight=13.7, per_channel=30),
    "width3_32": DecodePathCost(block=32, per_block=126, per_weight=17, per_channel=30),
    "width2_16": DecodePathCost(block=16, per_block=54, per_weight=17, per_channel=30),
    "width_any": DecodePathCost(block=0, per_block=0, per_weight=24, per_channel=0),
}

# DECODE linked and registered: the firmware grew by 21,384-21,472 B beyond
# the file change on four models.
_DECODE_CODE_BYTES = 21_408
# DECODE trimmed to its int8 paths (2-, 3-, 4-bit blocks, WidthAny<int8>,
# Setup, decode.cc): ~6 KB, read off the full build's link map, which takes
# a source change on the user's side.
_DECODE_INT8_CODE_BYTES = 6_144
# TFLM's reference CONCATENATION kernel, linked for splits.
_CONCATENATION_CODE_BYTES = 4_200


def _cortex_m4(name, kernels, mac_instructions, decode_code_bytes, note=""):
    cmsis_nn = kernels == "cmsis-nn"
    return Target(
        name=name,
        kernels=kernels,
        int4_mac_factor=dict(_CMSIS_NN_INT4 if cmsis_nn else _UNPACKED_INT4),
        int4_unpack_instructions=0 if cmsis_nn else _INT4_UNPACK_INSTRUCTIONS,
        decode_code_bytes=decode_code_bytes,
        decode_linked=False,
        decode_tensor_instructions=100,
        decode_paths=dict(_DECODE_PATHS),
        mac_instructions=mac_instructions,
        op_code_bytes={"CONCATENATION": _CONCATENATION_CODE_BYTES},
        # 198 B on the x86 wheel (64-bit pointers); the device's is smaller.
        decode_state_bytes=200,
        provenance=PROVENANCE + note,
    )


# int8 kernels, instructions per MAC (midpoints of the measured ranges:
# CMSIS-NN conv 2.1-2.2, FC 2.2-3.0; reference conv 8.0-12.2, FC 6.2-6.7).
_CMSIS_NN_MACS = {
    "CONV_2D": 2.15,
    "DEPTHWISE_CONV_2D": 7.7,
    "FULLY_CONNECTED": 2.6,
    "TRANSPOSE_CONV": 2.15,
}
_REFERENCE_MACS = {
    "CONV_2D": 10.1,
    "DEPTHWISE_CONV_2D": 38.8,
    "FULLY_CONNECTED": 6.45,
    "TRANSPOSE_CONV": 10.1,
}

# int4 filters. CMSIS-NN runs s4 kernels packed, at 1.7-2.4x the s8
# instructions per MAC; per op, what whole models measured (issue 23): FC
# 2.3x (AD, +130 %), conv 1.75x (ResNet-8, +73.8 %), depthwise the range's
# low end (not measured alone). Reference kernels unpack each int4 filter
# into an int8 scratch buffer at every Eval (~4.5 instructions per weight),
# then run the int8 kernel.
_CMSIS_NN_INT4 = {
    "CONV_2D": 1.75,
    "DEPTHWISE_CONV_2D": 1.7,
    "FULLY_CONNECTED": 2.3,
    "TRANSPOSE_CONV": 1.75,
}
_UNPACKED_INT4 = {op: 1.0 for op in MAC_OPS}
_INT4_UNPACK_INSTRUCTIONS = 4.5

PROFILES = {
    "cortex-m4-ref": _cortex_m4("cortex-m4-ref", "reference", _REFERENCE_MACS, _DECODE_CODE_BYTES),
    "cortex-m4-cmsis-nn": _cortex_m4(
        "cortex-m4-cmsis-nn", "cmsis-nn", _CMSIS_NN_MACS, _DECODE_CODE_BYTES
    ),
    "cortex-m4-cmsis-nn-decode-int8": _cortex_m4(
        "cortex-m4-cmsis-nn-decode-int8",
        "cmsis-nn",
        _CMSIS_NN_MACS,
        _DECODE_INT8_CODE_BYTES,
        note="; DECODE trimmed to its int8 paths (estimated from the link map)",
    ),
}
DEFAULT = "cortex-m4-cmsis-nn"


def get(target):
    """The `Target` a `target=` argument names.

    Args:
        target: A profile name (a key of `PROFILES`), a `Target`, or None.

    Returns:
        A `Target`, or None for None.
    """
    if target is None or isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target in PROFILES:
            return PROFILES[target]
        raise ValueError(
            f"target={target!r} is not a known profile: use one of "
            f"{sorted(PROFILES)}, or pass a tflite_export.Target with your "
            f"firmware's own figures."
        )
    raise TypeError(
        f"target must be a profile name ({sorted(PROFILES)}) or a "
        f"tflite_export.Target (Target.from_dict reads a dict, "
        f"tflite_export.device.target.load a JSON file), got {type(target).__name__}."
    )


def from_flag(value):
    """A `--target` flag's value: None, a profile name, or a JSON profile file.

    Returns:
        None, or a `Target`.

    Raises:
        ValueError, TypeError: An unknown name, or a file that cannot be
            read or holds no valid profile (the message names the file and
            the field).
    """
    if value is None:
        return None
    if value in PROFILES:
        return PROFILES[value]
    if value.endswith(".json") or os.path.isfile(value):
        if not os.path.isfile(value):
            raise ValueError(f"--target {value}: no such file.")
        return load(value)
    raise ValueError(
        f"--target {value!r} is neither a profile ({', '.join(sorted(PROFILES))}) "
        "nor a JSON profile file (json.dump(target.to_dict(), f))."
    )


def load(path):
    """A `Target` from a JSON file holding `Target.to_dict()`'s data.

    Write one with `json.dump(target.to_dict(), f)`, e.g. a shipped profile
    with your firmware's own figures.

    Args:
        path: The JSON file.

    Raises:
        ValueError: The file cannot be read, is not JSON, or a field is
            missing, unknown or invalid (the message names the file and
            the field).
        TypeError: A field has the wrong type (named likewise).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as error:
        raise ValueError(
            f"{path}: cannot read the target profile ({error.strerror or error})."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a JSON target profile ({error}); write one with "
            "json.dump(target.to_dict(), f)."
        ) from None
    return Target.from_dict(data, source=str(path))
