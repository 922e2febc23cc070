"""The entry point: optimize() swaps confirmed MoE blocks for FusedMoE modules; report() returns its log;
rewrite_routing() changes the routing of blocks already fused.

Place in the pipeline: the top of the eager path (cli and __init__ call it; the passes it runs are in passes/, the
torch.compile and ONNX entries in backends/). The input model is left untouched unless
`inplace=True`: the passes run on a structural copy that shares every unchanged parameter and buffer with the input
(as torch.compile's wrapper does), so no weights are duplicated except where a layout had to be rewritten. Either
way, any failure leaves the user's model as it was.
"""

from __future__ import annotations

import copy
import itertools
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

from torch import nn

from .errors import MoECompileError
from .expert_parallel import check_group, shard_experts, unshardable_reason
from .fused import FusedMoE
from .passes.log import PassRun, Report
from .passes.manager import ANALYSIS_PASSES, FusePass, PassContext, PassManager
from .passes.quantize import check_expert_weights
from .passes.quantize import quantize_experts as quantize_pass
from .passes.routing import DEFAULT_COVERAGE, RoutingChange
from .passes.routing import check_options as check_routing_options
from .passes.routing import rewrite_routing as passes_rewrite_routing
from .spec import MoESpec
from .state import kept

_REPORTS: weakref.WeakKeyDictionary[nn.Module, Report] = kept("pipeline: optimize's report by model",
                                                               weakref.WeakKeyDictionary())
