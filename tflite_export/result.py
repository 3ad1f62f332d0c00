"""The report of an export: `ExportResult` and its text table."""

import dataclasses

from lutq_tf.text import grid
from tflite_export.device.anatomy import Anatomy
from tflite_export.device.firmware import DeviceReport
from tflite_export.pipeline.verify import Verification

# The report's device line without a target.
HOST_ONLY = (
    "  device: not judged; size and arena are host figures (file bytes; the "
    "arena of TFLM's reference kernels on the 64-bit host wheel)"
)


@dataclasses.dataclass
class TensorReport:
    """One LUT weight tensor of the exported model.

    Attributes:
        layer: Keras layer name.
        tensor: Kernel attribute (`"kernel"`, `"depthwise_kernel"`, ...).
        op: TFLite op reading it, e.g. `"CONV_2D"`.
        tflite_name: Tensor name in the flatbuffer.
        num_values: K, the dictionary size per table.
        codes: Distinct stored values in the fullest table.
        index_bits: Bits per index.
        table_mode: `"per-tensor"`, `"per-channel(axis=N)"`, or
            `"shared(axis=N)"` (one table for every channel of a
            per-channel tensor).
        tables: Number of value tables.
        bytes_before: Tensor bytes uncompressed.
        bytes_after: Bytes of indices + tables + metadata when compressed
            (equal to `bytes_before` when kept uncompressed).
        compressed: Whether it was compressed.
        note: Remarks (kept uncompressed and why, values merged, folding).
    """

    layer: str
    tensor: str
    op: str
    tflite_name: str
    num_values: int
    codes: int
    index_bits: int
    table_mode: str
    tables: int
    bytes_before: int
    bytes_after: int
    compressed: bool
    note: str = ""


@dataclasses.dataclass
class RamChoice:
    """What the exporter did with one compressed kernel under a RAM limit.

    Attributes:
        layer: Keras layer name (of the unsplit model).
        op: TFLite op reading the kernel.
        decoded_bytes: Bytes the whole kernel decodes to.
        choice: `"compress"`, `"split"` or `"int8"` (kept uncompressed).
        groups: Output-channel groups (1 unsplit, 0 when kept int8).
        group_bytes: Bytes the largest group decodes to (0 when int8).
        reason: Why.
    """

    layer: str
    op: str
    decoded_bytes: int
    choice: str
    groups: int
    group_bytes: int
    reason: str


