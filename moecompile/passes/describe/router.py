"""describe's router hypotheses: scoring, selection order, renormalisation, correction bias, expert groups,
capacity and jitter, with k and the scaling factor from the module's attributes, as RouterHypothesis values; and
the router tensors a hypothesis reads.

Place in the pipeline: search.py tries `router_hypotheses(...)` in order (the ops the block ran put the likely forms
first) against the block's output, jointly with the expert hypotheses (experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ...spec import RouterSpec
from ..detect import Candidate, TensorRef
from .tensors import canonical, get_tensor, rel_ref

# module or config attributes that name the router's settings
K_ATTRS = ("top_k", "num_experts_per_tok", "k", "topk", "moe_topk", "num_experts_per_token", "n_activated_experts",
           "num_selected_experts", "experts_per_token")
SCALE_ATTRS = ("routed_scaling_factor", "route_scale", "routed_scaling")
GROUP_ATTRS = ("n_group", "num_group", "num_expert_group", "n_groups")
TOPK_GROUP_ATTRS = ("topk_group", "topk_groups", "num_limited_groups")
JITTER_ATTRS = ("router_jitter_noise", "jitter_eps", "moe_jitter_eps")
CAPACITY_ATTRS = ("expert_capacity",)
# DeepSpeed's TopKGate: eval_capacity_factor applies in eval mode (what optimize reads), capacity_factor in training
CAPACITY_FACTOR_ATTRS = ("eval_capacity_factor", "capacity_factor")
MIN_CAPACITY_ATTRS = ("min_capacity",)


@dataclass(frozen=True, eq=False)
class RouterHypothesis:
    """One reading of the router, in RouterSpec's terms, with the tensor it reads as a correction bias and the
    scaling factors the block declares (tried before a fitted one)."""

    top_k: int | None  # None: ReLU routing (every positive gate)
    scoring: str
    score_order: str
    renormalize: bool = False
    weight_on_input: bool = False
    correction: TensorRef | None = None  # an [E] tensor added to the scores for choice only
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    group_fill: str = "-inf"
    scales: tuple[float, ...] = ()
    selection: str | None = None  # None: from top_k and n_group (all_positive, grouped_topk or topk)
    jitter_eps: float = 0.0
    expert_capacity: int | None = None
    capacity_factor: float | None = None
    min_capacity: int = 0
    capacity_order: str = "token_major"
    renorm_after_drop: bool = False
    capacity_scope: str = "sequence"

    def router_spec(self, num_experts: int, scale: float | None, has_bias: bool) -> RouterSpec:
        """The RouterSpec this reading describes (ValueError where the combination is not one)."""
        selection = self.selection or (
            "all_positive" if self.top_k is None else "grouped_topk" if self.n_group > 1 else "topk")
        return RouterSpec(
            num_experts=num_experts, top_k=self.top_k, scoring=self.scoring, selection=selection,
            score_order=self.score_order, renormalize=self.renormalize,
            renorm_min=1e-20 if self.renormalize else 0.0, scaling_factor=1.0 if scale is None else scale,
            has_bias=has_bias, has_correction_bias=self.correction is not None, n_group=self.n_group,
            topk_group=self.topk_group, group_score=self.group_score, group_fill=self.group_fill,
            weight_on_input=self.weight_on_input, jitter_eps=self.jitter_eps,
            expert_capacity=self.expert_capacity, capacity_factor=self.capacity_factor,
            min_capacity=self.min_capacity, capacity_scope=self.capacity_scope, capacity_order=self.capacity_order,
            renorm_after_drop=self.renorm_after_drop)


def _attr(modules: list[nn.Module], names: tuple[str, ...]):
    for m in modules:
        for holder in (m, getattr(m, "config", None)):
            if holder is None:
                continue
            for n in names:
                v = getattr(holder, n, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield v


def _router_modules(candidate: Candidate) -> list[nn.Module]:
    """The block and every module from it down to a router tensor's owner: where routing attributes live (Switch
    keeps expert_capacity on the router module around its classifier Linear)."""
    modules = [candidate.module]
    for ref in candidate.router:
        rel = rel_ref(candidate, ref)[0]
        parts = rel.split(".") if rel else []
        for depth in range(1, len(parts) + 1):
            sub = candidate.module.get_submodule(".".join(parts[:depth]))
            if all(sub is not m for m in modules):
                modules.append(sub)
    return modules


def router_hypotheses(candidate: Candidate, census: set[str], k_values: list[int]) -> list[RouterHypothesis]:
    """The readings to try, in order: each k the block declares x scoring and selection order x renormalisation x
    weight on the input x each [E] vector as a correction bias x expert groups; the ops the block ran (`census`) put
    the likely forms first; capacity, jitter (sparsemixer) and ReLU readings where the block's attributes or ops
    name them."""
    E = candidate.num_experts
    modules = _router_modules(candidate)
    scales = tuple(dict.fromkeys(float(v) for v in _attr(modules, SCALE_ATTRS)))  # block and config may agree
    n_group = next((int(v) for v in _attr(modules, GROUP_ATTRS) if int(v) > 1 and E % int(v) == 0), 1)
    topk_group = next((int(v) for v in _attr(modules, TOPK_GROUP_ATTRS) if 1 <= int(v) <= n_group), n_group)
    # an expert capacity the block declares (Switch Transformers): describe's inputs are too short to reach it, so
    # it is read from the attribute and exercised by confirm's longer inputs
    capacity = next((int(v) for v in _attr(modules, CAPACITY_ATTRS) if v >= 1), None)
    forms = [("softmax", "score_then_select"), ("softmax", "select_then_score"), ("sigmoid", "score_then_select"),
             ("sigmoid", "select_then_score"), ("none", "select_then_score")]
    if "softplus" in census or not census:
        forms.insert(0, ("sqrtsoftplus", "score_then_select"))
    # The ops the block ran reorder the forms: a sigmoid and no softmax puts sigmoid first.
    forms.sort(key=lambda f: 0 if f[0] in census or (f[0] == "sqrtsoftplus" and "softplus" in census) else 1)
    hyps: list[RouterHypothesis] = []
    for k in k_values:
        for scoring, order in forms:
            for renorm in (False, True):
                if renorm and scoring == "softmax" and order == "select_then_score":
                    continue
                for on_input in (False, True):
                    for corr in [None] + list(candidate.vectors):
                        groups = [(1, 1, "top2_sum", "-inf")]
                        if n_group > 1:  # masked groups at -inf, or at 0.0 (transformers' DeepSeek-V2 family)
                            groups = [(n_group, topk_group, score, fill) for fill in ("-inf", "zero")
                                      for score in ("top2_sum", "max")] + groups
                        for g, tg, gs, fill in groups:
                            if k > tg * E // g:
                                continue
                            hyps.append(RouterHypothesis(
                                top_k=k, scoring=scoring, score_order=order, renormalize=renorm,
                                weight_on_input=on_input, correction=corr, n_group=g, topk_group=tg, group_score=gs,
                                group_fill=fill, scales=scales, expert_capacity=capacity))
    for eps in dict.fromkeys(float(v) for v in _attr(modules, JITTER_ATTRS)):
        if 2 in k_values and E >= 2:
            hyps.append(RouterHypothesis(top_k=2, scoring="softmax", score_order="select_then_score",
                                         scales=scales, selection="sparsemixer", jitter_eps=eps,
                                         expert_capacity=capacity))
    factors = list(dict.fromkeys(float(v) for v in _attr(modules, CAPACITY_FACTOR_ATTRS) if float(v) > 0))
    if factors and capacity is None:  # a capacity from the token count (GShard, DeepSpeed): tried first
        min_capacity = next((int(v) for v in _attr(modules, MIN_CAPACITY_ATTRS) if int(v) >= 0), 0)
        hyps = _capacity_hypotheses(hyps, factors, min_capacity) + hyps
    if "relu" in census or not k_values:
        hyps.insert(0 if "topk" not in census else len(hyps),
                    RouterHypothesis(top_k=None, scoring="relu", score_order="score_then_select", scales=scales,
                                     expert_capacity=capacity))
    return hyps


def _capacity_hypotheses(hyps: list[RouterHypothesis], factors: list[float], min_capacity: int
                         ) -> list[RouterHypothesis]:
    """The plain top-k hypotheses again with a capacity factor: each factor the block declares, choices queued
    token-major or slot-major, renormalised before or after the drop, the capacity per batch or per sequence."""
    out = []
    for h in hyps:
        if h.correction is not None or h.weight_on_input or h.n_group > 1 or h.selection is not None:
            continue
        for factor in factors:
            for order in ("token_major", "slot_major") if h.top_k > 1 else ("token_major",):
                for after in (False, True) if h.renormalize else (False,):
                    for scope in ("batch", "sequence"):
                        out.append(replace(h, capacity_factor=factor, min_capacity=min_capacity,
                                           capacity_order=order, renorm_after_drop=after, capacity_scope=scope))
    return out


def k_candidates(candidate: Candidate) -> list[int]:
    """The k values to try: those the block's modules declare, else 1 to min(E, 8)."""
    E = candidate.num_experts
    modules = _router_modules(candidate)
    declared = []
    for v in _attr(modules, K_ATTRS):
        if float(v).is_integer() and 1 <= int(v) <= E and int(v) not in declared:
            declared.append(int(v))
    return declared or list(range(1, min(E, 8) + 1))


