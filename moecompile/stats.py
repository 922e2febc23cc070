"""Routing statistics of an optimized model on the user's batches: per MoE layer, how many experts each token
activates and how the load spreads over the experts.

Place in the pipeline: a measurement on the output of optimize() (any routing; ReLU routing is where it matters,
since the number of experts per token varies); `moecompile stats` prints it. It runs the model on the batches once,
records each FusedMoE's input, and routes it with the reference router in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import MoECompileError
from .fused import FusedMoE
from .passes.routing import MAX_CALIBRATION_TOKENS, active_stats, collect_block_inputs, float_weights
from .reference import route


@dataclass
class LayerStats:
    path: str
    routing: str  # the block's spec summary
    tokens: int
    mean_active: float
    active_p5: float
    active_p50: float
    active_p95: float
    expert_load: list[float]  # share of the (token, expert) pairs each expert took

    def to_dict(self) -> dict:
        return asdict(self)


def routing_stats(model: nn.Module, batches: Iterable, max_tokens: int = MAX_CALIBRATION_TOKENS
                  ) -> list[LayerStats]:
    """Per fused MoE layer of `model`, measured on `batches` (tensors passed positionally, dicts as keywords)."""
    if not any(isinstance(m, FusedMoE) for m in model.modules()):
        raise MoECompileError(f"routing_stats: {type(model).__name__} has no fused MoE block; run "
                              "moecompile.optimize(model) first")
    inputs = collect_block_inputs(model, batches, max_tokens)
    if not inputs:
        raise MoECompileError("routing_stats: the batches reached no MoE block (were they empty?)")
    stats = []
    for path, module in model.named_modules():
        if not isinstance(module, FusedMoE) or path not in inputs:
            continue
        x = inputs[path]
        with torch.no_grad():
            routing = route(module.spec.router, float_weights(module.weights()), x)
        active = routing.active_per_token(x.shape[0])
        load = torch.bincount(routing.expert_index[routing.weight != 0], minlength=module.spec.num_experts).double()
        stats.append(LayerStats(path=path, routing=module.spec.summary(), tokens=x.shape[0],
                                expert_load=(load / load.sum().clamp(min=1)).tolist(), **active_stats(active)))
    return stats


def format_stats(stats: list[LayerStats]) -> str:
    lines = [f"{'layer':<28} {'tokens':>7} {'mean':>6} {'p5':>4} {'p50':>4} {'p95':>4}  load min/max (x uniform)  "
             "routing"]
    for s in stats:
        E = len(s.expert_load)
        lo, hi = min(s.expert_load) * E, max(s.expert_load) * E
        lines.append(f"{s.path:<28} {s.tokens:>7} {s.mean_active:>6.2f} {s.active_p5:>4g} {s.active_p50:>4g} "
                     f"{s.active_p95:>4g}  {lo:.2f} / {hi:.2f}{'':<15} {s.routing}")
    return "\n".join(lines)
