"""Inputs aimed at routing's rare branches, and the neighbouring descriptions they must tell apart.

Place in the pipeline: describe (refine) and confirm weigh a block against its description on these. Random hidden
states rarely reach the branches that separate one description from its neighbours: a masked group's expert beating
a chosen one needs negative biased scores, renormalisation shows only where weights do not already sum to one, a
capacity only when an expert overflows. So the inputs are built from the block's own router weight W [E, H]:
hidden states solved for target router logits L (x = (L - b) pinv(W)^T, plus random noise in W's null space, so the
experts still see varied inputs), in families:

    random        x ~ N(0, 1), no aim
    negative      L ~ N(-4, 1): scores near 0; with a negative correction bias every biased score is negative
    spread        L ~ N(0, (4s)^2): saturated softmax, wide margins
    near_tie      the k-th and (k+1)-th logits 1e-3 s apart, in both orders (ReLU routing: logits +-1e-3 s of 0);
                  the gap is far above float32 rounding, so the block and the description must agree
    skewed        +6s on one expert and +3s on another for every token: one expert overflows any capacity, most
                  experts get no rows
    group_peaks   (grouped routers) half the groups hold one peak, half two lower peaks: max and top-2-sum group
                  scores choose different groups, and the top-k without groups spans more groups than are kept

(s: the logits' standard deviation on random inputs, at least 1.) A neighbour is the description with one field
changed (the fill of masked groups, renormalisation, score order, scoring, k, the role of a bias, capacity,
scaling, group scoring); `told_apart` counts the tokens on which the reference routes a neighbour differently,
which is the evidence a check on those tokens gives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..reference import Routing, route
from ..spec import MoESpec, MoEWeights, RouterSpec

SEQ_LEN = 256  # tokens a sequence in the aimed batches (a capacity counts per sequence)
TIE_GAP = 1e-3  # near_tie's gap, in units of the logits' spread
ROUTE_ATOL = 1e-6  # combine weights that differ by more (relative to the token's largest) route differently


@dataclass(frozen=True)
class Probe:
    """One family of aimed inputs: [B, S, H] float32 hidden states."""

    name: str
    x: torch.Tensor


def aimed_inputs(spec: MoESpec, weights: MoEWeights, gen: torch.Generator, tokens: int = 512) -> list[Probe]:
    """The families of the module docstring, `tokens` each (random: twice that), on the CPU in float32, built from
    `weights` (canonical, float32, CPU)."""
    r = spec.router
    E, H = spec.num_experts, spec.hidden_size
    W = weights.router_weight.detach().double().cpu()
    bias = torch.zeros(E, dtype=torch.float64) if weights.router_bias is None else \
        weights.router_bias.detach().double().cpu()
    pinv_t = torch.linalg.pinv(W).T  # [E, H]: x = L pinv(W)^T gives x W^T = L where W has full row rank

    def sequences(n: int) -> tuple[int, int]:
        seq = min(SEQ_LEN, n)
        return max(1, n // seq), seq

    def solve(name: str, logits: torch.Tensor) -> Probe:
        noise = torch.randn(logits.shape[0], H, generator=gen, dtype=torch.float64)
        x = (logits - bias) @ pinv_t + noise - (noise @ W.T) @ pinv_t
        B, S = sequences(logits.shape[0])
        return Probe(name, x[:B * S].float().reshape(B, S, H))

    spread = max(1.0, (torch.randn(256, H, generator=gen, dtype=torch.float64) @ W.T).std().item())

    def normal(n: int, mean: float, std: float) -> torch.Tensor:
        return torch.randn(n, E, generator=gen, dtype=torch.float64) * std + mean

    B, S = sequences(2 * tokens)
    probes = [Probe("random", torch.randn(B, S, H, generator=gen)),
              solve("negative", normal(tokens, -4.0, 1.0)),
              solve("spread", normal(tokens, 0.0, 4 * spread))]
    ties = normal(tokens, 0.0, spread)
    gap = TIE_GAP * spread
    signs = torch.where(torch.arange(tokens) % 2 == 0, 1.0, -1.0).double()
    if r.is_variable_k:  # the ReLU threshold: half the logits just above 0, half just below
        ties = signs[:, None] * gap * torch.where(torch.rand(tokens, E, generator=gen) < 0.5, 1.0, -1.0).double()
        probes.append(solve("near_tie", ties))
    elif r.top_k < E:
        order = ties.argsort(dim=1, descending=True)
        rows = torch.arange(tokens)
        kth = ties[rows, order[:, r.top_k - 1]]
        ties[rows, order[:, r.top_k]] = kth - signs * gap
        probes.append(solve("near_tie", ties))
    if E > 1:
        skew = normal(tokens, 0.0, spread)
        hot = torch.randperm(E, generator=gen)[:2]
        skew[:, hot[0]] += 6 * spread
        skew[:, hot[1]] += 3 * spread
        probes.append(solve("skewed", skew))
    if r.selection == "grouped_topk" and E // r.n_group >= 2:
        probes.append(solve("group_peaks", _group_peaks(r, tokens, spread, gen)))
    return probes


def _group_peaks(r: RouterSpec, tokens: int, spread: float, gen: torch.Generator) -> torch.Tensor:
    size = r.num_experts // r.n_group
    logits = torch.full((tokens, r.n_group, size), -2.0 * spread, dtype=torch.float64)
    logits += 0.1 * spread * torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    for t in range(tokens):
        groups = torch.randperm(r.n_group, generator=gen)
        for i, g in enumerate(groups.tolist()):
            members = torch.randperm(size, generator=gen)
            if i % 2 == 0:  # one high peak: the best max, a poor top-2 sum
                logits[t, g, members[0]] = 2.0 * spread
            else:  # two lower peaks: a poorer max, the best top-2 sum
                logits[t, g, members[:2]] = 1.5 * spread
    return logits.reshape(tokens, r.num_experts)


# ---------------------------------------------------------------------------------------------- neighbours


@dataclass(frozen=True)
class Neighbour:
    """The description with one field changed. `bias_roles`: which bias the neighbour adds where, as
    (router_bias source, correction_bias source) names among "router_bias", "correction_bias", None."""

    label: str
    spec: MoESpec
    bias_roles: tuple[str | None, str | None] = ("router_bias", "correction_bias")

    def weights(self, weights: MoEWeights) -> MoEWeights:
        def source(name):
            return None if name is None else getattr(weights, name)
        router_bias, correction_bias = (source(n) for n in self.bias_roles)
        return dataclasses.replace(weights, router_bias=router_bias if self.spec.router.has_bias else None,
                                   correction_bias=correction_bias if self.spec.router.has_correction_bias else None)


def neighbours(spec: MoESpec) -> list[Neighbour]:
    """The descriptions one router field away from `spec` (module docstring), each a valid spec."""
    r = spec.router
    found: list[Neighbour] = []

    def add(label: str, bias_roles=("router_bias", "correction_bias"), **changes) -> None:
        try:
            router = dataclasses.replace(r, **changes)
        except ValueError:
            return  # not a valid description
        if router != r:
            found.append(Neighbour(label, dataclasses.replace(spec, router=router), bias_roles))

    if r.scaling_factor != 1.0:
        add("no routing scale", scaling_factor=1.0)
    if r.has_bias:
        add("no router bias", has_bias=False)
        if not r.has_correction_bias:
            add("the router bias used for the choice only", ("correction_bias", "router_bias"), has_bias=False,
                has_correction_bias=True)
    if r.is_variable_k or r.selection == "sparsemixer":
        if r.selection == "sparsemixer":
            add("twice the jitter", jitter_eps=2 * r.jitter_eps or 0.01)
        return found
    add("renormalised" if not r.renormalize else "not renormalised", renormalize=not r.renormalize,
        renorm_min=r.renorm_min or 1e-20)
    add("the other score order", score_order="select_then_score" if r.score_order == "score_then_select"
        else "score_then_select")
    for scoring in ("softmax", "sigmoid", "sqrtsoftplus", "none"):
        if scoring != r.scoring:
            add(f"{scoring} scores", scoring=scoring)
    for k in (r.top_k - 1, r.top_k + 1):
        add(f"k={k}", top_k=k)
    if r.has_correction_bias:
        add("no correction bias", has_correction_bias=False)
        if not r.has_bias:
            add("the correction bias added to the logits", ("correction_bias", "router_bias"), has_bias=True,
                has_correction_bias=False)
    if r.capacity_factor is not None:
        add("no expert capacity", capacity_factor=None, min_capacity=0, renorm_after_drop=False)
        for factor in (r.capacity_factor / 2, r.capacity_factor * 2):
            add(f"capacity factor {factor:g}", capacity_factor=factor)
        if r.top_k > 1:
            add("the other capacity order", capacity_order="slot_major" if r.capacity_order == "token_major"
                else "token_major")
        if r.renormalize:
            add("renormalised before the drop" if r.renorm_after_drop else "renormalised after the drop",
                renorm_after_drop=not r.renorm_after_drop)
        add("the capacity per sequence" if r.capacity_scope == "batch" else "the capacity per batch",
            capacity_scope="sequence" if r.capacity_scope == "batch" else "batch")
    elif r.expert_capacity is None:
        add("an expert capacity of 1", expert_capacity=1)
    else:
        add("no expert capacity", expert_capacity=None)
        for c in (r.expert_capacity - 1, r.expert_capacity + 1):
            add(f"expert capacity {c}", expert_capacity=c)
    if r.selection == "grouped_topk":
        add("masked groups at 0.0" if r.group_fill == "-inf" else "masked groups at -inf",
            group_fill="zero" if r.group_fill == "-inf" else "-inf")
        add("the other group score", group_score="max" if r.group_score == "top2_sum" else "top2_sum")
        for g in (r.topk_group - 1, r.topk_group + 1):
            add(f"{g} groups kept", topk_group=g)
        add("no groups", selection="topk", n_group=1, topk_group=1, group_fill="-inf")
    return found


def dense_routing(routing: Routing, num_tokens: int, num_experts: int) -> torch.Tensor:
    """[T, E] combine weights (0 where an expert is not chosen) in float64."""
    dense = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    return dense.index_put_((routing.token_index.cpu(), routing.expert_index.cpu()),
                            routing.weight.detach().double().cpu(), accumulate=True)


def routed_differently(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] bool: tokens whose dense routings (dense_routing) differ. Rows with NaN count as the same (a NaN input
    routes arbitrarily in any description)."""
    scale = a.abs().amax(dim=1).clamp(min=1.0)
    differ = (a - b).abs().amax(dim=1) > ROUTE_ATOL * scale
    return differ & a.isfinite().all(dim=1) & b.isfinite().all(dim=1)


def route_probe(spec: MoESpec, weights: MoEWeights, probe: Probe) -> torch.Tensor:
    """The description's dense routing of a probe's tokens (sequences of the probe's length, for a capacity)."""
    x = probe.x.reshape(-1, probe.x.shape[-1])
    with torch.no_grad():
        routing = route(spec.router, weights, x, probe.x.shape[-2])
    return dense_routing(routing, x.shape[0], spec.num_experts)