def router_weights(candidate: Candidate, block: nn.Module, hyp: RouterHypothesis) -> dict:
    """The router tensors of `block` as this reading has them: router_weight [E, H], router_bias, correction_bias."""
    ref = candidate.router[0]
    w = get_tensor(block, rel_ref(candidate, ref))
    E = candidate.num_experts
    out = {"router_weight": w if w.shape[0] == E and w.shape[1] == candidate.hidden_size else w.t(),
           "router_bias": None, "correction_bias": None}
    owner_bias = getattr(ref.owner, "bias", None)
    # the router module's `bias` is a router bias (added to the logits) unless this hypothesis reads it as the
    # correction bias (added for choice only: DeepSeek-V3's own Gate calls it `bias`): its role is what it does
    corr = hyp.correction
    bias_is_correction = corr is not None and corr.owner is ref.owner and corr.name == "bias"
    if isinstance(owner_bias, torch.Tensor) and owner_bias.numel() == E and ref.name == "weight" \
            and not bias_is_correction:
        out["router_bias"] = get_tensor(block, (rel_ref(candidate, ref)[0], "bias"))
    if corr is not None:
        bias = get_tensor(block, rel_ref(candidate, corr))
        out["correction_bias"] = bias if bias.dim() == 1 else canonical(bias, bias.reshape(E))
    return out
