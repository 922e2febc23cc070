"""An independent oracle for the fuzz campaign: what an MoESpec computes, written from spec.py's docstring alone.

Place: benchmarks/fuzz_moe.py compares FusedMoE (the reference on the CPU, the Triton kernels on a GPU) with this.
It shares no code with moecompile/reference.py: float64, every expert evaluated densely per token and combined
through a [T, E] weight matrix, selection by a stable descending sort (exact ties: the lower index first, the
order the kernels use and the one fuzz_moe.py asks of torch.topk). Besides the output it says which tokens are
*ambiguous*: a decision (the k-th against the (k+1)-th choice value, the kept groups against the next, a
sparsemixer threshold) within TIE_TOL of flipping, where float32 rounding in the system under test may decide
either way. Values equal here are ambiguous too (two identical router rows need not give bit-identical float32
logits: a GEMM's vector body and its tail round differently), except where both are the 0.0 that masked groups are
filled with: those ties are exact in every implementation, and the tie rule decides them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIE_TOL = 1e-4  # a decision closer than this (relative to 1 + the size of the values compared) is ambiguous


def _act(name: str, v: torch.Tensor, alpha: float, limit: float, up: torch.Tensor | None) -> torch.Tensor:
    if name == "clamped_swiglu":
        g = v.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1.0) * g * torch.sigmoid(alpha * g)
    if name == "clamped_silu":
        g = v.clamp(max=limit)
        return up.clamp(-limit, limit) * g * torch.sigmoid(g)
    if name == "silu":
        a = v * torch.sigmoid(v)
    elif name == "gelu":
        a = 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    elif name == "gelu_tanh":
        a = 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    elif name == "relu":
        a = v.clamp(min=0)
    elif name == "relu2":
        a = v.clamp(min=0) ** 2
    else:
        raise ValueError(name)
    return a if up is None else a * up


def _mlp(m, x: torch.Tensor, w1, w2, b1, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] -> ([..., H], its magnitude: the same sum over absolute values, the size float rounding scales
    with where the terms cancel); w1 [F, H], w2 [H, I]."""
    h = x @ w1.T + (0 if b1 is None else b1)
    if m.gated:
        gate, up = h[..., :m.intermediate_size], h[..., m.intermediate_size:]
        a = _act(m.activation, gate, m.activation_alpha, m.activation_limit, up)
    else:
        a = _act(m.activation, h, m.activation_alpha, m.activation_limit, None)
    return a @ w2.T + (0 if b2 is None else b2), a.abs() @ w2.abs().T + (0 if b2 is None else b2.abs())


def _score(kind: str, v: torch.Tensor) -> torch.Tensor:
    if kind == "softmax":
        return torch.softmax(v, dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(v)
    if kind == "sqrtsoftplus":
        return torch.sqrt(F.softplus(v))
    if kind == "relu":
        return v.clamp(min=0)
    return v


def _pick(values: torch.Tensor, k: int, exact: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [T, k] of the k largest, lower index first among equals; ambiguous [T]: the k-th and the next
    differ by less than TIE_TOL, unless both are `exact` [T, E] positions)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True)
    idx = order.indices[:, :k]
    if k >= values.shape[-1]:
        return idx, torch.zeros(values.shape[0], dtype=torch.bool)
    kth, nxt = order.values[:, k - 1], order.values[:, k]
    gap = kth - nxt
    scale = 1.0 + torch.maximum(kth.abs(), nxt.abs()).nan_to_num(posinf=0, neginf=0)
    near = (gap >= 0) & (gap < TIE_TOL * scale)
    if exact is not None:
        both = exact.gather(1, order.indices[:, k - 1:k + 1]).all(dim=1)
        near &= ~both
    return idx, near


