"""A tensor's role read from what it does, never from its name: DeepSeek-V3's own inference code (its `Gate` and
`MoE` modules, rewritten here on one device) keeps the selection-only correction bias as `gate.bias`, beside
`gate.weight`; it must be read as a correction bias (added for choice only), not as a router bias, and the block
fused. Block-level agreement on 4,096 fresh tokens, fp32, normwise relative error 1e-5, with the bias drawn around
-0.3 so that biased scores are often negative."""
from __future__ import annotations

import handwritten as hw
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile


class Gate(nn.Module):
    def __init__(self, dim=32, n_experts=16, topk=4, n_groups=4, topk_groups=2, route_scale=2.5, bias_name="bias"):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups, self.route_scale = topk, n_groups, topk_groups, route_scale
        self.weight = nn.Parameter(torch.randn(n_experts, dim) * dim ** -0.5)
        self.bias_name = bias_name
        self.register_parameter(bias_name, nn.Parameter(torch.randn(n_experts) * 0.1 - 0.3))

    def forward(self, x):
        scores = F.linear(x, self.weight).sigmoid()
        original_scores = scores
        scores = scores + getattr(self, self.bias_name)
        scores = scores.view(x.size(0), self.n_groups, -1)
        group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(self.topk_groups, dim=-1)[1]
        mask = scores.new_ones(x.size(0), self.n_groups, dtype=bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, self.topk, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights *= self.route_scale
        return weights.type_as(x), indices


class Expert(nn.Module):
    def __init__(self, dim, inter):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, inter, bias=False), nn.Linear(inter, dim, bias=False), \
            nn.Linear(dim, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DeepSeekV3MoE(nn.Module):
    def __init__(self, dim=32, inter=24, n_experts=16, bias_name="bias"):
        super().__init__()
        self.dim, self.n_routed_experts = dim, n_experts
        self.gate = Gate(dim, n_experts, bias_name=bias_name)
        self.experts = nn.ModuleList(Expert(dim, inter) for _ in range(n_experts))
        self.shared_experts = Expert(dim, 2 * inter)

    def forward(self, x):
        shape = x.size()
        x = x.view(-1, self.dim)
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts).tolist()
        for i in range(self.n_routed_experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        return (y + self.shared_experts(x)).view(shape)


@pytest.mark.parametrize("bias_name", ["bias", "e_score_correction_bias", "b"])
def test_selection_only_bias_is_read_by_role_under_any_name(bias_name, quiet):
    torch.manual_seed(0)
    block = DeepSeekV3MoE(bias_name=bias_name).eval()
    fused, _, _ = hw.fuse_and_compare(block, torch.randn(4, 1024, 32), "corr_bias")
    assert " bias" not in fused.spec.summary().replace("corr_bias", "")
    assert fused.spec.router.group_fill == "-inf" and fused.spec.router.scaling_factor == 2.5
    assert fused.correction_bias is getattr(block.gate, bias_name)


class ClampedGateEinsumMoE(hw.EinsumMoE):
    """DeepSeek-V4's expert gate: silu of the gate clamped above, times the up clamped to [-limit, limit] (gpt-oss's
    form has alpha and a +1 on up). A limit of 0.5 sits inside the values, so both clamps bite on most tokens."""

    def __init__(self, form: str):
        super().__init__()
        self.limit, self.form = 0.5, form

    def forward(self, x):
        logits = self.router_logits(x)
        top, idx = logits.topk(self.k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, idx, top.softmax(-1))
        g, u = torch.einsum("th,ehf->etf", x, self.w_in).chunk(2, dim=-1)
        g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        h = F.silu(g) * u if self.form == "silu" else (u + 1) * g * torch.sigmoid(1.702 * g)
        y = torch.einsum("eti,eih->eth", h, self.w_out)
        return torch.einsum("eth,te->th", y, weights)


@pytest.mark.parametrize("form, summary", [("silu", "gated clamped_silu"), ("swiglu", "gated clamped_swiglu")])
def test_clamped_gates_told_apart(form, summary, quiet):
    torch.manual_seed(0)
    block = ClampedGateEinsumMoE(form)
    fused, _, _ = hw.fuse_and_compare(block, torch.randn(300, 32), summary)
    assert moecompile.report(fused).blocks[0].spec["experts"]["activation_limit"] == 0.5
