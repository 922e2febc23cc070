"""Hand-written blocks that return more than their output: (out, aux_loss) with a 0-d load-balancing loss, written
as the public codebases write it (Switch Transformer's top-1 router, DeepSpeed/GShard `top2gating`, transformers'
`load_balancing_loss_func` over all k choices), each fused and checked at the block level on 4,096 fresh tokens:
the output within 1e-5 (fp32, normwise relative) and the loss within 1e-5 relative, and the loss's gradient."""
from __future__ import annotations

import handwritten as hw
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile


class SwitchTop1(nn.Module):
    """Switch Transformer: top-1 of the softmax, the expert output scaled by its probability;
    aux = coef * E * sum_e (share of tokens routed to e) * (mean probability of e)."""

    def __init__(self, H=32, I=40, E=8, coef=0.01):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))
        self.E, self.coef = E, coef

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(dim=-1)
        weight, index = probs.max(dim=-1)
        out = hw.loop_over_experts(self.experts, x, index[:, None], weight[:, None])
        fraction = F.one_hot(index, self.E).float().mean(dim=0)
        aux = self.coef * self.E * (fraction * probs.mean(dim=0)).sum()
        return out.reshape(shape), aux


class DeepSpeedTop2(nn.Module):
    """DeepSpeed's top2gating (no capacity): first choice by argmax, second by argmax with the first masked, the two
    gates renormalised; l_aux = mean(me * ce) * E * E over the first choices."""

    def __init__(self, H=32, I=40, E=8):
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))
        self.E = E

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.wg(x)
        gates = F.softmax(logits, dim=1)
        indices1 = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(indices1, num_classes=self.E)
        logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
        indices2 = torch.argmax(logits_except1, dim=1)
        mask2 = F.one_hot(indices2, num_classes=self.E)
        me = torch.mean(gates, dim=0)
        ce = torch.mean(mask1.float(), dim=0)
        l_aux = torch.mean(me * ce) * self.E * self.E
        gates1_s = (gates * mask1).sum(dim=1)
        gates2_s = (gates * mask2).sum(dim=1)
        denom = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
        index = torch.stack([indices1, indices2], dim=1)
        weight = torch.stack([gates1_s / denom, gates2_s / denom], dim=1)
        return hw.loop_over_experts(self.experts, x, index, weight).reshape(shape), l_aux