def route(spec, w: dict, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, E], dense combine weights [T, E] (0 where not chosen, NaN kept), chosen mask [T, E] bool,
    ambiguous [T] bool) -- returned as (logits, dense, chosen, ambiguous)."""
    r = spec.router
    T, E = x.shape[0], r.num_experts
    logits = x @ w["router_weight"].T + (0 if w.get("router_bias") is None else w["router_bias"])
    ambiguous = torch.zeros(T, dtype=torch.bool)
    dense = torch.zeros(T, E, dtype=torch.float64)
    chosen = torch.zeros(T, E, dtype=torch.bool)
    if T == 0:
        return logits, dense, chosen, ambiguous
    rows = torch.arange(T)[:, None]
    if r.selection == "all_positive":
        chosen = (logits > 0) | logits.isnan()  # a NaN gate runs its expert (spec.py): NaN in, NaN out
        dense = torch.where(chosen, logits, torch.zeros_like(logits)) * r.scaling_factor
        if r.weight_on_input:  # expert(0 * x) is not 0: a gate at the threshold decides something
            ambiguous = (logits.abs() < TIE_TOL).any(dim=1)
        return logits, dense, chosen, ambiguous
    if r.selection == "sparsemixer":
        remaining = logits.clone()
        for _ in range(2):
            m, _ = remaining.max(dim=1, keepdim=True)
            pick = torch.sort(remaining, dim=1, descending=True, stable=True).indices[:, :1]
            ratio = (m - logits) / torch.maximum(logits.abs(), m)
            keep = ~(ratio > 2 * r.jitter_eps)  # as PhiMoE writes it: a 0/0 ratio (all logits 0) keeps the expert
            near = ((ratio - 2 * r.jitter_eps).abs() < TIE_TOL) & remaining.isfinite()
            vals = remaining.masked_fill(~keep, float("-inf"))
            weight = torch.softmax(vals, dim=1).gather(1, pick)
            dense[rows, pick] = weight * r.scaling_factor
            chosen[rows, pick] = True
            top = torch.sort(remaining, dim=1, descending=True, stable=True).values
            gap = top[:, 0] - top[:, 1]
            ambiguous |= near.any(dim=1) | ((gap >= 0) & (gap < TIE_TOL * (1 + top[:, 0].abs())))
            remaining = remaining.scatter(1, pick, float("-inf"))
        return logits, dense, chosen, ambiguous
    corr = 0 if w.get("correction_bias") is None else w["correction_bias"]
    if r.score_order == "score_then_select":
        scores = _score(r.scoring, logits)
        choice = scores + corr
    else:
        choice = logits + corr
    if r.selection == "grouped_topk":
        G = r.n_group
        size = E // G
        grouped = choice.view(T, G, size)
        if r.group_score == "max":
            gscore = grouped.max(dim=-1).values
        else:
            top = torch.sort(grouped, dim=-1, descending=True).values
            gscore = top[..., :min(2, size)].sum(dim=-1)
        gidx, gamb = _pick(gscore, r.topk_group)
        ambiguous |= gamb
        keep = torch.zeros(T, G, dtype=torch.bool)
        keep[rows, gidx] = True
        keep = keep[:, :, None].expand(T, G, size).reshape(T, E)
        fill = 0.0 if r.group_fill == "zero" else float("-inf")
        choice = torch.where(keep, choice, torch.full_like(choice, fill))
        exact = ~keep if r.group_fill == "zero" else None
    else:
        exact = None
    idx, amb = _pick(choice, r.top_k, exact)
    ambiguous |= amb
    if r.score_order == "score_then_select":
        weight = scores.gather(1, idx)
    else:
        weight = _score(r.scoring, logits.gather(1, idx))
    if r.renormalize:
        total = weight.sum(dim=1, keepdim=True)
        # raw logits ("none" scores) can sum to about 0: the weights then amplify float32 rounding by
        # sum|w| / |sum w|; past 100 the token is ill-conditioned, counted with the ambiguous ones
        ambiguous |= (weight.abs().sum(dim=1) > 100 * total.abs().flatten())
        weight = weight / torch.clamp(total, min=r.renorm_min)
    weight = weight * r.scaling_factor
    if r.expert_capacity is not None:
        onehot = torch.zeros(T, E, dtype=torch.float64)
        onehot[rows, idx] = 1.0
        count = onehot.view(-1, seq_len, E).cumsum(dim=1).view(T, E)
        weight = weight * (count.gather(1, idx) <= r.expert_capacity)
        # an ambiguous or non-finite token's choice changes what every later token of its sequence keeps
        doubt = (ambiguous | ~x.isfinite().all(dim=1)).view(-1, seq_len)
        ambiguous = (doubt.cumsum(dim=1) > 0).view(T) | ambiguous
    dense[rows, idx] = weight
    chosen[rows, idx] = True
    return logits, dense, chosen, ambiguous


def forward(spec, weights, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """(y [T, H] float64, logits [T, E], ambiguous [T], magnitude [T, H]) for x [T, H] (T a multiple of seq_len):
    magnitude is y's sum taken over absolute values, which bounds what rounding can do to y where terms cancel."""
    w = {n: None if t is None else t.detach().double().cpu() for n, t in weights.items()}
    x = x.detach().double().cpu()
    logits, dense, chosen, ambiguous = route(spec, w, x, seq_len)
    T, H = x.shape
    y = torch.zeros(T, H, dtype=torch.float64)
    mag = torch.zeros(T, H, dtype=torch.float64)
    for e in range(spec.num_experts):
        tokens = chosen[:, e].nonzero().flatten()
        if tokens.numel() == 0:
            continue
        gate = dense[tokens, e][:, None]
        b1 = None if w["b1"] is None else w["b1"][e]
        b2 = None if w["b2"] is None else w["b2"][e]
        if spec.router.weight_on_input:
            out, m = _mlp(spec.experts, gate * x[tokens], w["w1"][e], w["w2"][e], b1, b2)
        else:
            out, m = _mlp(spec.experts, x[tokens], w["w1"][e], w["w2"][e], b1, b2)
            out, m = gate * out, gate.abs() * m
        y[tokens] += out
        mag[tokens] += m
    if spec.shared is not None:
        s, m = _mlp(spec.shared.mlp, x, w["shared_w1"], w["shared_w2"], w["shared_b1"], w["shared_b2"])
        if spec.shared.sigmoid_gate:
            g = torch.sigmoid(x @ w["shared_gate"].T)
            s, m = s * g, m * g
        y, mag = y + s, mag + m
    if spec.has_output_bias:
        y, mag = y + w["output_bias"], mag + w["output_bias"].abs()
    return y, logits, ambiguous, mag
