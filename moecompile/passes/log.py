"""The pass log: one record per candidate block, and the report of one optimize run.

Place in the pipeline: written by every pass, read by people (`moecompile inspect`, `Report.table()`) and programs
(`Report.to_json()`, JSON lines). Data first: every field is plain JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


def _plain(value):
    """`value` as JSON can hold it: tensors by their shape and dtype, containers item by item, other objects by a
    short repr (an option's value, recorded for a person)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"tensor{list(shape)} {str(dtype).removeprefix('torch.')}"
    return repr(value)[:80]


@dataclass
class BlockRecord:
    """What happened to one candidate block."""

    path: str
    module_type: str
    # "fused" | "left" (and "pending" while passes run); "experts_kernels": an experts module run by
    # experts_implementation="moecompile" (hf_experts.py), the router left to transformers
    decision: str = "pending"
    reason: str = ""  # why it was left, or a note on how it was fused
    spec: dict | None = None
    spec_summary: str = ""
    method: str = ""  # how the spec was read
    dtype: str = ""
    max_abs_error: float | None = None  # original vs replacement, float32, on the confirmation inputs
    rel_error: float | None = None  # max_abs_error over the largest |output|
    native_max_abs_error: float | None = None  # the same in the model's own dtype (informational)
    native_mean_rel_error: float | None = None
    confirm_tokens: list[int] = field(default_factory=list)  # per input batch of the real-weights check
    told_apart: dict[str, int] = field(default_factory=dict)  # neighbouring description -> tokens routed otherwise
    seconds: float = 0.0
    routing_change: dict | None = None  # a routing rewrite's measured effect (passes/routing.py RoutingChange)
    routing_summary: str = ""
    export: str = ""  # the ONNX form export_onnx gave the block (backends/onnx.py), and why
    expert_weights: str = ""  # optimize(expert_weights=...): the format the experts took and its measured error

    def leave(self, reason: str) -> None:
        self.decision, self.reason = "left", reason

    @property
    def summary(self) -> str:
        """What a person reads for this block: its description where a replacement runs it, else why it was left."""
        return self.spec_summary if self.decision in ("fused", "experts_kernels") else self.reason


@dataclass
class PassRun:
    name: str
    seconds: float
    modified: bool
    note: str = ""


@dataclass
class Report:
    """The report of one optimize run: `.blocks` has one record per candidate."""

    model_type: str
    blocks: list[BlockRecord] = field(default_factory=list)
    passes: list[PassRun] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    message: str = ""
    # per fused layer, measured by routing_stats (stats.LayerStats as dicts): `moecompile stats --report` adds them
    layer_stats: list[dict] = field(default_factory=list)

    @property
    def fused(self) -> list[BlockRecord]:
        return [b for b in self.blocks if b.decision == "fused"]

    @property
    def left(self) -> list[BlockRecord]:
        return [b for b in self.blocks if b.decision != "fused"]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["options"] = {k: _plain(v) for k, v in self.options.items()}  # calibration batches are tensors
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_json_lines(self) -> str:
        """One JSON object per block, for programs that stream the log."""
        return "\n".join(json.dumps(asdict(b)) for b in self.blocks)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(model_type=data["model_type"], blocks=[BlockRecord(**b) for b in data.get("blocks", [])],
                   passes=[PassRun(**p) for p in data.get("passes", [])], options=data.get("options", {}),
                   message=data.get("message", ""), layer_stats=data.get("layer_stats", []))

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        """The pass log as a table for a person."""
        header = ("block", "decision", "max abs err", "spec / reason")
        rows = []
        for b in self.blocks:
            err = "-" if b.max_abs_error is None else f"{b.max_abs_error:.2e}"
            rows.append((b.path or "<root>", b.decision, err, b.summary))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header[:3])]
        lines = [f"moecompile: {self.model_type}: {len(self.fused)} of {len(self.blocks)} MoE blocks fused"]
        if self.message:
            lines.append(self.message)
        if rows:
            fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
            lines.append(fmt.format(*header))
            lines.extend(fmt.format(*r) for r in rows)
        rewrites = [b for b in self.blocks if b.routing_summary]
        if rewrites:
            lines.append("routing rewrites (they change what the model computes; measured on the calibration tokens):")
            lines.extend(f"  {b.path or '<root>'}: {b.routing_summary}" for b in rewrites)
        quantized = [b for b in self.blocks if b.expert_weights]
        if quantized:
            lines.append("expert weights (they change what the model computes; measured against the block before):")
            lines.extend(f"  {b.path or '<root>'}: {b.expert_weights}" for b in quantized)
        exported = [b for b in self.blocks if b.export]
        if exported:
            lines.append("ONNX export:")
            lines.extend(f"  {b.path or '<root>'}: {b.export}" for b in exported)
        if self.passes:
            lines.append("passes: " + ", ".join(f"{p.name} {p.seconds:.2f}s" + (f" ({p.note})" if p.note else "")
                                                for p in self.passes))
        return "\n".join(lines)