class AllChoicesLoss(nn.Module):
    """transformers' load_balancing_loss_func over the k choices of a softmax top-k router, times a coefficient."""

    def __init__(self, H=32, I=40, E=8, k=2, coef=0.02):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))
        self.E, self.k, self.coef = E, k, coef

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        routing_weights = F.softmax(logits, dim=-1)
        weight, index = torch.topk(routing_weights, self.k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        out = hw.loop_over_experts(self.experts, x, index, weight)
        expert_mask = F.one_hot(index, self.E)  # [T, k, E]
        tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
        router_prob_per_expert = torch.mean(routing_weights, dim=0)
        loss = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * self.E
        return out.reshape(shape), self.coef * loss


FORMS = {
    "switch_top1": (SwitchTop1, "aux loss top1 x0.01"),
    "deepspeed_top2gating": (DeepSpeedTop2, "aux loss top1 x1"),
    "hf_all_choices": (AllChoicesLoss, "aux loss topk x0.02"),
}


@pytest.mark.parametrize("name", FORMS)
def test_loss_returning_blocks_are_fused_with_their_loss(name, quiet):
    cls, summary = FORMS[name]
    torch.manual_seed(0)
    _, (_, aux), _ = hw.fuse_and_compare(cls().eval(), torch.randn(4, 1024, 32), summary)
    assert aux.dim() == 0


def test_the_loss_is_differentiable_through_the_fused_block(quiet):
    """The fused block's loss has the original's gradient in the router weight (it enters the block's backward
    through the router logits)."""
    torch.manual_seed(1)
    block = AllChoicesLoss().eval()
    fused = moecompile.optimize(block, strict=True)
    x = torch.randn(300, 32)
    block(x)[1].backward()
    fused(x)[1].backward()
    want = block.gate.weight.grad
    got = fused.router_weight.grad
    assert got is not None and (got - want).norm() / want.norm() < 1e-5


def test_an_unreadable_loss_leaves_the_block_with_a_reason(quiet):
    """A 0-d extra output that is no load-balancing loss moecompile knows (here the mean squared router logit times
    an arbitrary 0.0137...) leaves the block with the closest description named, and does not crash."""
    class OddLoss(SwitchTop1):
        def forward(self, x):
            out, _ = super().forward(x)
            return out, self.router(x.reshape(-1, x.shape[-1])).square().mean() * 0.013719

    torch.manual_seed(2)
    block = OddLoss().eval()
    out = moecompile.optimize(block)
    record = moecompile.report(out).blocks[0]
    assert record.decision == "left" and "no description reproduces the block" in record.reason


class WithRouterLogits(AllChoicesLoss):
    """(out, router_logits), as blocks that hand their logits to a loss computed elsewhere return them."""

    def forward(self, x):
        out, _ = super().forward(x)
        return out, self.gate(x.reshape(-1, x.shape[-1]))


def test_router_logits_returned_beside_the_output(quiet):
    torch.manual_seed(3)
    fused, _, _ = hw.fuse_and_compare(WithRouterLogits().eval(), torch.randn(4096, 32))
    assert fused.spec.extra_output == "router_logits"


class ParallelMLP(nn.Module):
    """Megatron's expert MLP with skip_bias_add: returns (output without the down projection's bias, that bias)."""

    def __init__(self, H=32, I=40):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(H, I)
        self.dense_4h_to_h = nn.Linear(I, H)

    def forward(self, hidden_states):
        intermediate = F.gelu(self.dense_h_to_4h(hidden_states))
        return F.linear(intermediate, self.dense_4h_to_h.weight), self.dense_4h_to_h.bias


class SwitchMLP(nn.Module):
    """Megatron-LM's SwitchMLP (single device): top-1 of the softmax; returns (output, output bias) for the caller's
    bias-dropout-add, each weighted by the token's probability."""

    def __init__(self, H=32, E=8):
        super().__init__()
        self.router = nn.Linear(H, E)
        self.experts = nn.ModuleList(ParallelMLP(H) for _ in range(E))

    def forward(self, hidden_states):
        s, b, h = hidden_states.size(0), hidden_states.size(1), hidden_states.size(2)
        route = torch.nn.functional.softmax(self.router(hidden_states), dim=2)
        max_prob, max_ind = torch.max(route, dim=2)
        max_prob = torch.unsqueeze(max_prob, 2)
        hidden_states = hidden_states.view(-1, hidden_states.size(2))
        max_prob = max_prob.view(-1, max_prob.size(2))
        max_ind = max_ind.view(-1)
        output_total = torch.empty_like(hidden_states)
        output_bias_total = torch.empty_like(hidden_states)
        for expert_num, expert in enumerate(self.experts):
            local_indices = (max_ind == expert_num).nonzero()
            hidden = hidden_states[local_indices, :]
            output, output_bias = expert(hidden)
            output_bias = output_bias.expand_as(output)
            output_total[local_indices, :] = output
            output_bias_total[local_indices, :] = output_bias
        output_total = (output_total * max_prob).view(s, b, h)
        output_bias_total = (output_bias_total * max_prob).view(s, b, h)
        return output_total, output_bias_total


def test_output_and_bias_returned_apart(quiet):
    torch.manual_seed(4)
    x = torch.randn(16, 256, 32)  # [sequence, batch, hidden], as Megatron lays it out
    fused, _, _ = hw.fuse_and_compare(SwitchMLP().eval(), x)  # shapes and values of (output, bias)
    assert fused.spec.extra_output == "expert_bias" and fused.spec.experts.has_bias


class NestedCountsAndLoss(AllChoicesLoss):
    """(out, (tokens_per_expert, loss)): Megatron-style counts of all k choices, beside transformers' loss."""

    def forward(self, x):
        out, loss = super().forward(x)
        index = self.gate(x.reshape(-1, x.shape[-1])).topk(self.k, dim=-1).indices
        return out, (torch.bincount(index.flatten(), minlength=self.E), loss)


class DeepSpeedTriple(DeepSpeedTop2):
    """DeepSpeed's MOELayer returns (output, l_aux, exp_counts), exp_counts the first choices per expert (summed
    one-hot of the top-1 before any capacity drop)."""

    def forward(self, x):
        out, l_aux = super().forward(x)
        first = self.wg(x.reshape(-1, x.shape[-1])).argmax(dim=-1)
        return out, l_aux, F.one_hot(first, self.E).sum(dim=0)


class HistcCountsAndLogits(AllChoicesLoss):
    """(out, (router_logits, float counts from torch.histc)): the counts read as whole floats."""

    def forward(self, x):
        out, _ = super().forward(x)
        logits = self.gate(x.reshape(-1, x.shape[-1]))
        index = logits.topk(self.k, dim=-1).indices
        return out, (logits, torch.histc(index.float(), bins=self.E, min=0, max=self.E - 1))


@pytest.mark.parametrize("build, summary", [
    (NestedCountsAndLoss, "returns (y, (expert_counts, aux_loss)) counting topk"),
    (DeepSpeedTriple, "returns (y, aux_loss, expert_counts) counting top1"),
    (HistcCountsAndLogits, "returns (y, (router_logits, expert_counts)) counting topk"),
], ids=["nested_counts_loss", "deepspeed_triple", "histc_counts_logits"])
def test_tuple_structures_are_returned_as_the_original(build, summary, quiet):
    """The fused block returns the same structure; the counts exactly, the output within 1e-5 and the loss and
    logits within 1e-5 relative (fp32), on 4,096 fresh tokens."""
    torch.manual_seed(5)
    x = torch.randn(4096, 32)
    fused, got, want = hw.fuse_and_compare(build().eval(), x, summary)
    counts = [(g, w) for g, w in zip(hw._flat(got), hw._flat(want)) if g.dim() == 1]
    assert len(counts) == 1 and torch.equal(counts[0][0].double(), counts[0][1].double())
    assert counts[0][0].sum() == 4096 * (1 if build is DeepSpeedTriple else 2)


def test_a_structure_with_an_unreadable_leaf_is_left_unchanged(quiet):
    """(out, (counts, something else)): a leaf that is none of the outputs moecompile computes leaves the block."""
    class Unreadable(NestedCountsAndLoss):
        def forward(self, x):
            out, (counts, loss) = super().forward(x)
            return out, (counts, x.mean(dim=0))  # [H]: not a count, logits, weights or loss

    torch.manual_seed(5)
    block = Unreadable().eval()
    out = moecompile.optimize(block)
    record = moecompile.report(out).blocks[0]
    assert record.decision == "left" and "no description reproduces the block" in record.reason
    x = torch.randn(50, 32)
    with torch.no_grad():
        assert torch.equal(out(x)[0], block(x)[0])


class STMoELosses(SwitchTop1):
    """ST-MoE: the Switch load-balancing loss plus the router z-loss (mean squared logsumexp of the logits), as
    transformers' SwitchTransformers computes them, weighted 1e-2 and 1e-3 and returned as one scalar."""

    def forward(self, x):
        out, balance = super().forward(x)
        logits = self.router(x.reshape(-1, x.shape[-1]))
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return out, balance + 1e-3 * z_loss


def test_load_balancing_plus_router_z_loss(quiet):
    torch.manual_seed(6)
    x = torch.randn(4096, 32) * 3  # larger logits: the z-loss term is a good share of the loss
    hw.fuse_and_compare(STMoELosses().eval(), x, "aux loss top1 x0.01 + z-loss x0.001")


def test_a_structure_through_the_kernels_matches_the_reference(quiet):
    """The kernel path (the Triton interpreter on the CPU, CUDA on a GPU) returns the same structure as the
    reference: counts exactly, output, loss within 1e-4 relative (fp32, 37 tokens)."""
    torch.manual_seed(5)
    fused = moecompile.optimize(DeepSpeedTriple().eval())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec, weights = fused.spec, fused.weights()
    x = torch.randn(37, 32)
    with torch.no_grad():
        want = moecompile.fused.run_block(spec, weights, x, backend="reference")
        on_device = moecompile.MoEWeights(**{n: None if t is None else t.to(device) for n, t in weights.items()})
        got = moecompile.fused.run_block(spec, on_device, x.to(device), backend="triton")
    assert torch.equal(got[2].cpu(), want[2]) and got[2].sum() == 37
    for g, w in zip(got[:2], want[:2]):
        assert ((g.cpu().double() - w.double()).norm() / w.double().norm()) <= 1e-4
