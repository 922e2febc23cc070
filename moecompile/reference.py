"""Plain PyTorch reference of an `MoESpec`: what every kernel, rewrite and export is checked against.

Place in the pipeline: depends on spec.py only. Routing runs in fp32 (fp64 for fp64 input); each expert runs in the
input's dtype on just
the tokens that chose it (grouped by expert, no work for unchosen pairs); the weighted sum accumulates in fp32.
It is differentiable (autograd flows to the input, the router and the expert weights) and handles zero tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fp8
from .spec import MLPSpec, MoESpec, MoEWeights, NormSpec, RouterSpec


@dataclass
class Routing:
    """The routing of T tokens as P (token, expert, weight) pairs, plus the [T, E] logits.

    For top-k routers P = T*k and the pairs are token-major (token t's k choices are pairs t*k .. t*k+k-1), so
    `weight.view(T, k)` is the per-token combine weights. For ReLU routing P varies with the input.
    """

    logits: torch.Tensor  # [T, E] fp32
    token_index: torch.Tensor  # [P] int64
    expert_index: torch.Tensor  # [P] int64
    weight: torch.Tensor  # [P] fp32
    top_k: int | None

    def topk_weights(self) -> torch.Tensor:
        assert self.top_k is not None, "a variable-k routing has no [T, k] weights"
        return self.weight.view(-1, self.top_k)

    def active_per_token(self, num_tokens: int) -> torch.Tensor:
        return torch.bincount(self.token_index, minlength=num_tokens)

    def slot_weights(self, scaling_factor: float) -> torch.Tensor:
        """The fused op's third output: the [T, k] combine weights, or for ReLU routing the [T, E] scaled gates."""
        return self.logits.relu() * scaling_factor if self.top_k is None else self.topk_weights()


def activation(spec: MLPSpec, x: torch.Tensor) -> torch.Tensor:
    """The elementwise activation of a plain MLP (or of the gate half of a gated one)."""
    name = spec.activation
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    raise ValueError(f"activation {name!r} has no elementwise form")


def glu(spec: MLPSpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Combine the gate and up projections of a gated MLP."""
    if spec.activation == "clamped_swiglu":  # gpt-oss
        gate = gate.clamp(max=spec.activation_limit)
        up = up.clamp(min=-spec.activation_limit, max=spec.activation_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.activation_alpha))
    if spec.activation == "clamped_silu":  # DeepSeek-V4
        return F.silu(gate.clamp(max=spec.activation_limit)) * up.clamp(min=-spec.activation_limit,
                                                                          max=spec.activation_limit)
    return activation(spec, gate) * up


def activate(spec: MLPSpec, h: torch.Tensor) -> torch.Tensor:
    """The first projection's output [..., F] -> the second's input [..., I]: the gate and up halves combined, or
    the activation of a plain MLP."""
    if spec.gated:
        gate, up = h.split(spec.intermediate_size, dim=-1)
        return glu(spec, gate, up)
    return activation(spec, h)


def mlp(spec: MLPSpec, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
        b1: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """One expert in canonical layout: w1 [F, H] (gate rows then up rows when gated), w2 [H, I]."""
    return F.linear(activate(spec, F.linear(x, w1, b1)), w2, b2)


def _score(scoring: str, values: torch.Tensor) -> torch.Tensor:
    if scoring == "softmax":
        return values.softmax(dim=-1)
    if scoring == "sigmoid":
        return values.sigmoid()
    if scoring == "sqrtsoftplus":
        return F.softplus(values).sqrt()
    if scoring == "relu":
        return values.relu()
    return values


def _grouped_topk(router: RouterSpec, choice: torch.Tensor) -> torch.Tensor:
    """Top-k restricted to the best `topk_group` of `n_group` expert groups (DeepSeek-V2/V3)."""
    T, E = choice.shape
    grouped = choice.view(T, router.n_group, E // router.n_group)
    if router.group_score == "max":
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(min(2, E // router.n_group), dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(router.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, E)
    fill = 0.0 if router.group_fill == "zero" else float("-inf")
    return choice.masked_fill(~expert_mask, fill).topk(router.top_k, dim=-1).indices


def _sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer routing as it runs in eval mode: two rounds, each taking the best remaining logit and
    weighing it by a softmax over the logits within a relative gap of 2 * jitter_eps of it."""
    remaining = logits
    picks, picked_weights = [], []
    for _ in range(2):
        best, pick = remaining.max(dim=-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
        picked_weights.append(remaining.masked_fill(far, float("-inf")).softmax(dim=-1).gather(1, pick))
        picks.append(pick)
        remaining = remaining.scatter(1, pick, float("-inf"))
    return torch.cat(picks, dim=1), torch.cat(picked_weights, dim=1)


def capacity_of(router: RouterSpec, group_tokens: int) -> int:
    """Choices an expert takes within a group of tokens (a sequence, or the batch)."""
    if router.expert_capacity is not None:
        return router.expert_capacity
    # DeepSpeed's _capacity: ceil((tokens / E) * capacity_factor), the factor doubled for top-2
    return max(math.ceil((group_tokens / router.num_experts) * (router.capacity_factor * router.top_k)),
               router.min_capacity)


def _within_capacity(idx: torch.Tensor, router: RouterSpec, seq_len: int) -> torch.Tensor:
    """[T, k] mask: whether a choice is among the first `capacity_of` choices of its expert in its group (sequence
    or batch), queued token-major or slot-major. Dropped choices keep their slot with weight 0, so the pairs stay
    token-major."""
    T, k = idx.shape
    if T == 0:
        return torch.ones_like(idx, dtype=torch.float32)
    E = router.num_experts
    group = T if router.capacity_scope == "batch" else seq_len
    onehot = F.one_hot(idx, E)  # [T, k, E]
    if router.capacity_order == "token_major":
        priority = onehot.sum(dim=1).view(-1, group, E).cumsum(dim=1).view(T, E)
        position = priority.gather(1, idx)
    else:  # every token's slot 0 in order, then every slot 1, ...
        queued = onehot.view(-1, group, k, E).transpose(1, 2).reshape(-1, k * group, E).cumsum(dim=1)
        position = queued.view(-1, k, group, E).transpose(1, 2).reshape(T, k, E).gather(2, idx[..., None])[..., 0]
    return (position <= capacity_of(router, group)).to(torch.float32)


def _select(router: RouterSpec, values: torch.Tensor, correction: torch.Tensor | None) -> torch.Tensor:
    """[T, k] indices of the experts chosen on `values` (plus the correction bias, which counts for choice only)."""
    choice = values if correction is None else values + correction
    return choice.topk(router.top_k, dim=-1).indices if router.selection == "topk" else _grouped_topk(router, choice)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def route(router: RouterSpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None = None,
          chosen: torch.Tensor | None = None) -> Routing:
    """Router logits, selection and combine weights for x [T, H], T = sequences * seq_len (one sequence if None).
    `chosen` [T, k] (top-k forms): the experts already selected (the kernels' choice, in their slot order); the
    combine weights are then computed for those, differentiably, without selecting again."""
    acc = _acc_dtype(x)
    bias = None if weights.router_bias is None else weights.router_bias.to(acc)
    # .to(acc): under autocast the GEMM gives bf16/fp16 logits; scores and selection stay in float32 (as the kernels,
    # and HF's softmax(..., dtype=float), compute them)
    logits = F.linear(x.to(acc), weights.router_weight.to(acc), bias).to(acc)
    T = x.shape[0]
    if router.selection == "all_positive":
        gates = logits.relu()
        # a NaN gate (a NaN in the token) runs its expert, so the NaN reaches the output as in the original block
        # (gates * expert(x) over every expert); skipping it would turn a NaN token into a finite one
        token_index, expert_index = ((gates > 0) | gates.isnan()).nonzero(as_tuple=True)
        weight = gates[token_index, expert_index] * router.scaling_factor
        return Routing(logits, token_index, expert_index, weight, None)

    if router.selection == "sparsemixer":
        idx, topk_w = _sparsemixer(logits, router.jitter_eps)
        topk_w = topk_w * router.scaling_factor
        token_index = torch.arange(T, device=x.device).repeat_interleave(2)
        return Routing(logits, token_index, idx.reshape(-1), topk_w.reshape(-1), 2)
    correction = None if weights.correction_bias is None else weights.correction_bias.to(acc)
    if router.score_order == "score_then_select":
        scores = _score(router.scoring, logits)
        idx = _select(router, scores, correction) if chosen is None else chosen
        topk_w = scores.gather(1, idx)
    else:
        idx = _select(router, logits, correction) if chosen is None else chosen
        topk_w = _score(router.scoring, logits.gather(1, idx))
    if router.renormalize and not router.renorm_after_drop:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True).clamp(min=router.renorm_min)
    if router.has_capacity:
        topk_w = topk_w * _within_capacity(idx, router, seq_len or max(T, 1))
    if router.renorm_after_drop:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True).clamp(min=router.renorm_min)
    topk_w = topk_w * router.scaling_factor
    token_index = torch.arange(T, device=x.device).repeat_interleave(router.top_k)
    return Routing(logits, token_index, idx.reshape(-1), topk_w.reshape(-1), router.top_k)


def routed_experts(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Sum over each token's chosen experts, computed expert by expert on its tokens only. Returns [T, H] in at
    least fp32."""
    acc = _acc_dtype(x)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    if routing.expert_index.numel() == 0:
        return out
    order = torch.argsort(routing.expert_index, stable=True)
    tokens_by_expert = routing.token_index[order]
    weight_by_expert = routing.weight[order]
    counts = torch.bincount(routing.expert_index, minlength=spec.num_experts).tolist()
    e_spec, on_input = spec.experts, spec.router.weight_on_input
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = tokens_by_expert[start:start + count]
        w = weight_by_expert[start:start + count, None]
        start += count
        expert_in = x[tokens]
        if on_input:
            expert_in = (expert_in.to(acc) * w).to(x.dtype)
        b1 = None if weights.b1 is None else weights.b1[expert]
        b2 = None if weights.b2 is None else weights.b2[expert]
        expert_out = mlp(e_spec, expert_in, weights.w1[expert], weights.w2[expert], b1, b2).to(acc)
        out = out.index_add(0, tokens, expert_out if on_input else expert_out * w)
    return out


def shared_experts(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    shared = spec.shared
    acc = _acc_dtype(x)
    y = mlp(shared.mlp, x, weights.shared_w1, weights.shared_w2, weights.shared_b1, weights.shared_b2).to(acc)
    if shared.sigmoid_gate:
        y = y * torch.sigmoid(F.linear(x, weights.shared_gate).to(acc))
    return y


def aux_loss(spec: MoESpec, logits: torch.Tensor) -> torch.Tensor:
    """The block's load-balancing loss (spec.aux_loss; see AuxLossSpec) from its router logits [T, E], 0-d fp32 (NaN
    for zero tokens, as a mean over none is)."""
    aux, E = spec.aux_loss, spec.num_experts
    logits = logits.float()
    probs = logits.softmax(dim=-1).mean(dim=0)
    counted = 1 if aux.counted == "top1" else spec.router.top_k
    chosen = logits.topk(min(counted, E), dim=-1).indices
    fraction = F.one_hot(chosen, E).float().sum(dim=1).mean(dim=0)
    loss = aux.coefficient * E * (fraction * probs).sum()
    if aux.z_coefficient:
        loss = loss + aux.z_coefficient * logits.logsumexp(dim=-1).square().mean()
    return loss


def expert_counts(spec: MoESpec, routing: Routing) -> torch.Tensor:
    """[E] int64: tokens per expert, counting each token's first choice (spec.expert_counts "top1") or all its k
    choices ("topk"), before any capacity drop (a dropped choice keeps its pair, weighted 0)."""
    chosen = routing.expert_index.view(-1, routing.top_k)
    chosen = chosen[:, :1] if spec.expert_counts == "top1" else chosen
    return torch.bincount(chosen.reshape(-1), minlength=spec.num_experts)


def expert_bias_term(spec: MoESpec, weights: MoEWeights, routing: Routing) -> torch.Tensor:
    """[T, H]: sum over each token's chosen experts of w_e * b2_e (the part of y a skip-bias-add block returns
    apart), in at least fp32."""
    T = routing.logits.shape[0]
    acc = torch.promote_types(weights.b2.dtype, torch.float32)
    dense = torch.zeros(T, spec.num_experts, dtype=acc, device=routing.logits.device)
    dense = dense.index_put((routing.token_index, routing.expert_index), routing.weight.to(acc), accumulate=True)
    return dense @ weights.b2.to(acc)


def input_norm(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    """The block's input norm (spec.input_norm) of x."""
    return apply_norm(spec.input_norm, weights.norm_weight, weights.norm_bias, x)


