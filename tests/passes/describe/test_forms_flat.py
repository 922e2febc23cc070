"""Flat parameters reshaped in forward: OLMo-core's dropless MoE keeps its router as one [E*H] vector and its
experts as [E*I, H] matrices, viewed per expert in forward. Fused and checked on 4,096 fresh tokens (fp32,
normwise relative error 1e-5). (Routers stored [H, E] and used as x @ W: tests/backends/test_dynamo.py and
test_detect.py.)"""
from __future__ import annotations

import handwritten as hw
import torch
import torch.nn.functional as F
from torch import nn

H, I, E, K = 32, 40, 8, 2


class MoELinearRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = H, E, K
        self.weight = nn.Parameter(torch.randn(E * H) * H ** -0.5)

    def forward(self, x):
        logits = F.linear(x, self.weight.view(self.num_experts, self.d_model))
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), indices


class DroplessMoEMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.d_model, self.hidden_size, self.num_experts = H, I, E
        self.w1 = nn.Parameter(torch.randn(E * I, H) * H ** -0.5)
        self.w2 = nn.Parameter(torch.randn(E * I, H) * I ** -0.5)
        self.w3 = nn.Parameter(torch.randn(E * I, H) * H ** -0.5)

    def forward(self, x, weights, indices):
        w1, w2, w3 = (w.view(self.num_experts, self.hidden_size, self.d_model) for w in (self.w1, self.w2, self.w3))
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)
            if token.numel():
                h = F.silu(x[token] @ w1[e].t()) * (x[token] @ w3[e].t())
                out.index_add_(0, token, (h @ w2[e]) * weights[token, slot, None])
        return out


class OLMoCoreMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = MoELinearRouter()
        self.experts = DroplessMoEMLP()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        weights, indices = self.router(x)
        return self.experts(x, weights, indices).reshape(shape)


def test_flat_router_and_experts_fused(quiet):
    torch.manual_seed(0)
    hw.fuse_and_compare(OLMoCoreMoE().eval(), torch.randn(4, 1024, H),
                        "softmax>top2 renorm | gated silu E=8 H=32 I=40")
