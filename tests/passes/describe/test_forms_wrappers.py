"""Wrappers users put around MoE code: experts called through `torch.utils.checkpoint`, a `torch.compile`-decorated
forward, experts whose weights are parametrized (weight norm: fused for eval mode only, since the fused block holds
the computed weights), and a block that runs its own autocast region (fused with the same region). Fused ones
are checked on 4,096 fresh tokens (fp32, normwise relative error 1e-5)."""
from __future__ import annotations

import handwritten as hw
import pytest
import torch
from torch import nn

import moecompile

H, I, E, K = 32, 40, 8, 2


def softmax_top2(logits):
    weight, index = logits.softmax(dim=-1).topk(K, dim=-1)
    return weight / weight.sum(dim=-1, keepdim=True), index


class CheckpointedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        weight, index = softmax_top2(self.gate(x))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                y = torch.utils.checkpoint.checkpoint(expert, x[token], use_reentrant=False)
                out.index_add_(0, token, y * weight[token, slot, None])
        return out.reshape(shape)


class CompiledForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))

    @torch.compile(backend="eager")
    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        weight, index = softmax_top2(self.gate(x))
        return hw.loop_over_experts(self.experts, x, index, weight).reshape(shape)


class OwnAutocast(CheckpointedExperts):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            shape = x.shape
            x = x.reshape(-1, H)
            weight, index = softmax_top2(self.gate(x).float())
            return hw.loop_over_experts(self.experts, x, index, weight.to(x.dtype)).reshape(shape).float()


def weight_normed():
    block = CheckpointedExperts()
    for expert in block.experts:
        torch.nn.utils.parametrizations.weight_norm(expert.w1)
    return block


@pytest.mark.parametrize("build", [CheckpointedExperts, CompiledForward], ids=["checkpointed_experts",
                                                                               "compiled_forward"])
def test_wrapped_forms_fused(build, quiet):
    torch.manual_seed(0)
    hw.fuse_and_compare(build().eval(), torch.randn(4, 1024, H), "softmax>top2 renorm | gated silu E=8")


def test_weight_norm_experts_fused_for_eval_only(quiet):
    torch.manual_seed(0)
    x = torch.randn(4, 1024, H)
    fused, _, _ = hw.fuse_and_compare(weight_normed().eval(), x)
    assert "eval mode only: has parametrized weights" in moecompile.report(fused).blocks[0].reason
    fused.train()
    with pytest.raises(moecompile.MoECompileError, match="eval mode only"):
        fused(x)


def test_own_autocast_region_fused_computing_in_that_dtype(quiet, tmp_path):
    """bf16 inside the block: read in float32 (the region a no-op in describe's copy), fused with the same region
    opened around the fused block. Tolerance: the fused block is as far from the float32 computation as the
    original is (within 2x: both round to bf16), and within 1e-2 normwise of the original (about one bf16 rounding,
    2^-7:
    the routing is the same, only the order of the bf16 sums differs)."""
    from moecompile.passes.autocast_regions import regions_off

    torch.manual_seed(0)
    block = OwnAutocast().eval()
    fused = moecompile.optimize(block, strict=True)
    assert "in its cpu autocast bfloat16" in moecompile.report(fused).blocks[0].spec_summary
    x = torch.randn(4, 1024, H)
    with torch.no_grad():
        got, want = fused(x), block(x)
        with regions_off(set()):
            exact = block(x)
    assert got.dtype == want.dtype == torch.float32

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(want, exact) > 1e-3  # the original does compute in bf16
    assert rel(got, exact) <= 2 * rel(want, exact) and rel(got, want) <= 1e-2, (rel(got, exact), rel(want, exact))
    onnx_file = tmp_path / "moe.onnx"
    with pytest.raises(moecompile.MoECompileError, match="its own cpu autocast region.*Nothing was written"):
        moecompile.export_onnx(fused, onnx_file, torch.randn(2, 8, H))
    assert not list(tmp_path.iterdir())
