"""Selection forms that are not token choice: expert-choice routing (each expert takes its top-c tokens, Zhou et
al. 2022, as in public research code) is detected and left with that reason, never fused as token choice."""
from __future__ import annotations

import handwritten as hw
import torch
from torch import nn

import moecompile

H, I, E = 32, 40, 8


class ExpertChoice(nn.Module):
    def __init__(self, capacity_factor=2.0):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))
        self.capacity_factor = capacity_factor

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        scores = self.gate(x).softmax(dim=-1)  # [T, E]
        capacity = max(1, int(x.shape[0] * self.capacity_factor / E))
        gates, tokens = scores.t().topk(min(capacity, x.shape[0]), dim=-1)  # [E, c]: each expert picks its tokens
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out.index_add_(0, tokens[e], expert(x[tokens[e]]) * gates[e, :, None])
        return out.reshape(shape)


def test_expert_choice_is_left_with_its_reason(quiet):
    torch.manual_seed(0)
    block = ExpertChoice().eval()
    out = moecompile.optimize(block)
    record = moecompile.report(out).blocks[0]
    assert record.decision == "left" and record.reason.startswith("expert-choice routing"), record.reason
    assert out is not block or not isinstance(out, moecompile.FusedMoE)
    x = torch.randn(2, 50, H)
    with torch.no_grad():
        assert torch.equal(out(x), block(x))
