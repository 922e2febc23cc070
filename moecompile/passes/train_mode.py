"""Describe, last step: whether a block computes the same in train mode as in eval mode.

Place in the pipeline: detect -> describe (-> **train mode**, on describe's working copy) -> confirm -> fuse.
optimize reads a block as it runs
in eval mode. Some blocks compute otherwise in train mode: router jitter (Switch, Mixtral with
`router_jitter_noise`), random token selection, dropout inside the experts, a training capacity factor (DeepSpeed's
`capacity_factor` against `eval_capacity_factor`), or weights computed by a parametrization. A fused block computes
the eval form only, so such a block is
fused for eval and its FusedMoE raises in train mode, naming the reason (never a silent other computation).
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import call_block
from .compare import output_error
from .detect import has_parametrized_weights

TOKENS = 512  # enough that a sampled choice (PhiMoE's sparsemixer in training) differs from call to call


def eval_only_reason(block: nn.Module, probe: nn.Module, hidden_size: int, seed: int = 0) -> str | None:
    """Why `block` can be fused for eval mode only, or None: parametrized weights (the fused block would hold them
    as computed), or a train mode that computes otherwise (train_mode_difference on describe's `probe`)."""
    if has_parametrized_weights(block):
        return ("has parametrized weights (weight norm): the fused block holds them as computed when it was fused, "
                "so training would not reach their parametrization")
    return train_mode_difference(probe, hidden_size, seed)


def train_mode_difference(probe: nn.Module, hidden_size: int, seed: int = 0) -> str | None:
    """Why a block's train mode differs from its eval mode, or None when it computes the same, run on `probe`:
    describe's working copy of the block (re-randomised, float32; the block itself is not run). The probe is left in
    eval mode."""
    device = next(probe.parameters()).device
    x = torch.randn(1, TOKENS, hidden_size, generator=torch.Generator().manual_seed(seed + 7)).to(device)
    try:
        with torch.no_grad():
            probe.train()
            first = call_block(probe, x)[0][0]
            others = [call_block(probe, x)[0][0] for _ in range(2)]
            probe.eval()
            evaluated = call_block(probe, x)[0][0]
    except Exception as exc:  # noqa: BLE001 - the user's block in train mode
        probe.eval()
        return f"its train mode raised ({type(exc).__name__}: {str(exc)[:120]})"
    if not all(torch.equal(first, other) for other in others):
        return ("its train mode is random (two calls on the same input differ: router jitter, random token "
                "selection or dropout)")
    if not output_error(first, evaluated).within(1e-6):
        return "its train mode computes otherwise than its eval mode (e.g. a training capacity factor)"
    return None
