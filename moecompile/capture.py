"""Capture: run a candidate block and record what it returns and which ops it executes.

Place in the pipeline: **capture** -> detect -> describe -> confirm -> fuse. The op census comes from `make_fx` in
real-tensor mode: it executes the block's Python (so data-dependent expert loops with nonzero/where/index_add_ trace
where symbolic tracing and torch.export fail) and records the aten ops. describe uses it only to order its
hypotheses; when tracing fails the census is empty and describe says so in the pass log.
"""

from __future__ import annotations

import torch
from torch import nn

_CENSUS_OPS = ("softmax", "sigmoid", "topk", "relu", "sort", "argmax")


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, auxiliary) from what a block returned: a tensor, or a (tensor, tensor) pair."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        if len(out) == 1:
            return out[0], None
        if len(out) == 2 and isinstance(out[1], torch.Tensor):
            return out[0], out[1]
    raise TypeError(f"the block returned {type(out).__name__} of an unsupported structure; moecompile reproduces a "
                    "tensor or a (hidden_states, router_logits | topk_weights) pair")


def call_block(block: nn.Module, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor | None], int]:
    """Call `block` on x [B, S, H], or on x flattened to [T, H] if it only takes 2-D input.
    Returns ((hidden_states, auxiliary), input rank used)."""
    try:
        out, rank = block(x), 3
    except Exception as first:  # noqa: BLE001 - try the 2-D convention before giving up
        try:
            out, rank = block(x.reshape(-1, x.shape[-1])), 2
        except Exception:  # noqa: BLE001
            raise first from None
    y, aux = split_output(out)
    flat = (x.numel() // x.shape[-1], x.shape[-1])
    if tuple(y.shape) not in (tuple(x.shape if rank == 3 else flat), flat):
        raise TypeError(f"the block maps {tuple(x.shape)} to {tuple(y.shape)}; an MoE block keeps the shape "
                        "(or flattens the tokens)")
    return (y, aux), rank


def op_census(block: nn.Module, x: torch.Tensor) -> set[str]:
    """The routing-relevant aten ops `block(x)` executes (empty if tracing fails)."""
    try:
        from torch.fx.experimental.proxy_tensor import make_fx

        with torch.no_grad():
            graph_module = make_fx(lambda inp: block(inp))(x)
    except Exception:  # noqa: BLE001 - tracing is a hint only
        return set()
    seen: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            seen.update(op for op in _CENSUS_OPS if op in name)
    return seen
