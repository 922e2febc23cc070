"""Hand-written MoE modules in the forms users write, and look-alikes that are not MoE. Shared test fixtures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, H, I, bias=False):
        super().__init__()
        self.w1 = nn.Linear(H, I, bias=bias)
        self.w3 = nn.Linear(H, I, bias=bias)
        self.w2 = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.fc1 = nn.Linear(H, I)
        self.fc2 = nn.Linear(I, H)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def fuse_and_compare(block: nn.Module, x: torch.Tensor, summary: str = "", tol: float = 1e-5):
    """optimize(block, strict=True), its first record fused with `summary` in its description, and every output of
    the fused block (a tensor, or each item of a tuple) within `tol` of the block's on x, normwise relative (for a
    0-d loss: relative). Returns (fused, its outputs, the block's outputs), outputs as tuples."""
    import moecompile

    fused = moecompile.optimize(block, strict=True)
    record = moecompile.report(fused).blocks[0]
    assert record.decision == "fused" and summary in record.spec_summary, record.spec_summary
    with torch.no_grad():
        got, want = fused(x), block(x)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert _structure(got) == _structure(want)
    for g, w in zip(_flat(got), _flat(want)):
        assert g.shape == w.shape and (g.double() - w.double()).norm() <= tol * w.double().norm(), (
            (g.double() - w.double()).norm() / w.double().norm())
    return fused, got, want


def _flat(out) -> list:
    return [leaf for item in out for leaf in (_flat(item) if isinstance(item, tuple) else [item])]


def _structure(out):
    return tuple(_structure(item) if isinstance(item, tuple) else "tensor" for item in out)


def loop_over_experts(experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over each token's chosen experts (idx, w: [T, k]) of w * expert(x), one expert at a time with
    torch.where / index_add_, as most hand-written MoE code does."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(idx == e)
        if token.numel():
            out.index_add_(0, token, expert(x[token]) * w[token, slot, None])
    return out


class ListMoE(nn.Module):
    """Experts as a ModuleList of SwiGLU MLPs, softmax -> top-k -> renormalise, loop with torch.where/index_add_."""

    def __init__(self, H=32, I=48, E=6, k=2):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU(H, I) for _ in range(E))
        self.k = k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return loop_over_experts(self.experts, x, idx, w).reshape(shape)


class EinsumMoE(nn.Module):
    """Stacked weights used with einsum, dense 'compute every expert then mask', top-k before softmax."""

    def __init__(self, H=32, I=40, E=4, k=2):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(E, H) / H**0.5)
        self.w_in = nn.Parameter(torch.randn(E, H, 2 * I) / H**0.5)  # [E, in, out], gate/up concatenated
        self.w_out = nn.Parameter(torch.randn(E, I, H) / I**0.5)
        self.k = k

    def router_logits(self, x):
        return x @ self.gate.t()

    def forward(self, x):  # [T, H] only
        logits = self.router_logits(x)
        top, idx = logits.topk(self.k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, idx, top.softmax(-1))
        h = torch.einsum("th,ehf->etf", x, self.w_in)
        g, u = h.chunk(2, dim=-1)
        y = torch.einsum("eti,eih->eth", F.silu(g) * u, self.w_out)
        return torch.einsum("eth,te->th", y, weights)


class ReluRouterMoE(nn.Module):
    """ReMoE: gates = ReLU(x W_r), every expert with a positive gate runs; plain GELU experts with biases."""

    def __init__(self, H=24, I=32, E=8):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(GeluMLP(H, I) for _ in range(E))

    def forward(self, x):
        gates = F.relu(self.router(x))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + gates[..., e:e + 1] * expert(x)
        return out