@dataclasses.dataclass
class RamReport:
    """RAM figures of an export made under `max_decode_bytes` or `ram_bytes`.

    The arenas are on one basis (`arena_basis`): the host wheel's measured
    arena, or, for `ram_bytes` with a target, the target's estimate.

    Attributes:
        argument: `"max_decode_bytes"` or `"ram_bytes"`.
        limit: The decode limit applied (given, or chosen for `ram_bytes`).
        ram_bytes: The arena budget, or None.
        arena_bytes: Main arena of the written file (decode buffers in it).
        decode_buffer_bytes: Its largest decoded kernel.
        twin_arena_bytes: Arena of the written model's uncompressed twin.
        int8_arena_bytes: Arena of the unsplit uncompressed model (the
            "int8 arena" the limits are judged against).
        unsplit_arena_bytes: Arena of the unsplit compressed file.
        unsplit_decode_buffer_bytes: Its largest decoded kernel.
        unsplit_size_bytes: Size of the unsplit compressed file.
        size_bytes: Size of the written file.
        choices: A `RamChoice` per compressed kernel of the unsplit model.
        concat_ops: `{layer: CONCATENATION ops}` of each split layer.
        latency_us: Host median microseconds per invoke of the written file
            (TFLM Python interpreter), when a layer was split; else None.
        unsplit_latency_us: The same for the unsplit compressed file.
        arena_basis: Which arena the figures (and `ram_bytes`) count:
            `"wheel"`, or e.g. `"cortex-m4-cmsis-nn estimate, CMSIS-NN
            kernels"` (`ram_budget.ArenaBasis.label`).
        arena_note: What that basis is, in a sentence.
    """

    argument: str
    limit: int
    ram_bytes: int | None
    arena_bytes: int
    decode_buffer_bytes: int
    twin_arena_bytes: int
    int8_arena_bytes: int
    unsplit_arena_bytes: int
    unsplit_decode_buffer_bytes: int
    unsplit_size_bytes: int
    size_bytes: int
    choices: list[RamChoice]
    concat_ops: dict[str, int]
    latency_us: float | None = None
    unsplit_latency_us: float | None = None
    arena_basis: str = "wheel"
    arena_note: str = ""

    def lines(self) -> list[str]:
        """The report's RAM section, as lines of text."""
        budget = (
            f"ram_bytes={self.ram_bytes} (decode limit chosen: {self.limit} B)"
            if self.argument == "ram_bytes"
            else f"max_decode_bytes={self.limit}"
        )
        lines = [
            f"  RAM under {budget}:",
            f"    arenas counted: {self.arena_note or self.arena_basis}",
            f"    main arena {self.arena_bytes} B (int8 arena "
            f"{self.int8_arena_bytes} B + {self.arena_bytes - self.int8_arena_bytes}"
            f"), decode buffer {self.decode_buffer_bytes} B in it (alternate "
            "region: not used)",
            f"    uncompressed twin of this file: arena {self.twin_arena_bytes} B "
            f"(+{self.twin_arena_bytes - self.int8_arena_bytes} over int8: each "
            "group op's state; a conv's group outputs live until the "
            "CONCATENATION)",
            f"    unsplit compressed file: arena {self.unsplit_arena_bytes} B, "
            f"decode buffer {self.unsplit_decode_buffer_bytes} B, "
            f"{self.unsplit_size_bytes} B flash; this file {self.size_bytes} B "
            f"({self.size_bytes / max(self.unsplit_size_bytes, 1):.3f}x)",
        ]
        if self.latency_us is not None:
            lines.append(
                f"    host latency {self.latency_us:.0f} us vs "
                f"{self.unsplit_latency_us:.0f} us unsplit "
                f"({self.latency_us / max(self.unsplit_latency_us, 1e-9):.2f}x)"
            )
        for c in self.choices:
            ops = self.concat_ops.get(c.layer)
            extra = f", {ops} CONCATENATION op(s)" if ops else ""
            # int8: not compressed, so no decode buffer (and not split).
            shown = "kept int8" if c.choice == "int8" else c.choice
            lines.append(f"    {c.layer} ({c.op}): {shown}{extra}: {c.reason}")
        return lines


