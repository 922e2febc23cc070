"""Capacity and dropping as GShard / DeepSpeed write them: `top1gating` and `top2gating` with a capacity computed
from the token count (ceil(tokens / E * factor * k), at least min_capacity), choices over capacity dropped, the
dispatch and combine done with einsum over a [tokens, E, capacity] tensor (single-device MOELayer). Eval path
(eval_capacity_factor, no random token selection, no noise). Fused and checked on 4,096 fresh tokens in one batch
and in sequences (fp32, normwise relative error 1e-5), with factors small enough that many choices are dropped."""
from __future__ import annotations

import math

import handwritten as hw
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile

H, I, E = 32, 40, 8


def _capacity(num_tokens: int, capacity_factor: float, min_capacity: int) -> int:
    return max(math.ceil((num_tokens / E) * capacity_factor), min_capacity)


def top1gating(logits, capacity_factor, min_capacity):
    gates = F.softmax(logits, dim=1)
    capacity = _capacity(logits.shape[0], capacity_factor, min_capacity)
    indices1_s = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1_s, num_classes=E)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    mask1 = mask1 * torch.lt(locations1, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    gates = gates * mask1
    locations1_sc = F.one_hot(locations1_s, num_classes=capacity).float()
    combine_weights = torch.einsum("se,sc->sec", gates, locations1_sc)
    return combine_weights, combine_weights.bool()


def top2gating(logits, capacity_factor, min_capacity):
    gates = F.softmax(logits, dim=1)
    capacity = _capacity(logits.shape[0], capacity_factor * 2, min_capacity)
    indices1_s = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1_s, num_classes=E)
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2_s, num_classes=E)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)
    mask1 *= torch.lt(locations1, capacity)
    mask2 *= torch.lt(locations2, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)
    gates1_s = torch.einsum("se,se->s", gates, mask1.float())
    gates2_s = torch.einsum("se,se->s", gates, mask2.float())
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
    gates1_s /= denom_s
    gates2_s /= denom_s
    gates1 = torch.einsum("s,se->se", gates1_s, mask1.float())
    gates2 = torch.einsum("s,se->se", gates2_s, mask2.float())
    locations1_sc = F.one_hot(locations1_s, num_classes=capacity).float()
    locations2_sc = F.one_hot(locations2_s, num_classes=capacity).float()
    combine_weights = torch.einsum("se,sc->sec", gates1, locations1_sc) + torch.einsum("se,sc->sec", gates2,
                                                                                        locations2_sc)
    return combine_weights, combine_weights.bool()


class TopKGate(nn.Module):
    def __init__(self, k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4):
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)
        self.k = k
        self.capacity_factor, self.eval_capacity_factor, self.min_capacity = (capacity_factor, eval_capacity_factor,
                                                                              min_capacity)

    def forward(self, x):
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        gating = top1gating if self.k == 1 else top2gating
        return gating(self.wg(x), factor, self.min_capacity)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))

    def forward(self, inputs):  # [E, C, M]
        chunks = inputs.chunk(E, dim=0)
        return torch.cat([expert(chunk) for chunk, expert in zip(chunks, self.deepspeed_experts)], dim=0)


class MOELayer(nn.Module):
    def __init__(self, k, **gate_args):
        super().__init__()
        self.gate = TopKGate(k, **gate_args)
        self.experts = Experts()

    def forward(self, *inputs):
        d_model = inputs[0].shape[-1]
        reshaped = inputs[0].reshape(-1, d_model)
        combine_weights, dispatch_mask = self.gate(reshaped)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.type_as(reshaped), reshaped)
        expert_output = self.experts(dispatched)
        combined = torch.einsum("sec,ecm->sm", combine_weights.type_as(reshaped), expert_output)
        return combined.reshape(inputs[0].shape)


FORMS = {
    "deepspeed_top1gating": (dict(k=1, eval_capacity_factor=0.75, min_capacity=2),
                             "softmax>top1 capacity factor 0.75 min 2 per batch"),
    "deepspeed_top2gating": (dict(k=2, eval_capacity_factor=0.5, min_capacity=2),
                             "softmax>top2 capacity factor 0.5 min 2 per batch slot-major renorm after drop"),
}


@pytest.mark.parametrize("name", FORMS)
def test_capacity_forms_fused_and_dropping_as_the_original(name, quiet):
    gate_args, summary = FORMS[name]
    torch.manual_seed(0)
    block = MOELayer(**gate_args).eval()
    fused = moecompile.optimize(block, strict=True)
    record = moecompile.report(fused).blocks[0]
    assert record.decision == "fused" and summary in record.spec_summary, record.spec_summary
    for shape in ((1, 4096, H), (8, 512, H), (37, H)):  # one batch; sequences (the capacity is per batch); odd
        x = torch.randn(*shape)
        with torch.no_grad():
            want, got = block(x), fused(x)
        assert (got - want).norm() / want.norm() < 1e-5, shape
        dropped = (want.reshape(-1, H).abs().sum(-1) == 0).float().mean().item()
        assert shape[0] == 37 or dropped > 0.01 or gate_args["k"] == 2  # tokens were dropped (top-1: zero rows)


def test_training_mode_gate_is_described_in_eval_mode(quiet):
    """The gate reads capacity_factor in training and eval_capacity_factor in eval: optimize reads the block as it
    runs (eval here) and the fused block computes the eval form."""
    torch.manual_seed(1)
    block = MOELayer(k=1, capacity_factor=2.0, eval_capacity_factor=0.5, min_capacity=1).eval()
    fused = moecompile.optimize(block, strict=True)
    assert fused.spec.router.capacity_factor == 0.5
