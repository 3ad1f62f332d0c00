"""`export`: a LUT-Q Keras model to a LUT-compressed .tflite file for TFLM.

The face of the export: argument checks, the device verdict, the report
and the files written. The pipeline underneath (convert, lay out tables,
compress, slim, measure, verify) is `build`; `ram_budget` builds under a
decode limit or an arena budget with it.
"""

import dataclasses
import numbers
import os
import warnings

import keras
import numpy as np

from tflite_export.device import anatomy
from tflite_export.device import firmware
from tflite_export.device import resolver
from tflite_export.device import target as targets
from tflite_export.pipeline import build
from tflite_export.pipeline import c_array as c_array_lib
from tflite_export.pipeline import convert
from tflite_export.pipeline import int4 as int4_lib
from tflite_export.pipeline import lut_tensors
from tflite_export.pipeline import tempfiles
from tflite_export.pipeline import tflm
from tflite_export.pipeline import writer
from tflite_export.ram import ram_budget
from tflite_export.result import ExportResult
from tflite_export.result import RamChoice
from tflite_export.result import TensorReport

WEIGHT_QUANTIZATION_CHOICES = ("auto",) + tuple(convert.WEIGHT_QUANTIZATION)

# Inputs for verifying a float32 export when no representative data is given.
_RANDOM_SAMPLES = 8
# Defaults of the options that default to None, so that an option given
# explicitly in a combination that would ignore it is refused.
DEFAULT_WEIGHT_QUANTIZATION = "auto"
DEFAULT_MAX_VERIFY_SAMPLES = 100
DEFAULT_SHARED_TABLES = "auto"
# `decode`: "auto" writes DECODE ops only where they save firmware flash on
# the target; "always" writes every compression that shrinks the file.
DECODE_CHOICES = ("auto", "always")
DEFAULT_DECODE = "auto"


