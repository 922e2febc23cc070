"""The pass manager and the passes optimize() runs: detect -> hooks -> describe (+ train mode) -> confirm -> fuse.

Place in the pipeline: the driver. Each pass is a small unit with a name, a docstring saying what it changes, and
`run(context) -> bool` (did it modify the model). The manager knows nothing about any single pass; it times each and
records it in the report. Per-block failures are recorded on the block (decision "left" and the reason), never raised,
except by the fuse pass, which swaps all confirmed blocks in or none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from torch import nn

from ..fused import FusedMoE
from ..router_tap import make_tap
from . import hooks
from .confirm import confirm, neighbour_description
from .describe import DescribeError, Description, describe
from .detect import Candidate, already_fused, propose
from .log import BlockRecord, PassRun, Report
from .structure import structure_key


@dataclass
class PassContext:
    """What the passes share: the model being rewritten, the report, and per-block working state."""

    model: nn.Module
    report: Report
    verify: bool = True
    seed: int = 0
    candidates: dict[str, Candidate] = field(default_factory=dict)
    descriptions: dict[str, Description] = field(default_factory=dict)
    described_structures: dict[tuple, tuple[str, Description | DescribeError]] = field(default_factory=dict)
    confirmed_structures: dict[tuple, str] = field(default_factory=dict)  # structure key -> first block confirmed
    structure_keys: dict[str, tuple] = field(default_factory=dict)  # block path -> its structure key

    def structure(self, path: str) -> tuple:
        """The block's structure key (passes/structure.py), computed once for describe and confirm."""
        if path not in self.structure_keys:
            self.structure_keys[path] = structure_key(self.candidates[path].module)
        return self.structure_keys[path]

    def record(self, path: str) -> BlockRecord:
        return next(b for b in self.report.blocks if b.path == path)

    def pending(self) -> list[BlockRecord]:
        return [b for b in self.report.blocks if b.decision == "pending"]


class DetectPass:
    """Propose candidate blocks by structure. Changes nothing in the model."""

    name = "detect"

    def run(self, ctx: PassContext) -> bool:
        for path, module in already_fused(ctx.model):
            ctx.report.blocks.append(BlockRecord(
                path=path, module_type="FusedMoE", dtype=str(next(module.parameters()).dtype).replace("torch.", ""),
                decision="fused", spec=module.spec.to_dict(), spec_summary=module.spec.summary(),
                reason="already fused by moecompile: kept as it is", method="kept"))
        for candidate in propose(ctx.model):
            ctx.candidates[candidate.path] = candidate
            dtype = str(next(candidate.module.parameters()).dtype).replace("torch.", "")
            ctx.report.blocks.append(BlockRecord(path=candidate.path, module_type=type(candidate.module).__name__,
                                                 dtype=dtype))
        return False


class HooksPass:
    """Leave the candidates whose hooks would stop firing once fused (passes/hooks.py). Changes nothing in the
    model; the block's own hooks are carried over by the fuse pass."""

    name = "hooks"

    def run(self, ctx: PassContext) -> bool:
        for record in ctx.pending():
            reason = hooks.reason_to_leave(ctx.model, ctx.candidates[record.path].module)
            if reason is not None:
                record.leave(reason)
        return False


class DescribePass:
    """Read each candidate into an MoESpec by execution on a randomised copy. Changes nothing in the model. A block
    of the same structure as one read before (another layer: passes/structure.py) takes that reading."""

    name = "describe"

    def run(self, ctx: PassContext) -> bool:
        for record in ctx.pending():
            start = time.perf_counter()
            key = ctx.structure(record.path)
            first, found = ctx.described_structures.get(key, (None, None))
            try:
                if found is None:
                    found = describe(ctx.candidates[record.path], seed=ctx.seed)
                elif isinstance(found, DescribeError):
                    raise DescribeError(f"{found} (as {first}: same class, shapes and settings)")
                else:
                    found = replace(found, method=f"{found.method}; read as {first} (same class, shapes and "
                                                  "settings)")
                description = found
            except DescribeError as exc:
                record.leave(str(exc))
                if first is None:
                    ctx.described_structures[key] = (record.path or "<root>", exc)
            except Exception as exc:  # noqa: BLE001 - a block we cannot read is reported, the rest go on
                record.leave(f"reading the block failed: {type(exc).__name__}: {exc}")
            else:
                if first is None:
                    ctx.described_structures[key] = (record.path or "<root>", description)
                ctx.descriptions[record.path] = description
                record.spec, record.spec_summary = description.spec.to_dict(), description.spec.summary()
                record.method = description.method
            record.seconds += time.perf_counter() - start
        return False


