"""describe's reading of what a block returns besides its hidden states: the routed sum's scaling factor (least
squares), an auxiliary loss's formula and coefficient, and each leaf of a returned structure by its shape (loss,
expert counts, router logits, top-k weights), each checked against what the description computes.

Place in the pipeline: search.py calls these once a router and expert hypothesis reproduce the hidden states.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ...capture import Leaves
from ...reference import (
    Routing,
    aux_loss,
    expert_bias_term,
    expert_counts,
    reference_forward,
    shared_experts,
)
from ...spec import AuxLossSpec, MoESpec, MoEWeights
from .base import rel_err


def fit_scale(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, y_target: torch.Tensor
              ) -> tuple[MoESpec, MoEWeights]:
    """Least-squares scaling factor of the routed sum, rounded to 1.0 when it is within rounding of it."""
    routing_spec = replace(spec, shared=None, extra_output="none", has_output_bias=False, aux_loss=None)
    y_routed, _ = reference_forward(routing_spec, weights, x)
    y_rest = y_target.reshape(y_routed.shape).float()
    if spec.shared is not None:
        y_rest = y_rest - shared_experts(spec, weights, x)
    if spec.has_output_bias:
        y_rest = y_rest - weights.output_bias.float()
    denom = (y_routed.float() * y_routed.float()).sum().item()
    if denom == 0:
        return spec, weights
    c = (y_rest * y_routed.float()).sum().item() / denom
    if abs(c - 1.0) < 1e-5 or not (c > 0):
        return spec, weights
    return replace(spec, router=replace(spec.router, scaling_factor=c)), weights


def _round_number(value: float, digits: int = 3) -> bool:
    """Whether `value` is a number people write as a loss coefficient (0.01, 0.001, 1, 0.02, 1.25e-3: three
    significant digits at most). A wrong loss formula fits the block's loss with an arbitrary ratio."""
    if not math.isfinite(value) or value <= 0:
        return False
    rounded = float(f"{value:.{digits - 1}e}")
    return abs(rounded - value) <= 1e-5 * value


# router z-loss coefficients tried beside the load-balancing one (ST-MoE uses 1e-3; none first)
Z_COEFFICIENTS = (0.0, 1e-3, 1e-4, 5e-4, 2e-3, 5e-3, 1e-2, 1e-1, 1.0)


def fit_aux(spec: MoESpec, logits: torch.Tensor, aux: torch.Tensor) -> MoESpec | None:
    """`spec` with the load-balancing loss (which choices it counts, its coefficient, a router z-loss term) that
    gives the block's loss `aux` on these logits, or None. Top-1 counting first (with k = 1 both read the same); a
    z-loss coefficient from Z_COEFFICIENTS, the load-balancing coefficient then solved and accepted only as a round
    number (aimed inputs and confirm check the pair on other inputs)."""
    z = logits.float().logsumexp(dim=-1).square().mean().item()
    for z_coefficient in Z_COEFFICIENTS:
        for counted in ("top1", "topk"):
            trial = replace(spec, aux_loss=AuxLossSpec(counted=counted))
            value = aux_loss(trial, logits).item()
            ratio = (aux.float().item() - z_coefficient * z) / value if value else math.nan
            if _round_number(ratio):
                return replace(trial, aux_loss=AuxLossSpec(counted=counted, coefficient=float(f"{ratio:.2e}"),
                                                           z_coefficient=z_coefficient))
    return None


def leaf_kind(leaf: torch.Tensor, T: int, E: int, k: int | None) -> str | None:
    """Which of the outputs a fused block computes `leaf` can be, by its shape and dtype."""
    if leaf.dim() == 0 and leaf.is_floating_point():
        return "aux_loss"
    if leaf.dim() == 1 and leaf.numel() == E and (not leaf.is_floating_point() or bool((leaf == leaf.round()).all())):
        return "expert_counts"  # int64 (bincount, DeepSpeed's exp_counts) or whole floats (torch.histc)
    if leaf.dim() and leaf.shape[-1] == E and leaf.numel() == T * E:
        return "router_logits"
    if k is not None and leaf.dim() and leaf.shape[-1] == k and leaf.numel() == T * k:
        return "topk_weights"
    return None


def read_leaves(spec: MoESpec, weights: MoEWeights, routing: Routing, leaves: Leaves
                 ) -> tuple[MoESpec | None, float]:
    """`spec` returning the block's structure (MoESpec.outputs), each leaf read by its shape and checked against
    what the description computes on this routing, and the largest leaf error; (None, inf) where a leaf is none of
    the outputs moecompile computes, or fits no loss formula or counting."""
    T, E, k = routing.logits.shape[0], spec.num_experts, spec.router.top_k
    kinds = [leaf_kind(leaf, T, E, k) for leaf in leaves]
    if None in kinds or kinds.count("aux_loss") > 1 or kinds.count("expert_counts") > 1:
        return None, math.inf

    def named(tree):
        return tuple(named(item) if isinstance(item, tuple) else item if item == "y" else kinds[item]
                     for item in tree)
    try:
        spec = replace(spec, extra_output="none", outputs=named(leaves.tree),
                       aux_loss=AuxLossSpec() if "aux_loss" in kinds else None,
                       expert_counts="top1" if "expert_counts" in kinds else None)
    except ValueError:
        return None, math.inf
    if "aux_loss" in kinds:
        spec = fit_aux(spec, routing.logits, leaves[kinds.index("aux_loss")])
        if spec is None:
            return None, math.inf
    if "expert_counts" in kinds:
        want = leaves[kinds.index("expert_counts")].to(routing.logits.device)
        counted = next((c for c in ("top1", "topk") if torch.equal(
            expert_counts(replace(spec, expert_counts=c), routing), want.long())), None)
        if counted is None:
            return None, math.inf
        spec = replace(spec, expert_counts=counted)
    return spec, max((_leaf_err(kind, spec, weights, routing, leaf) for kind, leaf in zip(kinds, leaves)),
                     default=0.0)


def aux_err(spec: MoESpec, weights: MoEWeights, routing: Routing, aux: torch.Tensor | None) -> float:
    return 0.0 if aux is None else _leaf_err(spec.extra_output, spec, weights, routing, aux)


def _leaf_err(kind: str, spec: MoESpec, weights: MoEWeights, routing: Routing, leaf: torch.Tensor) -> float:
    """How far `leaf` is from the output `kind` the description computes on this routing (counts: 0, read_leaves
    compares them exactly)."""
    if kind == "expert_bias":
        return rel_err(expert_bias_term(spec, weights, routing), leaf.reshape(-1, leaf.shape[-1]).float())
    if kind == "aux_loss":
        return rel_err(aux_loss(spec, routing.logits), leaf.float())
    if kind == "router_logits":
        return rel_err(routing.logits, leaf.reshape(routing.logits.shape).float())
    if kind == "topk_weights":
        got = routing.topk_weights()
        # HF returns the k weights in top-k order; compare as sorted sets so an equal-valued order does not matter
        return rel_err(got.sort(dim=-1).values, leaf.reshape(got.shape).float().sort(dim=-1).values)
    return 0.0
