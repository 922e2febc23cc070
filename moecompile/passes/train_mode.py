"""Describe, last step: whether a block computes the same in train mode as in eval mode.

Place in the pipeline: detect -> describe -> **train mode** -> confirm -> fuse. optimize reads a block as it runs
in eval mode. Some blocks compute otherwise in train mode: router jitter (Switch, Mixtral with
`router_jitter_noise`), random token selection, dropout inside the experts, a training capacity factor (DeepSpeed's
`capacity_factor` against `eval_capacity_factor`). A fused block computes the eval form only, so such a block is
fused for eval and its FusedMoE raises in train mode, naming the reason (never a silent other computation).
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import call_block
from .compare import output_error
from .copies import working_copy

TOKENS = 512  # enough that a sampled choice (PhiMoE's sparsemixer in training) differs from call to call


def train_mode_difference(block: nn.Module, hidden_size: int, seed: int = 0) -> str | None:
    """Why the block's train mode differs from its eval mode, or None when it computes the same, on a re-randomised
    float32 working copy (the block itself is not run)."""
    probe = working_copy(block, seed=seed)
    x = torch.randn(1, TOKENS, hidden_size, generator=torch.Generator().manual_seed(seed + 7))
    try:
        with torch.no_grad():
            probe.train()
            first = call_block(probe, x)[0][0]
            others = [call_block(probe, x)[0][0] for _ in range(2)]
            probe.eval()
            evaluated = call_block(probe, x)[0][0]
    except Exception as exc:  # noqa: BLE001 - the user's block in train mode
        return f"its train mode raised ({type(exc).__name__}: {str(exc)[:120]})"
    if not all(torch.equal(first, other) for other in others):
        return ("its train mode is random (two calls on the same input differ: router jitter, random token "
                "selection or dropout)")
    if not output_error(first, evaluated).within(1e-6):
        return "its train mode computes otherwise than its eval mode (e.g. a training capacity factor)"
    return None