def apply_norm(norm: NormSpec, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`norm` of x over its last dimension, in fp32 (fp64 for fp64) and cast back to x's dtype."""
    t = x.to(_acc_dtype(x))
    if norm.kind == "rms":
        t = t * torch.rsqrt(t.square().mean(dim=-1, keepdim=True) + norm.eps)
    else:
        t = (t - t.mean(dim=-1, keepdim=True)) * torch.rsqrt(t.var(dim=-1, keepdim=True, unbiased=False) + norm.eps)
    t = t * weight.to(t.dtype)
    if norm.has_bias:
        t = t + bias.to(t.dtype)
    return t.to(x.dtype)


def reference_forward(spec: MoESpec, weights: MoEWeights, x: torch.Tensor,
                seq_len: int | None = None) -> tuple[torch.Tensor, Routing]:
    """The block on x [T, H]: output [T, H] in x's dtype, and the routing it used. `seq_len` splits the T tokens
    into sequences for an expert capacity (None: one sequence). FP8 expert weights compute dequantized to x's
    dtype, as the kernels' tiles are (fp8.py)."""
    weights = fp8.dequantized(weights, x.dtype)
    if spec.input_norm is not None or spec.residual:
        core = dataclasses.replace(spec, input_norm=None, residual=False)
        x_in = input_norm(spec, weights, x) if spec.input_norm is not None else x
        y, routing = reference_forward(core, weights, x_in, seq_len)
        return (y + x if spec.residual else y), routing
    routing = route(spec.router, weights, x, seq_len)
    y = routed_experts(spec, weights, x, routing)
    if spec.shared is not None:
        y = y + shared_experts(spec, weights, x)
    if spec.has_output_bias:
        y = y + weights.output_bias.to(y.dtype)
    return y.to(x.dtype), routing
