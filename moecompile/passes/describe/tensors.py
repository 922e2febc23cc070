"""Tensor access relative to the candidate, so that one weights recipe serves the original block and its
re-randomised working copy, and the re-laying-out of those tensors into the canonical form (MoEWeights).

Place in the pipeline: the weights recipes of describe's hypotheses (experts.py, router.py, search.py) read the
block's tensors through these; the compile backend sets KEEP_AUTOGRAD while it rebuilds weights from graph inputs.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from ..detect import Candidate, TensorRef, expert_view


def rel_ref(candidate: Candidate, ref: TensorRef) -> tuple[str, str, int]:
    owner = ref.owner_path[len(candidate.path):].lstrip(".") if candidate.path else ref.owner_path
    return owner, ref.name, ref.split_experts


def get_tensor(block: nn.Module, where: tuple) -> torch.Tensor:
    owner = block.get_submodule(where[0]) if where[0] else block
    return expert_view(getattr(owner, where[1]), where[2] if len(where) > 2 else 0)


# set while a torch.compile graph rebuilds canonical weights from its parameter inputs on every call: the re-laid-out
# tensors must stay in the autograd graph of the model's parameters, not become new Parameters
KEEP_AUTOGRAD = contextvars.ContextVar("moecompile_keep_autograd", default=False)


def canonical(source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Keep the source Parameter itself when no copy was needed (shared storage, trained together); else a new
    Parameter (or buffer tensor) holding the re-laid-out copy. A view of a Parameter (DBRX's [E*I, H] seen as
    [E, I, H]) is copied: a Parameter cannot be a view. Under KEEP_AUTOGRAD, the re-laid-out tensor, contiguous."""
    if KEEP_AUTOGRAD.get():
        return value.contiguous()  # the kernels take canonical, contiguous weights
    if (value is source and source._base is None) or isinstance(value, nn.Parameter):
        return value
    value = value.detach().contiguous()
    base = source if source._base is None else source._base
    if isinstance(base, nn.Parameter):
        return nn.Parameter(value, requires_grad=base.requires_grad)
    return value


def fc1_layout(t: torch.Tensor, layout: str, inter: int, dim: int) -> torch.Tensor:
    if layout in ("concat_gate_up", "none", "separate"):
        return t
    if layout == "concat_up_gate":
        return torch.cat(t.split(inter, dim=dim)[::-1], dim=dim)
    index = [slice(None)] * t.dim()
    gate, up = list(index), list(index)
    gate[dim], up[dim] = slice(0, None, 2), slice(1, None, 2)
    return torch.cat([t[tuple(gate)], t[tuple(up)]], dim=dim)


def rel_module(candidate: Candidate, path: str) -> str:
    return path[len(candidate.path):].lstrip(".") if candidate.path else path