@dataclasses.dataclass
class ExportResult:
    """What `export` wrote and what it checked.

    Attributes:
        path: The .tflite file written.
        size_bytes: Its size.
        baseline_bytes: Size of the same model without compression (the
            converter's int8 or float32 file).
        slim_baseline_bytes: The same, slimmed like the written file.
        slim_steps: The slimming steps applied (see `slim.STEPS`).
        anatomy: An `anatomy.Anatomy`: the written file by part, and its
            information limit.
        quantize: `"int8"` or `"float32"`.
        io_dtype: Type of the model input and output.
        weight_quantization: How the converter quantised weights
            (`"per_channel"`, `"dense_per_tensor"`, `"per_tensor"`; `"float"`
            for float32).
        tensors: A `TensorReport` per LUT weight tensor.
        verification: A `verify.Verification`, or None if not verified.
        arena_bytes: Smallest TFLM arena that runs the written model.
        baseline_arena_bytes: The same for the uncompressed baseline.
        c_array: `(source, header)` paths written, or None.
        op_resolver: The op resolver and arena header (`<stem>_ops.h`)
            written with `c_array`, or None.
        notes: Other remarks (e.g. nothing compressed, LUT kernels the
            converter dropped).
        decode_buffer_bytes: Bytes of the largest decoded kernel: what
            DECODE adds to the arena (TFLM's `SetDecompressionMemory` can
            take it out of the main arena).
        ram: A `RamReport` for an export under `max_decode_bytes` or
            `ram_bytes`, else None.
        device: A `firmware.DeviceReport` of the file on the export's
            `target` against the int8 route of the same model (firmware
            flash, arena for the target's kernels, decode instructions,
            verdict), or None without a target.
    """

    path: str
    size_bytes: int
    baseline_bytes: int
    slim_baseline_bytes: int
    slim_steps: list[str]
    anatomy: Anatomy
    quantize: str
    io_dtype: str
    weight_quantization: str
    tensors: list[TensorReport]
    verification: Verification | None
    arena_bytes: int
    baseline_arena_bytes: int
    c_array: tuple[str, str] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    decode_buffer_bytes: int = 0
    ram: RamReport | None = None
    device: DeviceReport | None = None
    op_resolver: str | None = None

    @property
    def compressed_tensors(self) -> list[TensorReport]:
        """The `tensors` stored compressed."""
        return [t for t in self.tensors if t.compressed]

    def alt_decompression_arena(self) -> tuple[int, int]:
        """The main arena when DECODE outputs go to an alternate region.

        TFLM can decode into a separate memory region
        (`MicroInterpreter::SetDecompressionMemory`) reused by every DECODE,
        e.g. a second SRAM bank. Measured on the written file by the same
        search as `arena_bytes` (a few seconds).

        Returns:
            `(main_arena_bytes, region_bytes)`: the region is the largest
            decoded kernel rounded up to 16 bytes; `(arena_bytes, 0)` when
            nothing is compressed.
        """
        from tflite_export.pipeline import arena
        from tflite_export.pipeline import verify

        if not self.decode_buffer_bytes:
            return self.arena_bytes, 0
        region = -(-self.decode_buffer_bytes // arena.GRANULE) * arena.GRANULE
        with open(self.path, "rb") as f:
            model = f.read()
        main = arena.find_arena_size(model, verify.io_counts(model)[0], self.path,
                                     alt_decompression_bytes=region)
        return main, region

    @property
    def ratio(self) -> float:
        """Baseline bytes over written bytes."""
        return self.baseline_bytes / self.size_bytes if self.size_bytes else 0.0

    def table(self) -> str:
        """Renders the report as a plain-text table."""
        lines = [
            f"TFLM export: {self.path}",
            f"  quantize={self.quantize}  io={self.io_dtype}  "
            f"weights={self.weight_quantization}",
            f"  size {self.size_bytes} bytes vs {self.baseline_bytes} uncompressed "
            f"({self.ratio:.2f}x) and {self.slim_baseline_bytes} uncompressed slim "
            f"({self.slim_baseline_bytes / max(self.size_bytes, 1):.2f}x)",
            "  bytes by part: "
            + ", ".join(f"{name} {count}" for name, count in self.anatomy.row()),
            f"  information limit {self.anatomy.information_limit} bytes "
            f"(file {self.size_bytes / max(self.anatomy.information_limit, 1):.2f}x of it)",
            f"  arena {self.arena_bytes} bytes vs {self.baseline_arena_bytes} "
            f"uncompressed; decode buffer {self.decode_buffer_bytes} bytes",
        ]
        if self.ram is not None:
            lines += self.ram.lines()
        if self.device is not None:
            lines += self.device.lines()
        elif self.quantize == "int8":
            lines.append(
                HOST_ONLY + ": target='cortex-m4-cmsis-nn' (another profile or a "
                "Target; CLI --target) adds firmware flash, device arena and decode "
                "cost, and writes DECODE only where it saves flash."
            )
        else:
            lines.append(HOST_ONLY + "; device profiles judge int8 exports.")
        if self.c_array:
            lines.append(f"  C array: {self.c_array[0]}, {self.c_array[1]}")
        if self.op_resolver:
            lines.append(f"  op resolver and arena size: {self.op_resolver}")
        lines.append("")
        if self.tensors:
            header = ("layer", "tensor", "op", "K", "codes", "bits", "table",
                      "before", "after", "note")
            rows = [
                (t.layer, t.tensor, t.op, str(t.num_values), str(t.codes),
                 str(t.index_bits) if t.compressed else "-", t.table_mode,
                 str(t.bytes_before), str(t.bytes_after), t.note)
                for t in self.tensors
            ]
            lines.append(grid(header, rows))
        if not self.compressed_tensors:
            lines.append("Nothing was compressed.")
        for note in self.notes:
            lines.append(f"Note: {note}")
        lines.append("")
        if self.verification is None:
            lines.append("Not verified.")
        else:
            lines.append(self.verification.describe())
        return "\n".join(lines)

    def __str__(self):
        return self.table()
