"""Blocks whose train mode differs from their eval mode (router jitter as Switch and Mixtral write it, a training
capacity factor): fused for eval, the pass log says so, and the FusedMoE raises in train mode instead of computing
the eval form silently. A block without such a difference trains as usual."""
from __future__ import annotations

import sys
from pathlib import Path

import handwritten as hw
import pytest
import torch
from torch import nn

import moecompile
from moecompile import MoECompileError

H, I, E, K = 32, 40, 8, 2


class JitterMoE(nn.Module):
    """Mixtral's router jitter: in training the hidden states are scaled by uniform noise before routing."""

    def __init__(self, jitter_noise: float):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))
        self.jitter_noise = jitter_noise

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        weight, index = self.gate(x).softmax(dim=-1).topk(K, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        return hw.loop_over_experts(self.experts, x, index, weight).reshape(shape)


def test_router_jitter_is_fused_for_eval_only(quiet):
    torch.manual_seed(0)
    block = JitterMoE(0.1).eval()
    fused = moecompile.optimize(block, strict=True)
    record = moecompile.report(fused).blocks[0]
    assert record.decision == "fused" and "eval mode only" in record.reason and "random" in record.reason
    x = torch.randn(2, 50, H)
    with torch.no_grad():
        assert (fused(x) - block(x)).norm() / block(x).norm() < 1e-5
    fused.train()
    with pytest.raises(MoECompileError, match="fused for eval mode only.*router_jitter_noise=0"):
        fused(x)


def test_a_training_capacity_factor_is_named(quiet):
    sys.path.insert(0, str(Path(__file__).parent / "describe"))
    from test_forms_capacity import MOELayer

    torch.manual_seed(1)
    block = MOELayer(k=1, capacity_factor=2.0, eval_capacity_factor=0.5, min_capacity=1).eval()
    fused = moecompile.optimize(block, strict=True)
    assert "computes otherwise than its eval mode" in moecompile.report(fused).blocks[0].reason


def test_no_jitter_trains(quiet):
    torch.manual_seed(2)
    block = JitterMoE(0.0).eval()
    fused = moecompile.optimize(block, strict=True)
    assert moecompile.report(fused).blocks[0].reason == ""
    fused.train()
    fused(torch.randn(10, H)).sum().backward()


@pytest.mark.parametrize("family, eval_only", [("phimoe", True), ("switch_transformers", True), ("mixtral", False)])
def test_hf_families_with_training_only_routing(family, eval_only, quiet):
    """PhiMoE samples its sparsemixer choices in training and Switch Transformers jitters its router (both by
    default); Mixtral's jitter is 0 by default."""
    from moecompile import hf_zoo

    optimized = moecompile.optimize(hf_zoo.build(family))
    records = [b for b in moecompile.report(optimized).blocks if b.decision == "fused"]
    assert records and all(("eval mode only" in b.reason) == eval_only for b in records)
