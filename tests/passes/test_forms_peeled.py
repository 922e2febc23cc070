"""Ops around the MoE core inside the block: gpt-oss's reference `MLPBlock` normalises its input (its own RMSNorm,
`scale`, eps 1e-5), routes and runs the experts with einsum on gathered weights (interleaved SwiGLU, biases), and
adds the input back. The norm and the residual are peeled off as ops around the fused core. Fused and checked on
4,096 fresh tokens (fp32, normwise relative error 1e-5), gradients included; also a LayerNorm variant without the
residual."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile

H, I, E, K = 32, 24, 8, 2


class RMSNorm(nn.Module):
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


class MLPBlock(nn.Module):
    def __init__(self, norm: nn.Module | None = None, residual: bool = True):
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


FORMS = {
    # softmax over the top-k logits reads as the renormalised top-k of the softmax: the same values
    "gpt_oss_mlp_block": (lambda: MLPBlock(), "rms norm in | softmax>top2 renorm bias | gated clamped_swiglu"),
    "layernorm_no_residual": (lambda: MLPBlock(nn.LayerNorm(H), residual=False),
                              "layer norm in | softmax>top2 renorm bias"),
}


@pytest.mark.parametrize("name", FORMS)
def test_norm_and_residual_peeled_around_the_fused_core(name, quiet):
    build, summary = FORMS[name]
    torch.manual_seed(0)
    block = build().eval()
    fused = moecompile.optimize(block, strict=True)
    record = moecompile.report(fused).blocks[0]
    assert record.decision == "fused" and summary in record.spec_summary, record.spec_summary
    assert fused.spec.residual == block.residual
    x = torch.randn(4096, H)
    with torch.no_grad():
        want, got = block(x), fused(x)
    assert (got - want).norm() / want.norm() < 1e-5
    # the input's gradient goes through the peeled norm and residual too
    grads = []
    for module in (block, fused):
        x_grad = x[:300].clone().requires_grad_(True)
        (module(x_grad) * want[:300]).sum().backward()
        grads.append(x_grad.grad)
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5
