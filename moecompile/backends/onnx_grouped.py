"""The experts of the standard ONNX form, in exportable PyTorch: (token, expert, weight) pairs through their experts,
grouped by expert, and the results summed per token.

Place in the pipeline: called by onnx_lowering.standard_block (routing done) and by onnx_if, which exports the two
forms below on their own to make the decode-size If. Only operators that torch.onnx lowers to standard ONNX (opset
18): no per-expert subgraph, the node count is independent of the number of experts.
"""

from __future__ import annotations

import torch

from ..reference import activate
from ..spec import MoESpec


def _expert_mlps(spec: MoESpec, xin: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> torch.Tensor:
    """Each of G experts on its rows: xin [G, C, H], w1 [G, F, H], w2 [G, H, I] -> [G, C, H]. Batched MatMuls
    over the expert axis (ONNX MatMul takes bf16, Einsum does not)."""
    h = torch.matmul(xin, w1.transpose(1, 2))
    if b1 is not None:
        h = h + b1.unsqueeze(1)
    y = torch.matmul(activate(spec.experts, h), w2.transpose(1, 2))
    return y if b2 is None else y + b2.unsqueeze(1)


def _grouped_pairs(spec: MoESpec, x_pairs: torch.Tensor, expert: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """The experts on P (input row, expert) pairs: x_pairs [P, H], expert [P] in [0, G) for the G experts of w1/w2.
    Returns [P, H]. Each expert's rows are gathered into a padded group of C rows, C the largest group (data
    dependent, so the graph computes it), then one batched MatMul per projection; padding rows are zeros and are
    never read back."""
    G, P, H = w1.shape[0], x_pairs.shape[0], x_pairs.shape[1]
    counts = torch.zeros(G, dtype=torch.int64, device=x_pairs.device).scatter_add(0, expert, torch.ones_like(expert))
    C = torch.cat([counts.new_zeros(1), counts]).max().item()  # 0 when no expert is used (no pairs)
    torch._check(C >= 0)
    torch._check(C <= P)
    order = torch.argsort(expert)  # the order inside a group does not matter, only that each row gets a slot
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(P, device=x_pairs.device) - starts[expert[order]]
    rank = torch.zeros_like(expert).scatter(0, order, rank_sorted)
    slot = expert * C + rank  # [P]: the pair's row in the [G * C] padded groups
    row_of_slot = torch.full((G * C,), P, dtype=torch.int64, device=x_pairs.device).scatter(0, slot, torch.arange(
        P, device=x_pairs.device))
    # the padding row made in fp32 and cast: onnx 1.23's checker rejects a bf16 ConstantOfShape at opset 18
    pad_row = torch.zeros(1, H, dtype=torch.float32, device=x_pairs.device).to(x_pairs.dtype)
    padded = torch.cat([x_pairs, pad_row])[row_of_slot].view(G, C, H)
    return _expert_mlps(spec, padded, w1, b1, w2, b2).reshape(G * C, H)[slot]


def all_experts(spec: MoESpec, weights: list, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                weight: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """[T, H] in fp32 (at least): each token's pairs through their experts (grouped over every expert's weights
    [w1, b1, w2, b2], biases None where absent), weighted and summed."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = weight.unsqueeze(1)
    x_pairs = x[token]
    if spec.router.weight_on_input:  # each expert sees its weighted input
        x_pairs = (x_pairs.to(acc) * w).to(x.dtype)
    y_pairs = _grouped_pairs(spec, x_pairs, expert, *weights).to(acc)
    if not spec.router.weight_on_input:
        y_pairs = y_pairs * w
    if top_k is not None:  # token-major pairs, k per token
        return y_pairs.view(-1, top_k, x.shape[1]).sum(dim=1)
    return torch.zeros(x.shape, dtype=acc, device=x.device).index_add(0, token, y_pairs)


def used_experts(spec: MoESpec, weights: list, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                 weight: torch.Tensor, top_k: int | None, used: torch.Tensor) -> torch.Tensor:
    """What all_experts computes, over the weights of the experts some pair uses (used [E]: 1 where one does),
    gathered first: less to read when few experts are used (decode-sized inputs)."""
    index = used.nonzero().squeeze(1)
    picked = [None if t is None else t[index] for t in weights]
    return all_experts(spec, picked, x, token, (used.cumsum(0) - 1)[expert], weight, top_k)
