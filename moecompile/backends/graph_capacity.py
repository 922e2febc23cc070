"""A capacity baked into a compiled graph: GShard/DeepSpeed gating under torch.compile.

Place in the pipeline: the torch.compile backend's reading of a region (graph_blocks.find_blocks), before confirm.
Dynamo computes `capacity = ceil(tokens / E * factor)` in Python and leaves only the number in the graph
(`cumsum(mask) - 1 < 16`, `one_hot(locations, num_classes=16)`); the factor is gone, and the region computes that
capacity only at the token count it was traced for (other token counts run as padded chunks of that shape, and
padding tokens take capacity slots). So the region is read in two steps:
1. the same region with the capacity lifted (the constant raised past any queue position): a plain top-k block
   that any token count reads correctly; describe and confirm read it as usual;
2. that description with `expert_capacity` = the constant, each capacity reading (queue order token-major or
   slot-major, renormalised before or after the drop, per sequence or per call) tried against the real region at
   its traced shape on random and skewed inputs (one expert over capacity for every token); the first that
   reproduces every input, with choices dropped on them, is the description.
The graph runs the block at that shape only (dynamo guards on it), so the description holds wherever it is used;
another token count compiles another graph, read afresh (graph_blocks does not reuse such a description).
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..fused import FusedMoE
from ..passes.compare import output_error
from ..passes.describe import Description
from ..passes.probes import aimed_inputs
from ..passes.routing import float_weights

COMPARE_OPS = {torch.lt, torch.le, operator.lt, operator.le}
LIFT_BYTES = 1 << 28  # the lifted region's [T, E, 2T] dispatch tensor may take this much (float32)
MATCH_RTOL = 1e-4
CHECKS = 4  # random inputs at the traced shape, beside the skewed family


def _compares_with(node: fx.Node, value: int | None = None) -> bool:
    compares = node.op == "call_function" and node.target in COMPARE_OPS or (
        node.op == "call_method" and node.target in ("lt", "le"))
    return compares and len(node.args) == 2 and isinstance(node.args[1], int) and (
        value is None or node.args[1] == value)


def _after_cumsum(node: fx.Node, reach: int = 8) -> bool:
    frontier, seen = [node], set()
    for _ in range(reach):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if any(n.target is torch.cumsum or n.target == "cumsum" for n in frontier):
            return True
    return False


def baked_capacity(nodes: list[fx.Node]) -> int | None:
    """The expert capacity a capacity-factor block's graph holds as a constant (`cumsum(mask) - 1 < capacity`)."""
    return next((n.args[1] for n in nodes if _compares_with(n) and _after_cumsum(n)), None)


def lift(block: nn.Module, capacity: int, tokens: int, num_experts: int) -> str:
    """Raise `capacity` past any queue position (2 x tokens: a second choice queues after every first) in the
    region's graphs (RegionBlock._native / _fp32), in place; "" when done, else why not."""
    lifted = 2 * tokens
    size = tokens * num_experts * lifted * 4
    if size > LIFT_BYTES:
        return (f"reading it needs the region without its capacity, whose [tokens, E, 2 x tokens] dispatch tensor "
                f"would take {size / 2**20:.0f} MB (over {LIFT_BYTES / 2**20:.0f} MB): not read at this token count")
    for graph_module in (block._native, block._fp32):
        for node in graph_module.graph.nodes:
            if _compares_with(node, capacity) and _after_cumsum(node):
                node.args = (node.args[0], lifted)
            elif node.op == "call_function" and node.target is F.one_hot and _after_cumsum(node):
                if node.kwargs.get("num_classes") == capacity:
                    node.kwargs = {**node.kwargs, "num_classes": lifted}
                elif len(node.args) > 1 and node.args[1] == capacity:
                    node.args = (node.args[0], lifted)
        graph_module.recompile()
    return ""


def _readings(description: Description, capacity: int):
    r = description.spec.router
    for scope in ("batch", "sequence"):
        for order in ("token_major", "slot_major"):
            for after in ((False, True) if r.renormalize else (False,)):
                try:
                    router = replace(r, expert_capacity=capacity, capacity_scope=scope, capacity_order=order,
                                     renorm_after_drop=after)
                except ValueError:
                    continue
                yield replace(description.spec, router=router)


@torch.no_grad()
def with_capacity(block: nn.Module, description: Description, capacity: int, shape: tuple[int, ...], seed: int
                  ) -> tuple[Description | None, str]:
    """(the description with the capacity reading that reproduces `block` at `shape`, a note) or (None, why)."""
    spec = description.spec
    if spec.router.top_k is None or spec.router.has_capacity:
        return None, f"the region without its capacity reads as {spec.summary()}, not a top-k router to cap"
    weights = description.extract(block)
    gen = torch.Generator().manual_seed(seed + 13)
    tokens = math.prod(shape[:-1])
    skewed = next(p.x for p in aimed_inputs(spec, float_weights(weights), gen, tokens + 256) if p.name == "skewed")
    inputs = [torch.randn(shape, generator=gen) for _ in range(CHECKS)] + [skewed.reshape(-1, shape[-1])[:tokens]
                                                                         .reshape(shape)]
    wants = [block(x) for x in inputs]
    uncapped = FusedMoE(spec, weights, backend="reference")
    if not any(output_error(uncapped(x), want).rel > MATCH_RTOL for x, want in zip(inputs, wants)):
        return None, f"no choice was dropped at capacity {capacity} on {len(inputs)} inputs of {tokens} tokens"
    for capped in _readings(description, capacity):
        fused = FusedMoE(capped, weights, backend="reference")
        if all(output_error(fused(x), want).within(MATCH_RTOL) for x, want in zip(inputs, wants)):
            note = (f"; capacity {capacity} at {tokens} tokens read from the graph (dynamo computed it from the "
                    f"block's factor), its reading chosen on {len(inputs)} inputs of the traced shape")
            return replace(description, spec=capped, method=description.method + note), note
    return None, (f"no capacity reading (queue order, renormalisation, scope) of capacity {capacity} reproduces the "
                  f"region at {tokens} tokens")
