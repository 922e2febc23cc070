"""The torch.compile backend "moecompile": MoE blocks in each graph dynamo captures are fused, then Inductor compiles
the graph (or, with options={"inductor": False}, it runs eagerly).

Place in the pipeline: the compile-time entry, beside optimize() (eager.py). Registered through the
`torch_dynamo_backends` entry point (pyproject.toml), so `torch.compile(model, backend="moecompile")` works without
importing moecompile; `moecompile.backend(**options)` gives a configured one. A graph without an MoE block goes to
Inductor unchanged, with the same mode and options. What the backend did is in `moecompile.report(compiled_model)`
(one Report per compiled graph, merged), and with MOECOMPILE_LOG=1 each graph's pass log is printed as it compiles.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ..errors import MoECompileError
from ..passes.log import PassRun, Report
from ..state import kept
from .graph_blocks import find_blocks, rewrite_graph

BACKEND_OPTIONS = {"inductor": bool, "verify": bool, "seed": int}
# a graph's message when it holds no router at all (find_blocks names a router or block it found and could not read)
NO_MOE_BLOCK = ("no MoE block in this graph. A block split by graph breaks (a per-expert loop over data-dependent "
                "expert ids, HF's eager experts) is not found at graph level: run moecompile.optimize(model) before "
                "torch.compile to fuse it")

# (weak references to a graph's parameters, its report), so report(compiled_model) can find the graphs of a model;
# entries whose model is gone are dropped as new graphs compile
_GRAPH_REPORTS: list[tuple[list[weakref.ref], Report]] = kept("backends.dynamo: a report per compiled graph", [])


def _split_options(options: dict | None) -> tuple[dict, dict]:
    """moecompile's own options, and the rest (Inductor's config options)."""
    ours, inductor = {}, {}
    for key, value in (options or {}).items():
        if key in BACKEND_OPTIONS:
            if not isinstance(value, BACKEND_OPTIONS[key]):
                raise MoECompileError(f"backend option {key!r} must be {BACKEND_OPTIONS[key].__name__}, got "
                                      f"{type(value).__name__}")
            ours[key] = value
        else:
            inductor[key] = value
    return ours, inductor


def _inductor(gm: fx.GraphModule, example_inputs: list, mode: str | None, inductor_options: dict):
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches) if patches else compile_fx(gm, example_inputs)


def moecompile_backend(gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                       options: dict | None = None) -> Callable:
    """The registered backend: torch.compile(model, backend="moecompile", mode=..., options={...})."""
    ours, inductor_options = _split_options(options)
    start = time.perf_counter()
    report = Report(model_type=f"graph {gm.meta.get('dynamo_compile_id', '')}".strip(),
                    options={**ours, "mode": mode})
    blocks = find_blocks(gm, example_inputs, report, verify=ours.get("verify", True), seed=ours.get("seed", 0))
    fused = rewrite_graph(gm, blocks) if blocks else 0
    report.passes.append(PassRun("graph fuse", time.perf_counter() - start, bool(fused),
                                 f"{fused} of {len(report.blocks)} blocks"))
    if not report.blocks and not report.message:
        report.message = NO_MOE_BLOCK
    params = [weakref.ref(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    _GRAPH_REPORTS[:] = [(refs, rep) for refs, rep in _GRAPH_REPORTS if any(r() is not None for r in refs)]
    if params:
        _GRAPH_REPORTS.append((params, report))
    if os.environ.get("MOECOMPILE_LOG", "0") not in ("", "0"):
        print(report.table(), file=sys.stderr)
    if not ours.get("inductor", True):
        return gm.forward
    return _inductor(gm, example_inputs, mode, inductor_options)


def backend(**options: Any) -> Callable:
    """A configured backend: torch.compile(model, backend=moecompile.backend(inductor=False, verify=True)).
    Options: inductor (bool, default True), verify (bool), seed (int), and any Inductor config option."""
    ours, _ = _split_options(options)

    def configured(gm, example_inputs, **kwargs):
        merged = {**options, **(kwargs.pop("options", None) or {})}
        return moecompile_backend(gm, example_inputs, options=merged, **kwargs)

    configured.__name__ = "moecompile_backend_configured"
    return configured


def graph_report(model: torch.nn.Module) -> Report | None:
    """The merged report of the graphs compiled for `model` (a torch.compile'd module or its original)."""
    root = getattr(model, "_orig_mod", model)
    ids = {id(p) for p in root.parameters()}
    found = [rep for refs, rep in _GRAPH_REPORTS if any((r() is not None and id(r()) in ids) for r in refs)]
    if not found:
        return None
    with_blocks = [rep for rep in found if rep.blocks]
    message = f"torch.compile backend 'moecompile': {len(found)} graph(s), {len(with_blocks)} with MoE blocks"
    if not with_blocks:  # the graphs that name a router or block they could not read say the most
        named = [rep.message for rep in found if rep.message and rep.message != NO_MOE_BLOCK]
        message += ". " + ("; ".join(dict.fromkeys(named)) or found[-1].message)
    merged = Report(model_type=type(root).__name__, options=found[-1].options, message=message)
    for rep in found:
        merged.blocks.extend(rep.blocks)
        merged.passes.extend(rep.passes)
    return merged


def _register_without_entry_point() -> None:
    """Where moecompile runs from a source tree (PYTHONPATH, no installed metadata), the entry point does not exist;
    importing moecompile then registers the name itself. Installed, the entry point does it (registering here too
    would collide with torch's own registration when it loads the entry point)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:  # our own metadata only: scanning every installed package's entry points costs ~15 ms at import
        if any(ep.group == "torch_dynamo_backends" for ep in distribution("moecompile").entry_points):
            return
    except PackageNotFoundError:
        pass
    # only here: importing dynamo's registry imports dynamo itself (~0.9 s), which an installed moecompile leaves
    # to torch.compile
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "moecompile" not in _COMPILER_FNS:
        register_backend(compiler_fn=moecompile_backend, name="moecompile")


_register_without_entry_point()