class ConfirmPass:
    """Compare each described block with its FusedMoE replacement; leave those that disagree. Keyword arguments
    narrow the check (confirm's rerandomized, shapes, kernels) for blocks the torch.compile backend has seen before.
    A block of the same structure (passes/structure.py) and description as one confirmed before (another layer) is
    checked on its own weights only: the re-randomised checks of the first hold for it."""

    name = "confirm"

    def __init__(self, **narrowed):
        self.narrowed = narrowed  # confirm()'s rerandomized / shapes / kernels, for the torch.compile backend

    def run(self, ctx: PassContext) -> bool:
        for record in ctx.pending():
            start = time.perf_counter()
            if not ctx.verify:
                record.reason = "not verified (verify=False): spec read by execution on a randomised copy only"
                continue
            module, description = ctx.candidates[record.path].module, ctx.descriptions[record.path]
            key = ctx.structure(record.path), description.spec.to_json()  # what the re-randomised checks read
            first = ctx.confirmed_structures.get(key)
            narrowed = dict(self.narrowed)
            if first is not None:
                narrowed["rerandomized"] = False
            try:
                result = confirm(module, description, seed=ctx.seed, **narrowed)
                if not result.ok and result.computed_instead is not None:
                    # describe's aimed inputs (fewer) missed a difference confirm's found, and there the block
                    # computes a neighbour: that neighbour gets the whole check, and replaces the description if
                    # it passes
                    retry = neighbour_description(description, result.computed_instead, "confirm's inputs")
                    second = confirm(module, retry, seed=ctx.seed, **narrowed)
                    if second.ok:
                        description, result = retry, second
                        ctx.descriptions[record.path] = retry
                        record.spec, record.spec_summary = retry.spec.to_dict(), retry.spec.summary()
                        record.method = retry.method
                        key = ctx.structure(record.path), retry.spec.to_json()
            except Exception as exc:  # noqa: BLE001
                record.leave(f"confirmation failed to run: {type(exc).__name__}: {exc}")
            else:
                record.max_abs_error, record.rel_error = result.max_abs_error, result.rel_error
                record.native_max_abs_error = result.native_max_abs_error
                record.native_mean_rel_error = result.native_mean_rel_error
                record.confirm_tokens, record.told_apart = result.tokens, result.told_apart
                if result.checked_on != "cpu":
                    record.method += f"; float32 checks on {result.checked_on} (the block does not run on the CPU)"
                if not result.ok:
                    record.leave(f"replacement disagrees with the original: {result.detail}")
                elif first is not None:
                    record.method += f"; re-randomised checks as {first} (same class, shapes and description)"
                elif narrowed.get("rerandomized", True):
                    ctx.confirmed_structures[key] = record.path or "<root>"
            record.seconds += time.perf_counter() - start
        return False


class FusePass:
    """Replace every confirmed block with a FusedMoE, all at once: if any replacement fails, none is left in."""

    name = "fuse"

    def run(self, ctx: PassContext) -> bool:
        ready = ctx.pending()
        replacements = []
        for record in ready:
            candidate = ctx.candidates[record.path]
            fused = FusedMoE(ctx.descriptions[record.path].spec,
                             ctx.descriptions[record.path].extract(candidate.module), source_path=record.path)
            eval_only = ctx.descriptions[record.path].train_note
            if eval_only is not None:
                fused.eval_only_reason = eval_only
                record.reason = (f"fused for eval mode only: {eval_only}; the FusedMoE raises in train mode")
            fused.train(candidate.module.training)
            fused.router_tap = make_tap(ctx.model, candidate.module)
            hooks.carry_over(candidate.module, fused)
            replacements.append((record, fused))
        swapped: list[tuple[str, nn.Module]] = []
        try:
            for record, fused in replacements:
                if record.path == "":  # the model itself is the block: the FusedMoE becomes the model
                    ctx.model = fused
                    continue
                swapped.append((record.path, ctx.model.get_submodule(record.path)))
                ctx.model.set_submodule(record.path, fused)
        except BaseException:
            for path, original in reversed(swapped):
                ctx.model.set_submodule(path, original)
            raise
        for record, _ in replacements:
            record.decision = "fused"
        return bool(replacements)


ANALYSIS_PASSES = (DetectPass, HooksPass, DescribePass, ConfirmPass)  # read the model, never modify it
DEFAULT_PASSES = ANALYSIS_PASSES + (FusePass,)


class PassManager:
    """Runs passes in order over one context and records each run in the report."""

    def __init__(self, passes=DEFAULT_PASSES):
        self.passes = [p() if isinstance(p, type) else p for p in passes]

    def run(self, ctx: PassContext) -> Report:
        for p in self.passes:
            start = time.perf_counter()
            modified = p.run(ctx)
            ctx.report.passes.append(PassRun(p.name, time.perf_counter() - start, modified))
        return ctx.report
