"""Capture: run a candidate block and record what it returns and which ops it executes.

Place in the pipeline: **capture** -> detect -> describe -> confirm -> fuse. The op census runs the block once
under a TorchDispatchMode that records the name of every aten op it executes (so data-dependent expert loops with
nonzero/where/index_add_ are seen, where symbolic tracing and torch.export fail). Nothing else is recorded: make_fx
did this before, and its tracer left reference cycles (fake-tensor modes, graph nodes) that held the traced block's
weights, 14.5 GB for a two-layer Qwen3-30B-A3B on torch 2.11, until a garbage collection. describe uses the census
only to order its hypotheses; when the block fails under it the census is empty and describe says so in the log.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

_CENSUS_OPS = ("softmax", "sigmoid", "topk", "relu", "sort", "argmax")


class Leaves(tuple):
    """The tensors a block returns besides its hidden states, when it returns more than a (hidden_states, aux) pair:
    `(out, (counts, loss))`, `(out, loss, counts)`. `tree` is the structure with "y" for the hidden states and each
    other leaf's index in this tuple: ("y", (0, 1))."""

    tree: tuple

    def __new__(cls, leaves, tree):
        made = super().__new__(cls, leaves)
        made.tree = tree
        return made


def _flatten(out, leaves: list) -> object:
    if isinstance(out, torch.Tensor):
        leaves.append(out)
        return len(leaves) - 1
    if isinstance(out, (tuple, list)) and out:
        return tuple(_flatten(item, leaves) for item in out)
    raise TypeError(f"the block returned {type(out).__name__} inside its output; moecompile reproduces tensors and "
                    "(nested) tuples of tensors")


def split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | Leaves | None]:
    """(hidden_states, auxiliary) from what a block returned: a tensor, a (tensor, tensor) pair (auxiliary: that
    tensor), or a tuple whose first item is the hidden states and whose others are tensors or tuples of them
    (auxiliary: Leaves)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        if len(out) == 1:
            return out[0], None
        if len(out) == 2 and isinstance(out[1], torch.Tensor) and out[1].is_floating_point():
            return out[0], out[1]
        leaves: list[torch.Tensor] = []
        tree = ("y",) + tuple(_flatten(item, leaves) for item in out[1:])
        return out[0], Leaves(leaves, tree)
    raise TypeError(f"the block returned {type(out).__name__} of an unsupported structure; moecompile reproduces a "
                    "tensor, or a tuple of the hidden states first and tensors (or tuples of them) after")


def outputs_to(outputs: tuple, device: torch.device | str) -> tuple:
    """(hidden_states, auxiliary) as split_output gives them, moved to `device`."""
    y, aux = outputs
    if isinstance(aux, Leaves):
        return y.to(device), Leaves([leaf.to(device) for leaf in aux], aux.tree)
    return y.to(device), None if aux is None else aux.to(device)


def call_block(block: nn.Module, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor | Leaves | None], int]:
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


class _OpNames(TorchDispatchMode):
    """Records the names of the aten ops that run under it, and runs them unchanged."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def op_census(block: nn.Module, x: torch.Tensor) -> set[str]:
    """The routing-relevant aten ops `block(x)` executes (empty if the block fails under the census)."""
    census = _OpNames()
    try:
        with torch.no_grad(), census:
            block(x)
    except Exception:  # noqa: BLE001 - the census is a hint only
        return set()
    return {op for op in _CENSUS_OPS for name in census.names if op in name}