class Top1SharedMoE(nn.Module):
    """Top-1 sigmoid router, a shared expert with a sigmoid gate beside the routed ones, 3-D [T, H] input."""

    def __init__(self, H=32, I=24, E=5):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=True)
        self.experts = nn.ModuleList(SwiGLU(H, I) for _ in range(E))
        self.shared_expert = SwiGLU(H, 2 * I)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x))
        w, idx = scores.max(dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = idx == e
            if mask.any():
                out[mask] = expert(x[mask]) * w[mask, None]
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class ExpertChoiceMoE(ListMoE):
    """A real MoE form moecompile does not express: experts choose their top-c tokens (expert-choice routing)."""

    def __init__(self, H=32, I=48, E=4, capacity=2):
        super().__init__(H, I, E, k=1)
        self.capacity = capacity

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(-1)  # [T, E]
        c = min(self.capacity, x.shape[0])
        w, tokens = probs.t().topk(c, dim=-1)  # each expert picks its c best tokens
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out.index_add_(0, tokens[e], expert(x[tokens[e]]) * w[e, :, None])
        return out.reshape(shape)


class ExpertChoiceModel(nn.Module):
    def __init__(self, H=32):
        super().__init__()
        self.layers = nn.ModuleList([Block(ExpertChoiceMoE(H=H), H)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Block(nn.Module):
    """A transformer-ish block holding an MoE at depth: norm -> moe -> residual."""

    def __init__(self, moe: nn.Module, H: int):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.ffn = nn.Sequential(moe)

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class DeepModel(nn.Module):
    def __init__(self, H=32):
        super().__init__()
        self.embed = nn.Linear(8, H)
        self.layers = nn.ModuleList([Block(ListMoE(H=H), H), Block(SwiGLU(H, 64), H), Block(ListMoE(H=H, E=4, k=1), H)])
        self.head = nn.Linear(H, 8)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class TopKPooling(nn.Module):
    """Look-alike: a linear scores tokens, top-k picks which to keep (pooling). Not an MoE."""

    def __init__(self, H=32, E=8, k=2):
        super().__init__()
        self.score = nn.Linear(H, E)
        self.proj = nn.Linear(H, H)
        self.k = k

    def forward(self, x):
        s = self.score(x).softmax(-1)
        w, _ = s.topk(self.k, dim=-1)
        return self.proj(x) * w.sum(-1, keepdim=True)


class Retrieval(nn.Module):
    """Look-alike: a query projection against a memory bank [E, H] and top-k retrieval."""

    def __init__(self, H=32, E=16, k=4):
        super().__init__()
        self.memory = nn.Parameter(torch.randn(E, H))
        self.values = nn.Parameter(torch.randn(E, H))
        self.query = nn.Linear(H, H)
        self.k = k

    def forward(self, x):
        scores = self.query(x) @ self.memory.t()
        w, idx = scores.topk(self.k, dim=-1)
        return (w.softmax(-1).unsqueeze(-1) * self.values[idx]).sum(-2)


class LayerStack(nn.Module):
    """Look-alike: a ModuleList of identical MLPs used in sequence (not experts) beside a [4, H] embedding."""

    def __init__(self, H=32):
        super().__init__()
        self.type_embedding = nn.Parameter(torch.randn(4, H))
        self.mlps = nn.ModuleList(GeluMLP(H, 2 * H) for _ in range(4))

    def forward(self, x):
        for m in self.mlps:
            x = x + m(x)
        return x + self.type_embedding[0]


class RemoteCodeDeepseekMoE(nn.Module):
    """DeepSeek-V3's original remote-code gate (modeling_deepseek.py's MoEGate, "noaux_tc"): sigmoid scores, a
    correction bias for the choice, groups scored by their top-2 sum, and the masked groups filled with 0.0 (not
    -inf) before the top-k, so an expert of a masked group beats a kept one whose biased score is negative.
    `fill` picks the value, to build the -inf neighbour as well."""

    def __init__(self, H=32, I=24, E=16, k=4, n_group=4, topk_group=2, fill=0.0, scale=2.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H) / H**0.5)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
        self.experts = nn.ModuleList(SwiGLU(H, I) for _ in range(E))
        self.k, self.n_group, self.topk_group, self.fill, self.scale = k, n_group, topk_group, fill, scale

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, E = x.shape[0], self.weight.shape[0]
        scores = F.linear(x, self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias.unsqueeze(0)
        group_scores = choice.view(T, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, self.n_group, E // self.n_group).reshape(T, -1)
        tmp_scores = choice.masked_fill(~score_mask.bool(), self.fill)
        _, idx = torch.topk(tmp_scores, k=self.k, dim=-1, sorted=False)
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.scale
        return loop_over_experts(self.experts, x, idx, w).reshape(shape)


class SaturatingGateMoE(ListMoE):
    """Softmax top-k whose router logits are clamped to [-12, 12] first: on random inputs (logits well inside the
    range) it is ListMoE, on saturated logits (|logit| > 12, a few tokens of confirm's "spread" family) it is no
    description moecompile has. Must be left."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).clamp(-12.0, 12.0).softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return loop_over_experts(self.experts, x, idx, w).reshape(shape)


class FlooredChoiceMoE(ListMoE):
    """Sigmoid top-k weights, but the experts are chosen on the logits floored at -2: where several logits are below
    -2 the choice among them is the floor's tie order, not the best logit. Random inputs rarely get there (the k-th
    best logit is seldom below -2); negative logits always do. Must be left."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        _, idx = logits.clamp(min=-2.0).topk(self.k, dim=-1)
        w = logits.sigmoid().gather(1, idx)
        return loop_over_experts(self.experts, x, idx, w).reshape(shape)


class HERouterEinsumMoE(EinsumMoE):
    """EinsumMoE with its router stored [H, E] and applied as x @ W (Llama 4's reference keeps `router_DE`)."""

    def __init__(self, H=32, I=40, E=4, k=2):
        super().__init__(H, I, E, k)
        del self.gate
        self.router_DE = nn.Parameter(torch.randn(H, E) / H**0.5)

    def router_logits(self, x):
        return x @ self.router_DE


class RMSNorm(nn.Module):
    """gpt-oss's reference RMSNorm: fp32 inside, a `scale` parameter."""

    def __init__(self, num_features: int, eps: float = 1e-05):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.scale = nn.Parameter(torch.ones(num_features) + 0.1 * torch.randn(num_features))

    def forward(self, x):
        t, dtype = x.float(), x.dtype
        t = t * torch.rsqrt(torch.mean(t ** 2, dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(dtype)


def swiglu(x, alpha: float = 1.702, limit: float = 7.0):
    x_glu, x_linear = x[..., ::2], x[..., 1::2]
    x_glu = x_glu.clamp(min=None, max=limit)
    x_linear = x_linear.clamp(min=-limit, max=limit)
    out_glu = x_glu * torch.sigmoid(alpha * x_glu)
    return out_glu * (x_linear + 1)


class GptOssMLPBlock(nn.Module):
    """gpt-oss's reference MLPBlock (single device): its own norm, einsum on gathered expert weights (interleaved
    clamped SwiGLU, biases), softmax over the top-k logits, and the input added back."""

    def __init__(self, norm: nn.Module | None = None, residual: bool = True, H=32, I=24, E=8, K=2):
        super().__init__()
        self.num_experts, self.experts_per_token, self.swiglu_limit = E, K, 7.0
        self.norm = norm if norm is not None else RMSNorm(H)
        self.gate = nn.Linear(H, E)
        self.mlp1_weight = nn.Parameter(torch.randn(E, I * 2, H) * H ** -0.5)
        self.mlp1_bias = nn.Parameter(torch.randn(E, I * 2) * 0.1)
        self.mlp2_weight = nn.Parameter(torch.randn(E, H, I) * I ** -0.5)
        self.mlp2_bias = nn.Parameter(torch.randn(E, H) * 0.1)
        self.residual = residual

    def forward(self, x):  # [tokens, H]
        t = self.norm(x)
        g = self.gate(t)
        experts = torch.topk(g, k=self.experts_per_token, dim=-1, sorted=True)
        expert_weights = F.softmax(experts.values, dim=1)
        expert_indices = experts.indices
        mlp1_weight = self.mlp1_weight[expert_indices, ...]
        mlp1_bias = self.mlp1_bias[expert_indices, ...]
        t = torch.einsum("beck,bk->bec", mlp1_weight, t) + mlp1_bias
        t = swiglu(t, limit=self.swiglu_limit)
        mlp2_weight = self.mlp2_weight[expert_indices, ...]
        mlp2_bias = self.mlp2_bias[expert_indices, ...]
        t = torch.einsum("beck,bek->bec", mlp2_weight, t)
        t += mlp2_bias
        t = torch.einsum("bec,be->bc", t, expert_weights)
        return x + t if self.residual else t