_OPTIONS = MappingProxyType({"seed": int, "routing": str, "k": (int, str), "calibration": object, "coverage": float,
                             "progress": object, "expert_parallel": object, "expert_weights": str})


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model`."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _check_options(options: dict) -> dict:
    for key, value in options.items():
        if key not in _OPTIONS:
            raise MoECompileError(f"optimize: unknown option {key!r}; options are {sorted(_OPTIONS)} "
                                  "(and verify, strict, inplace)")
        if not isinstance(value, _OPTIONS[key]):
            wanted = _OPTIONS[key]
            names = " or ".join(t.__name__ for t in (wanted if isinstance(wanted, tuple) else (wanted,)))
            raise MoECompileError(f"optimize: option {key!r} must be {names}, got {type(value).__name__}")
    return options


def optimize(model: nn.Module, *, verify: bool = True, strict: bool = False, inplace: bool = False,
             **options) -> nn.Module:
    """Replace every MoE block of `model` that moecompile can describe and confirm with a `FusedMoE`.

    verify: compare each replacement with the original block on random inputs before swapping it in (a block that
        disagrees is left as it was). With verify=False the spec is still read by execution, but not re-checked.
    strict: raise MoECompileError if any candidate block is left alone (the model is then not changed).
    inplace: rewrite `model` itself instead of returning a rewritten structural copy.
    options: seed (int, default 0) for the random inputs and weights used to read and confirm blocks.
        routing ("relu" | "topk"): rewrite the fused blocks' routing (passes/routing.py); this changes what the model
        computes, and the pass log reports the effect per block. k (int | "auto") for routing="topk";
        calibration: an iterable of model inputs (tensors passed positionally, dicts as keyword arguments) to
        calibrate on; coverage (float, default 0.99): the share of active pairs k="auto" keeps; progress: a
        callable called after each block's rewrite. expert_parallel: a torch.distributed ProcessGroup (or
        torch.distributed.group.WORLD): split each fused block's experts over its ranks (expert_parallel.py); every
        block must be fused and splittable, else nothing is changed. expert_weights ("fp8"): store each fused
        block's routed and shared experts in FP8 with 128 x 128 block scales (passes/quantize.py); this changes
        what the model computes, and the pass log reports each block's output error.

    Returns the optimized model; `moecompile.report(model)` gives the pass log.
    """
    _check_model(model)
    options = _check_options(options)
    target = model if inplace else _structural_copy(model)
    report = Report(model_type=type(model).__name__,
                    options={"verify": verify, "strict": strict, "inplace": inplace, **options})
    ctx = PassContext(model=target, report=report, verify=verify, seed=options.get("seed", 0))
    PassManager(ANALYSIS_PASSES).run(ctx)
    if not report.blocks:
        return _nothing_found(model, report)
    _check_before_changes(report, strict, options)
    PassManager([FusePass]).run(ctx)
    if "routing" in options:
        ctx.model = _rewrite_routing(ctx, model, options)
    if "expert_weights" in options:
        _undo_on_failure(ctx, model, lambda: quantize_pass(ctx.model, report, options["expert_weights"],
                                                           options.get("seed", 0)))
    target = ctx.model  # the FusedMoE itself when the whole model was one block
    _REPORTS[target] = report
    _REPORTS[model] = report
    if options.get("expert_parallel") is not None:
        target = shard_experts(target, options["expert_parallel"])
        _REPORTS[target] = report
    if report.left:
        warnings.warn(f"moecompile: {len(report.left)} of {len(report.blocks)} MoE blocks left as they were; "
                      "see moecompile.report(model)", stacklevel=2)
    return target


def _check_model(model: nn.Module) -> None:
    """Refuse what optimize cannot read: not a module, no parameters, parameters on the meta device."""
    if not isinstance(model, nn.Module):
        raise MoECompileError(f"optimize: expected a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise MoECompileError(f"optimize: {type(model).__name__} has no parameters; pass the model, not its class "
                              "or an empty container")
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise MoECompileError(f"optimize: {len(on_meta)} parameters of {type(model).__name__} are on the meta device "
                              f"(e.g. {on_meta[0]}): they hold no values, so no block can be read or checked. Load "
                              "the weights first (from_pretrained, or load_state_dict(..., assign=True)), then "
                              "optimize")


def _nothing_found(model: nn.Module, report: Report) -> nn.Module:
    """The model unchanged, with a report and a warning saying what moecompile looked for."""
    report.message = (f"no MoE block found in {type(model).__name__}: nothing was changed. moecompile looks for "
                      "a router weight [E, H] beside E experts (a ModuleList of MLPs or [E, ...] weights)")
    warnings.warn("moecompile: " + report.message, stacklevel=3)
    _REPORTS[model] = report
    return model


def _check_before_changes(report: Report, strict: bool, options: dict) -> None:
    """strict=True with a block left, or routing options that cannot run: raise before anything is swapped."""
    left = [b for b in report.blocks if b.decision == "left"]
    if strict and left:
        lines = "; ".join(f"layer {b.path or '<root>'}: {b.reason}" for b in left)
        raise MoECompileError(f"optimize(strict=True): {len(left)} MoE block(s) left alone: {lines}. "
                              "Pass strict=False to keep them as they are")
    if options.get("expert_parallel") is not None:
        if "expert_weights" in options:
            raise MoECompileError("optimize: expert_parallel and expert_weights together are not supported yet "
                                  "(the shards would split the FP8 block scales); pass one of them")
        _check_shardable(report, options["expert_parallel"])
    if "expert_weights" in options:
        check_expert_weights(options["expert_weights"])
    if "routing" in options:
        try:
            check_routing_options(options["routing"], options.get("k"), options.get("coverage", DEFAULT_COVERAGE))
        except MoECompileError as exc:
            raise MoECompileError(f"optimize: {exc}") from None


def _check_shardable(report: Report, group) -> None:
    """expert_parallel: every block fused and splittable over the group, checked before anything is swapped."""
    world = check_group(group)
    for record in report.blocks:
        where = record.path or "<root>"
        if record.decision == "left":
            raise MoECompileError(f"optimize(expert_parallel=...): block {where} is left as it was ({record.reason}); "
                                  "expert parallelism needs every MoE block fused, so nothing was changed")
        reason = unshardable_reason(MoESpec.from_dict(record.spec), world)
        if reason is not None:
            raise MoECompileError(f"optimize(expert_parallel=...): block {where}: {reason}; nothing was changed")


def _rewrite_routing(ctx: PassContext, model: nn.Module, options: dict) -> nn.Module:
    """The routing pass after the fuse pass; on failure the fused copy is dropped (inplace: the swap is undone)."""
    return _undo_on_failure(ctx, model, lambda: _routing_pass(
        ctx.model, ctx.report, options["routing"], k=options.get("k"), calibration=options.get("calibration"),
        coverage=options.get("coverage", DEFAULT_COVERAGE), progress=options.get("progress"))[0])


def _undo_on_failure(ctx: PassContext, model: nn.Module, run: Callable):
    """run() for a pass after the fuse pass; if it raises, the fused copy is dropped (inplace: the original blocks
    are put back) and the error goes on."""
    try:
        return run()
    except BaseException:
        if ctx.model is model:  # inplace: put the original blocks back
            for record in ctx.report.fused:
                if record.path:
                    model.set_submodule(record.path, ctx.candidates[record.path].module)
        raise


def _routing_pass(model: nn.Module, rep: Report | None, routing: str, **options
                  ) -> tuple[nn.Module, list[RoutingChange]]:
    start = time.perf_counter()
    target, changes = passes_rewrite_routing(model, routing, **options)
    if rep is not None:
        record_routing(rep, target, changes, f"{routing}: {len(changes)} blocks", time.perf_counter() - start)
    if any(c.note.startswith("no calibration") for c in changes):
        warnings.warn("moecompile: routing='relu' without calibration data: the ReLU routers start at threshold 0; "
                      "the model is a starting point for training, not a replacement for the top-k model",
                      stacklevel=4)
    return target, changes


def record_routing(rep: Report, model: nn.Module, changes: list[RoutingChange], note: str, seconds: float = 0.0,
                   name: str = "routing") -> None:
    """Write each block's routing change (and its new spec) into its record, and the pass into the log."""
    by_path = {c.path: c for c in changes}
    for record in rep.fused:
        change = by_path.get(record.path)
        if change is not None:
            spec = model.get_submodule(record.path).spec
            record.routing_change, record.routing_summary = asdict(change), change.summary()
            record.spec, record.spec_summary = spec.to_dict(), spec.summary()
    rep.passes.append(PassRun(name, seconds, True, note))


def rewrite_routing(model: nn.Module, routing: str, *, k: int | str | None = None, calibration: Iterable | None = None,
                    coverage: float = DEFAULT_COVERAGE, progress: Callable[[], None] | None = None
                    ) -> tuple[nn.Module, list[RoutingChange]]:
    """Rewrite the routing of an optimized model's fused blocks in place (passes/routing.py): routing="relu"
    (TopK -> ReLU, calibrated on `calibration` batches) or "topk" (ReLU -> TopK with k an int or "auto"). The
    model's pass log (`moecompile.report(model)`) gets each block's measured effect. On error the model is
    unchanged. Returns the model (a new FusedMoE when the model is a single block) and one RoutingChange per
    block."""
    rep = _REPORTS.get(model)
    target, changes = _routing_pass(model, rep, routing, k=k, calibration=calibration, coverage=coverage,
                                    progress=progress)
    if rep is not None:
        _REPORTS[target] = rep
    return target, changes


def quantize_experts(model: nn.Module, expert_weights: str = "fp8", *, seed: int = 0) -> nn.Module:
    """Store an optimized model's fused experts in `expert_weights` ("fp8": float8_e4m3fn with 128 x 128 block
    scales), in place, as optimize(..., expert_weights=...) does; the pass log (`moecompile.report(model)`) gets
    each block's output error against the block before. On error the model is unchanged. Returns the model."""
    rep = _REPORTS.get(model)
    if rep is None and not any(isinstance(m, FusedMoE) for m in model.modules()):
        raise MoECompileError("quantize_experts: the model has no fused MoE blocks; run moecompile.optimize first")
    quantize_pass(model, rep, expert_weights, seed)
    return model


def report(model: nn.Module) -> Report:
    """The report of the last optimize() of `model` (the input or the returned model), of the graphs that
    torch.compile(model, backend="moecompile") compiled so far, or of its experts modules running with
    experts_implementation="moecompile" (hf_experts.py)."""
    try:
        return _REPORTS[model]
    except KeyError:
        pass
    from .backends.dynamo import graph_report

    compiled = graph_report(model)
    if compiled is not None:
        return compiled
    from .hf_experts import experts_report

    experts = experts_report(model)
    if experts is not None:
        return experts
    if hasattr(model, "_orig_mod"):  # a torch.compile wrapper: the backend saw no graph holding its parameters
        raise MoECompileError(
            f"report: torch.compile handed the moecompile backend no graph holding {type(model._orig_mod).__name__}'s "
            "parameters: either the compiled model has not run yet, or dynamo traced none of its blocks (it skips a "
            "frame it cannot trace, e.g. experts under torch.utils.checkpoint, a nested torch.compile, parametrized "
            "weights; torch._dynamo.explain(model)(x) lists why). Fix: run moecompile.optimize(model) before "
            "torch.compile")
    raise MoECompileError(f"report: {type(model).__name__} has not been through moecompile.optimize() or "
                          "torch.compile(backend='moecompile'); call optimize(model) first, or run the compiled "
                          "model once")