def export(
    model: keras.Model,
    path: str | os.PathLike,
    representative_data=None,
    quantize: str = "int8",
    verify: bool = True,
    c_array: str | os.PathLike | None = None,
    io_dtype: str | None = None,
    weight_quantization: str | None = None,
    min_agreement: float | None = None,
    max_verify_samples: int | None = None,
    slim: bool = True,
    shared_tables: str | bool | None = None,
    max_decode_bytes: int | None = None,
    ram_bytes: int | None = None,
    target: str | targets.Target | None = None,
    decode: str | None = None,
    int4: str | None = None,
) -> ExportResult:
    """Exports a LUT-Q model as a .tflite file with LUT-compressed weights.

    The model is converted with TF's TFLite converter, every weight tensor
    that holds a LUT kernel is stored as bit-packed indices plus value
    tables (TFLM's DECODE format), the smallest TFLM arena is measured, and
    the result is verified on TFLM before anything is written.

    Options that would have no effect in the combination given are refused
    (ValueError, see `check_combinations`): `weight_quantization` or
    `shared_tables` with `quantize="float32"`, `shared_tables` with
    `weight_quantization="per_tensor"`, `min_agreement`,
    `max_verify_samples` or `shared_tables="auto"` with `verify=False`,
    `min_agreement` for a model without an output of several classes,
    `max_decode_bytes` with `ram_bytes`, `target` with `quantize="float32"`,
    and `decode` without `target`. An option left unset (None) takes its
    default and is never refused.

    Args:
        model: A LUT-Q model (with `lutq_tf` layers) or a plain Keras model
            (e.g. `lutq_tf.strip_model(model)`): functional, Sequential or
            subclassed (exported through its traced `call`), with any number
            of float or integer inputs and of outputs. The file's inputs and
            outputs are in the Keras model's order.
        path: The .tflite file to write (atomically, replaced last; new
            files get the mode the umask gives, existing ones keep theirs).
        representative_data: Typical inputs: for one input an array
            `(N,) + input shape`; for several a list or tuple of arrays in
            model input order, or a dict by input name. Float for float
            inputs, integers (e.g. token ids) for integer inputs; not all one
            value. Required for int8 (calibration) and for integer inputs;
            used for verification. A subclassed model's input shapes come
            from it.
        quantize: `"int8"` (full integer) or `"float32"`.
        verify: Run the compressed model and its uncompressed twin on TFLM
            (outputs must be bit-exact) and compare with Keras.
        c_array: Optional path of a `.cc` file to write the model to as a C
            array, with a `.h` beside it that records the model's length and
            CRC-32 (`tflite_export.c_array_matches(tflite, header)` checks
            the .tflite, the .h and the .cc's array against each other).
        io_dtype: Type of the model input and output: `"int8"` (default for
            int8) or `"float32"`.
        weight_quantization: For int8 only, how the converter quantises
            weights: `"per_channel"`, `"dense_per_tensor"` (FULLY_CONNECTED
            per tensor), `"per_tensor"`, or `"auto"` (default: the smallest
            tables that keep every dictionary value a distinct int8 code).
        min_agreement: If set (needs `verify`, and an output of several
            classes), verification also fails when top-1 agreement with
            Keras is below it.
        max_verify_samples: With `verify`, verify on at most this many
            inputs (an int >= 1; default 100; without representative data,
            at most 8 random inputs). The bit-exact check also runs random
            inputs over the whole input range.
        slim: Remove what TFLM never reads (tensor names, signature defs,
            conversion metadata, per-channel zero-point arrays, bias and
            encoded-tensor quantisation, empty buffers); each step is kept
            only if TFLM's outputs stay bit-identical.
        shared_tables: For int8 per-channel weights only. `"auto"`
            (default): one value table for all channels of a per-channel
            tensor whose channels share a dictionary (requantised scales),
            unless the result agrees less with Keras than the converter's
            int8 model on the verification inputs (top-1 for a classifier,
            max |diff| otherwise); then one table per channel. Left unset
            with `verify=False`, shared tables are kept without that check
            (an explicit `"auto"` needs `verify`). True: shared tables
            whatever the agreement. False: never.
        max_decode_bytes: If set (an int, bytes), no DECODE output may be
            larger: TFLM decodes each compressed kernel into the arena right
            before its op, so the arena grows by the largest decoded kernel.
            A Dense, Conv1D or Conv2D layer whose kernel decodes to more is
            split into output-channel groups (one op and DECODE each,
            joined by CONCATENATIONs of at most 10 inputs); other kernels
            above it stay int8. The written model computes the same as the
            unsplit one and is verified against its own uncompressed twin.
        ram_bytes: If set (an int, bytes), a budget for the TFLM arena:
            the exporter picks, per kernel, compress, split or keep int8 so
            that the arena fits and the file is smallest (the largest
            decode limit that fits). Without a `target` the arena is the
            one measured on the host wheel (reference kernels, 64-bit
            pointers); with one, the target's estimate for its kernel set
            (reference or CMSIS-NN; `result.device.arena_bytes`, an upper
            bound for a 32-bit build). `result.ram` reports the choices,
            arenas (and which arena they count), and flash and host
            latency against the unsplit file. Give at most one of the two.
            Under either, a layer is split only if some of its groups are
            compressed and save more file bytes than the extra ops cost;
            otherwise it stays int8, unsplit, and the report says why.
        target: The device the file is for, int8 only: a profile name
            (`tflite_export.PROFILES`, e.g. `"cortex-m4-cmsis-nn"`)
            or a `tflite_export.Target` with your firmware's own costs.
            The file is then judged against the int8 route of the same
            model (the slim uncompressed file) in firmware flash (file
            bytes plus the code of DECODE, linked once, and of any
            CONCATENATION a split adds), arena for the target's kernel
            set (`firmware.arena`: an upper bound for a 32-bit build,
            estimated from the wheel's recorded arena, plus the largest
            CMSIS-NN scratch request for CMSIS-NN; `ram_bytes` budgets
            it), and decode instructions: `result.device`, a
            `firmware.DeviceReport`, printed with the report. Unset, the
            report gives host figures only (file bytes and the wheel's
            reference-kernel arena).
        decode: With a `target` only, when to write DECODE ops. `"auto"`
            (default): only when they save firmware flash on the target;
            when compressing saves no more file bytes than the code it
            links (DECODE's `target.decode_code_bytes`, 0 if
            `target.decode_linked`, and CONCATENATION's for a split), the
            slim int8 file (no DECODE op) is written instead, verified,
            and the notes and the device verdict say what compressing
            would have saved and the DECODE size at which it breaks even.
            Under `max_decode_bytes` or `ram_bytes` the decision is made on
            the file those choose. `"always"`: write every compression
            that shrinks the file, as without a target, whatever the
            device verdict.
        int4: Native int4 weights instead of a LUT (int8 only), for LUT
            kernels whose every table is int4-exact (values s*k, one step
            s > 0, integers k in [-8, 7]; per output channel for CONV_2D and
            DEPTHWISE_CONV_2D per-channel tensors, per tensor otherwise;
            FULLY_CONNECTED per tensor only). `"never"` (default): none.
            `"auto"`: where exact and no larger than the LUT (or int8).
            `"always"`: every LUT kernel; one that cannot be int4 is an
            ExportError naming it. The file is verified bit-exact against
            an int8 twin holding the same codes (requantised scales and
            biases, `tflite_export.pipeline.int4`). Refused with quantize='float32',
            max_decode_bytes or ram_bytes (not supported yet); with a
            target, the device report counts int4 ops' instructions.

    Returns:
        An `ExportResult`; `print(result)` shows the report.

    Raises:
        ValueError: Bad arguments or combinations of them (the message
            names the arguments), a `max_decode_bytes` below one output
            channel of a layer to split, a `ram_bytes` below the arena
            with every kernel int8 (on the target, with one), or an
            unknown `target` name.
        TypeError: An argument of the wrong type (e.g. a `target` that is
            neither a profile name nor a `Target`).
        ImportError: tflite-micro is not installed.
        ExportError: The model cannot be converted, compressed or run on TFLM.
        UnsupportedModelError: (an ExportError) TFLM cannot run the graph:
            an op without a TFLM kernel, or beyond a kernel's limits (e.g.
            a CONCATENATION of more than 10 inputs).
        VerificationError: Verification failed; nothing was written.
    """
    if quantize not in convert.QUANTIZE_MODES:
        raise ValueError(
            f"quantize must be one of {convert.QUANTIZE_MODES}, got {quantize!r}."
        )
    io_dtype = io_dtype or quantize
    if io_dtype not in convert.QUANTIZE_MODES or (
        quantize == "float32" and io_dtype != "float32"
    ):
        allowed = ("int8", "float32") if quantize == "int8" else ("float32",)
        raise ValueError(
            f"io_dtype must be one of {allowed} with quantize={quantize!r}, "
            f"got {io_dtype!r}."
        )
    if weight_quantization is not None and (
        weight_quantization not in WEIGHT_QUANTIZATION_CHOICES
    ):
        raise ValueError(
            f"weight_quantization must be one of {WEIGHT_QUANTIZATION_CHOICES}, "
            f"got {weight_quantization!r}."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    _check_min_agreement(min_agreement)
    if shared_tables is not None and shared_tables not in ("auto", True, False):
        raise ValueError(
            f"shared_tables must be 'auto', True or False, got {shared_tables!r}."
        )
    if max_verify_samples is not None:
        if isinstance(max_verify_samples, bool) or not isinstance(
            max_verify_samples, numbers.Integral
        ):
            raise TypeError(
                "max_verify_samples must be an int >= 1 (e.g. 100), got "
                f"{max_verify_samples!r} ({type(max_verify_samples).__name__})."
            )
        if max_verify_samples < 1:
            raise ValueError(
                f"max_verify_samples must be >= 1, got {max_verify_samples}."
            )
    max_decode_bytes = ram_budget.check_byte_limit(max_decode_bytes, "max_decode_bytes")
    ram_bytes = ram_budget.check_byte_limit(ram_bytes, "ram_bytes")
    target = targets.get(target)
    if decode is not None and decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {DECODE_CHOICES}, got {decode!r}.")
    if int4 is not None and int4 not in int4_lib.CHOICES:
        raise ValueError(f"int4 must be one of {int4_lib.CHOICES}, got {int4!r}.")
    check_combinations(
        quantize=quantize, verify=verify, weight_quantization=weight_quantization,
        shared_tables=shared_tables, min_agreement=min_agreement,
        max_verify_samples=max_verify_samples, max_decode_bytes=max_decode_bytes,
        ram_bytes=ram_bytes, target=target, decode=decode, int4=int4,
    )
    if int4 is None:
        int4 = int4_lib.DEFAULT
    if decode is None:
        decode = DEFAULT_DECODE
    if weight_quantization is None:
        weight_quantization = DEFAULT_WEIGHT_QUANTIZATION
    if max_verify_samples is None:
        max_verify_samples = DEFAULT_MAX_VERIFY_SAMPLES
    if shared_tables is None:
        shared_tables = DEFAULT_SHARED_TABLES
    path = _check_writable(path, "path")
    outputs = [path]
    if c_array is not None:
        c_array = _check_writable(c_array, "c_array")
        outputs += [c_array, c_array_lib.header_path(c_array), resolver.path(c_array)]
    if len(set(outputs)) != len(outputs):
        raise ValueError("path and c_array (and its .h) must be different files.")
    tflm.require()  # fail before the slow steps
    tempfiles.clean_stale()  # what killed exports left in the temp dir

    plain, kernels, notes = lut_tensors.find_lut_kernels(model)
    convert.check_model(plain)
    convert.check_weights(plain)
    specs = convert.input_specs(plain, representative_data)
    data = convert.check_representative_data(
        plain, representative_data, quantize, specs
    )
    if min_agreement is not None and _classes(plain) is False:
        raise ValueError(_NO_CLASSES.format(min_agreement=min_agreement))

    if verify:
        if data is not None:
            inputs = [a[:max_verify_samples] for a in data]
            source = "representative_data"
        else:
            rng = np.random.default_rng(0)
            samples = min(_RANDOM_SAMPLES, max_verify_samples)
            inputs = [
                rng.standard_normal(
                    (samples,) + convert.input_shape(plain, None, specs, i)[1:]
                ).astype(np.float32)
                for i in range(len(specs))
            ]
            source = "random"
    settings = build.Settings(
        quantize=quantize, data=data, io_dtype=io_dtype,
        weight_quantization=weight_quantization, shared_tables=shared_tables,
        slim=slim, verify=verify, inputs=inputs if verify else None,
        source=source if verify else None, min_agreement=min_agreement,
        reference=plain, int4=int4,
    )
    judge = target is not None and decode == "auto"
    # The target's arena estimates, one recording per file (cached): the
    # basis of `ram_bytes` and the device report's arena.
    basis = ram_budget.ArenaBasis(target) if target is not None else None
    declined = None  # a `_Declined`: the compressed file not written
    first_note = len(notes)
    if max_decode_bytes is None and ram_bytes is None:
        candidate_notes = []
        built = build.assemble(plain, kernels, candidate_notes, settings,
                               share=settings.shared_tables is not False)
        # The first build of the unsplit model: its conversion is the int8
        # route's.
        route = built
        keep = None
        if judge:  # decided before verifying a file that would not be written
            declined = _loses(target, built.compressed, built.slim_baseline)
        if declined is None:
            notes.extend(candidate_notes)
        else:
            built, keep = _int8_build(plain, kernels, notes, settings, route,
                                      target, declined)
        built, verification = build.assemble_verified(
            plain, kernels, notes, settings, keep=keep, built=built)
        ram = None
    else:
        fitted = ram_budget.fit(
            plain, kernels, notes, settings,
            max_decode_bytes=max_decode_bytes, ram_bytes=ram_bytes, basis=basis,
        )
        built, verification, ram = fitted.built, fitted.verification, fitted.report
        route = fitted.unsplit
    # The int8 route: the converter's file of the same unsplit model,
    # slimmed like the written file when that is of the unsplit model too.
    int8_bytes = (
        built.slim_baseline if built.baseline == route.baseline else route.slim_baseline
    )
    if judge and declined is None:
        # The file verified: per-channel tables after shared ones were
        # dropped, or the file max_decode_bytes or ram_bytes chose.
        declined = _loses(target, built.compressed, int8_bytes)
        if declined is not None:
            del notes[first_note:]  # they describe the file not written
            built, keep = _int8_build(plain, kernels, notes, settings, route, target,
                                      declined)
            built, verification = build.assemble_verified(
                plain, kernels, notes, settings, keep=keep, built=built)
            if ram is not None:
                ram = _ram_int8(ram, built, fitted.basis)
    device_report = None
    if target is not None:
        device_report = _device_report(target, built, int8_bytes, declined, basis)
        if declined is not None:
            notes.append(_declined_note(device_report))
    if (
        min_agreement is not None
        and verification is not None
        and verification.top1_agreement is None
    ):  # a subclassed model's output shapes are known only now
        raise ValueError(_NO_CLASSES.format(min_agreement=min_agreement))
    baseline, compressed, layouts = built.baseline, built.compressed, built.layouts
    if not kernels:
        notes.append("No LUT-Q layers found: exported without compression.")
    for kernel in built.unmatched:
        notes.append(
            f"layer '{kernel.layer}' ({kernel.tensor}): no weight tensor of "
            "the converted model holds this LUT kernel; not compressed."
        )
    merged = [t for t in layouts if t.merged]
    if merged:
        warnings.warn(
            "int8 weight quantisation merged distinct LUT values in "
            + ", ".join(f"'{t.match.kernel.layer}'" for t in merged)
            + "; the report lists how many.",
            stacklevel=2,
        )

    files = {path: compressed}
    if c_array is not None:
        source_text, header_text = c_array_lib.render(compressed, c_array)
        files[c_array] = source_text.encode()
        files[c_array_lib.header_path(c_array)] = header_text.encode()
        files[resolver.path(c_array)] = resolver.render_for_export(
            compressed, c_array, built.arena_bytes, device_report
        ).encode()
    writer.write_files(files, last=path)

    return ExportResult(
        path=path,
        size_bytes=len(compressed),
        baseline_bytes=len(baseline),
        slim_baseline_bytes=len(built.slim_baseline),
        slim_steps=list(built.steps),
        anatomy=anatomy.read(compressed, layouts),
        quantize=quantize,
        io_dtype=io_dtype,
        weight_quantization=built.chosen,
        tensors=[_report(t, built.int4) for t in layouts],
        verification=verification,
        arena_bytes=built.arena_bytes,
        baseline_arena_bytes=built.baseline_arena,
        c_array=(c_array, c_array_lib.header_path(c_array)) if c_array else None,
        op_resolver=resolver.path(c_array) if c_array else None,
        notes=notes,
        decode_buffer_bytes=built.decode_buffer_bytes,
        ram=ram,
        device=device_report,
    )


_NO_CLASSES = (
    "min_agreement={min_agreement} bounds top-1 agreement with Keras, but no "
    "output of the model has several values per sample (classes on the "
    "last axis) to take a top-1 of: drop min_agreement (the report still "
    "gives max |diff| and SNR). Nothing was written."
)


def check_combinations(quantize="int8", verify=True, weight_quantization=None,
                       shared_tables=None, min_agreement=None,
                       max_verify_samples=None, max_decode_bytes=None,
                       ram_bytes=None, target=None, decode=None, int4=None):
    """Refuses options that `export` would ignore in this combination.

    An option counts as given when it is not None, whatever its value (an
    explicit default too): None leaves it unset. The command line calls
    this too, before loading the model.

    Args:
        quantize, verify, weight_quantization, shared_tables, min_agreement,
            max_verify_samples, max_decode_bytes, ram_bytes, target, decode,
            int4: As `export` takes them.

    Raises:
        ValueError: The message names the options and says what to do (an
            unknown target name too).
        TypeError: `target` is neither a profile name nor a `Target`.
    """
    if quantize == "float32" and weight_quantization is not None:
        raise ValueError(
            f"weight_quantization={weight_quantization!r} applies to int8 "
            "weights only; quantize='float32' keeps float weights. Drop "
            "weight_quantization, or export with quantize='int8'."
        )
    if quantize == "float32" and shared_tables is not None:
        raise ValueError(
            f"shared_tables={shared_tables!r} applies to int8 per-channel "
            "weights only; quantize='float32' stores one value table per "
            "tensor. Drop shared_tables, or export with quantize='int8'."
        )
    if weight_quantization == "per_tensor" and shared_tables is not None:
        raise ValueError(
            f"shared_tables={shared_tables!r} applies to per-channel weights "
            "only; weight_quantization='per_tensor' gives every tensor one "
            "value table. Drop shared_tables, or use another "
            "weight_quantization."
        )
    if not verify:
        ignored = [
            f"{name}={value!r}"
            for name, value in (("min_agreement", min_agreement),
                                ("max_verify_samples", max_verify_samples))
            if value is not None
        ]
        if ignored:
            raise ValueError(
                f"{' and '.join(ignored)} set how the export is verified, but "
                "verify=False: drop them, or verify."
            )
        if shared_tables == "auto":
            raise ValueError(
                "shared_tables='auto' keeps shared tables only if they agree "
                "with Keras as well as plain int8 on the verification inputs, "
                "but verify=False: give shared_tables=True or False, or verify."
            )
    if max_decode_bytes is not None and ram_bytes is not None:
        raise ValueError(
            "give max_decode_bytes or ram_bytes, not both: ram_bytes chooses "
            "the decode limit itself."
        )
    profile = targets.get(target)
    if profile is not None and quantize == "float32":
        raise ValueError(
            f"target={profile.name!r} judges an int8 export on the device (the "
            "int8 kernels' costs, DECODE's int8 paths), but quantize='float32': "
            "drop target, or export with quantize='int8'."
        )
    if decode is not None and profile is None:
        raise ValueError(
            f"decode={decode!r} chooses by firmware flash on a target whether "
            "to write DECODE ops, but no target is given (without one, every "
            "compression that shrinks the file is written): give target="
            f"{targets.DEFAULT!r} (or another profile or a Target), or drop decode."
        )
    int4_lib.check_combinations(int4, quantize=quantize, max_decode_bytes=max_decode_bytes,
                                ram_bytes=ram_bytes)


@dataclasses.dataclass
class _Declined:
    """A compressed file not written: its bytes and its `DeviceReport`."""

    model_bytes: bytes
    report: object


def _loses(target, model_bytes, int8_bytes):
    """A `_Declined` if the file's DECODE ops save no firmware flash on
    `target` against the int8 file `int8_bytes` (a tie too: the int8 file
    spends no decode instructions), else None."""
    report = firmware.report(target, model_bytes, int8_bytes)
    if report.decoded and not report.decode_pays:
        return _Declined(model_bytes, report)
    return None


def _int8_build(plain, kernels, notes, settings, route, target, declined):
    """`(built, keep)`: `route`'s model with every LUT kernel kept int8.

    Args:
        plain, kernels, notes, settings: As for `build.assemble`.
        route: A `build.Built` of the unsplit model (its conversion is
            reused).
        target: The `Target`.
        declined: The `_Declined` compressed file.
    """
    reason = (
        f"kept int8: on {target.name} the code compression links "
        f"({firmware.format_code(declined.report.code_added)}) outweighs the "
        "file bytes it saves"
    )
    keep = {t.match.kernel.layer: reason for t in route.layouts}
    built = build.assemble(plain, kernels, notes, settings, share=False,
                           keep=keep, previous=route)
    return built, keep


def _ram_int8(ram, built, basis):
    """`ram` (a `RamReport`) for the int8 file written instead of its choice,
    its arenas on `basis` (the `ram_budget.ArenaBasis` of `ram`).

    Raises:
        ValueError: The int8 file's arena exceeds `ram.ram_bytes` (nothing
            is written).
    """
    why = "written int8: compression saved no firmware flash on the target (see the notes)"
    arena_bytes = basis.file(built)
    if ram.ram_bytes is not None and arena_bytes > ram.ram_bytes:
        raise ram_budget.below_int8(ram.ram_bytes, arena_bytes, basis)
    return dataclasses.replace(
        ram,
        arena_bytes=arena_bytes,
        decode_buffer_bytes=0,
        twin_arena_bytes=basis.int8(built),
        size_bytes=len(built.compressed),
        choices=[
            RamChoice(c.layer, c.op, c.decoded_bytes, "int8", 0, 0, why)
            for c in ram.choices
        ],
        concat_ops={},
        latency_us=None,
        unsplit_latency_us=None,
    )


def _device_report(target, built, int8_bytes, declined, basis):
    """The `DeviceReport` of the file written (`built.compressed`).

    Args:
        target: The `Target`.
        built: The `build.Built` written.
        int8_bytes: The int8 route's file.
        declined: A `_Declined` compressed file, or None. Then `built` is
            the int8 file, which both reports are made against.
        basis: The `ram_budget.ArenaBasis` of `target` (its estimates of
            files `ram_bytes` already judged are reused).
    """
    if declined is not None:
        int8_bytes = built.compressed
    report = firmware.report(
        target, built.compressed, int8_bytes,
        *basis.estimate(built.compressed, built.arena_bytes),
    )
    if declined is not None:
        report.declined = firmware.report(target, declined.model_bytes, int8_bytes)
    return report


def _declined_note(report):
    """The note on the compressed file `report.declined` (not written)."""
    declined = report.declined
    text = (
        f"written int8 for {report.target.name}: compressing "
        f"{len(declined.decoded)} tensor(s) would change the file by "
        f"{declined.file_change:+,} B but link "
        f"{firmware.format_code(declined.code_added)}, firmware "
        f"{declined.flash_change:+,} B."
    )
    if firmware.DECODE_OP in declined.code_added:
        text += (
            f" It pays on this target only if DECODE's code is under "
            f"{declined.break_even_decode_bytes:,} B (the break-even) or the "
            "firmware links DECODE anyway (Target.decode_linked=True)."
        )
    return text + (
        " decode='always' (CLI --decode always) writes the compressed file anyway."
    )


def _classes(model):
    """Whether an output has several values per sample (a top-1 exists).

    None when the output shapes are unknown (a subclassed model).
    """
    try:
        shapes = [tuple(t.shape) for t in keras.tree.flatten(model.outputs)]
    except (AttributeError, ValueError, TypeError):
        return None
    if not shapes:
        return None
    if any(len(shape) >= 2 and shape[-1] is None for shape in shapes):
        return None
    return any(len(shape) >= 2 and shape[-1] > 1 for shape in shapes)


def _report(layout, int4=None):
    """The `TensorReport` of one weight tensor's `compress.TableLayout`."""
    weight = layout.match.weight
    kernel = layout.match.kernel
    if int4 and weight.index in int4:
        return _int4_report(layout, int4[weight.index])
    return TensorReport(
        layer=kernel.layer,
        tensor=kernel.tensor,
        op=weight.op,
        tflite_name=weight.name,
        num_values=kernel.num_values,
        codes=layout.codes,
        index_bits=layout.index_bits,
        table_mode=(
            "per-tensor" if layout.mode == "per-tensor"
            else f"{layout.mode}(axis={layout.axis})"
        ),
        tables=layout.tables,
        bytes_before=layout.bytes_before,
        bytes_after=layout.bytes_after if layout.compress else layout.bytes_before,
        compressed=layout.compress,
        note=layout.note,
    )


def _int4_report(layout, tensor):
    """The `TensorReport` of a weight tensor stored as int4."""
    weight, kernel = layout.match.weight, layout.match.kernel
    axis = weight.quantized_dimension
    return TensorReport(
        layer=kernel.layer,
        tensor=kernel.tensor,
        op=weight.op,
        tflite_name=weight.name,
        num_values=kernel.num_values,
        codes=tensor.codes,
        index_bits=4,
        table_mode="int4(per-tensor)" if axis is None else f"int4(axis={axis})",
        tables=tensor.tables,
        bytes_before=layout.bytes_before,
        bytes_after=tensor.nbytes,
        compressed=True,
        # The layout's notes are about the LUT not written.
        note="native int4 (no DECODE)",
    )


def _check_writable(path, argument):
    """Checks early that `path` names a file that can be created."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a file path, got {type(path).__name__}.")
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ValueError(
            f"{argument}={path!r} is a directory or empty; give a file path."
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(
            f"{argument}={path!r}: directory {directory!r} does not exist; "
            "create it first."
        )
    if not os.access(directory, os.W_OK):
        raise ValueError(
            f"{argument}={path!r}: directory {directory!r} is not writable."
        )
    return path


def _check_min_agreement(value):
    """`min_agreement`: None or a number in [0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            "min_agreement must be None or a number in [0, 1] (e.g. 0.9), "
            f"got {value!r} ({type(value).__name__})."
        )
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"min_agreement must be in [0, 1], got {value}.")
