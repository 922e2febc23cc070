"""Confirm: run the original block and its FusedMoE replacement on fresh random inputs and compare.

Place in the pipeline: detect -> describe -> **confirm** -> fuse. Two questions, each checked on its own:

1. Does the description compute what the block computes? The description run by the PyTorch reference must match
   the original in float32 (max abs error <= FP32_RTOL of the output's scale) with the real weights and with
   re-randomised weights, at several token counts (1, 7, 3x7 and a 256-token sequence, where expert capacity or
   other batch-dependent routing would show).
2. Do the kernels compute the description on this block? FusedMoE as the model will run it (the Triton kernels on a
   GPU, in the block's dtype and on its device) against the block in float32, at 3x7 tokens: in float32 within
   FP32_RTOL like (1); in bf16/fp16 its mean relative error must stay within NATIVE_MEAN_RTOL, or within twice the
   original block's own error in that dtype, whichever is larger. Routing ties flip some tokens in low precision
   (the original routes in its dtype, FusedMoE in fp32), so the mean is judged, not the maximum.

(1) runs no kernel, so confirming compiles no Triton kernel besides the one set (2) needs, which decode calls then
reuse (the kernels take every token count with one compiled variant). The kernels themselves are checked against
the reference over a grid of shapes by the test suite.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import call_block
from ..fused import FusedMoE
from .describe import Description, randomized_copy

FP32_RTOL = 1e-4
NATIVE_MEAN_RTOL = 2e-2
CONFIRM_SHAPES = ((1, 1), (1, 7), (3, 7), (1, 256))


@dataclass
class Confirmation:
    ok: bool
    max_abs_error: float
    rel_error: float
    native_max_abs_error: float | None
    native_mean_rel_error: float | None
    detail: str
    tokens: list[int]


def _outputs(module: nn.Module, x: torch.Tensor, rank: int):
    """(hidden states, aux output or None) of `module` on x, given as [B, S, H] or flattened for rank-2 blocks."""
    inp = x if rank == 3 else x.reshape(-1, x.shape[-1])
    if isinstance(module, FusedMoE):
        out = module(inp)
        return (out, None) if isinstance(out, torch.Tensor) else out
    return call_block(module, inp)[0]


def _compare(original: nn.Module, replacement: nn.Module, x: torch.Tensor, rank: int) -> tuple[float, float, float]:
    """(max abs error, max |original output|, mean abs error / mean |output|), hidden states and aux output."""
    return _errors(_outputs(replacement, x, rank), _outputs(original, x, rank), replacement.spec.num_experts)


def _errors(got_outputs, want_outputs, num_experts: int) -> tuple[float, float, float]:
    (got, got_aux), (want, want_aux) = got_outputs, want_outputs
    pairs = [(got, want)] + ([(got_aux, want_aux)] if want_aux is not None else [])
    max_err, scale, mean_rel = 0.0, 0.0, 0.0
    for is_aux, (g, w) in enumerate(pairs):
        if g is None or g.shape != w.shape:
            return float("inf"), 1.0, float("inf")
        if w.numel() == 0:
            continue
        if is_aux and g.shape[-1] != num_experts:  # top-k weights: compare order-free
            g, w = g.float().sort(-1).values, w.float().sort(-1).values
        diff = (g.float() - w.float()).abs()
        max_err = max(max_err, diff.max().item())
        scale = max(scale, w.float().abs().max().item())
        mean_rel = max(mean_rel, diff.mean().item() / max(w.float().abs().mean().item(), 1e-12))
    return max_err, scale, mean_rel


@torch.no_grad()
def confirm(block: nn.Module, description: Description, *, seed: int = 0, rerandomized: bool = True,
            shapes: tuple[tuple[int, int], ...] = CONFIRM_SHAPES, kernels: bool = True) -> Confirmation:
    """Compare `block` with FusedMoE(description) as described in the module docstring. The torch.compile backend
    narrows it for a block whose ops are those of one already confirmed: rerandomized=False (the description holds
    for any weights), and for the very weights confirmed before at another token count, one shape and no kernel
    check (kernels=False)."""
    param = next(block.parameters())
    device, dtype = param.device, param.dtype
    rank = description.input_rank
    H = description.spec.hidden_size
    gen = torch.Generator().manual_seed(seed + 7)
    was_training = [(m, m.training) for m in block.modules()]
    try:
        block.eval()
        block32 = block if dtype == torch.float32 else copy.deepcopy(block).float()
        checks = [("real weights", block32)]
        if rerandomized:
            checks.append(("re-randomised weights", randomized_copy(block, seed + 3)))
        max_err, rel, tokens = 0.0, 0.0, []
        for label, original in checks:
            described = FusedMoE(description.spec, description.extract(original), backend="reference")
            for batch, seq in shapes:
                x = torch.randn(batch, seq, H, generator=gen).to(device)
                err, scale, _ = _compare(original, described, x, rank)
                if label == "real weights":
                    max_err, tokens = max(max_err, err), tokens + [batch * seq]
                rel_here = err / max(scale, 1e-6)
                if not rel_here <= FP32_RTOL:
                    return Confirmation(False, err, rel_here, None, None,
                                        f"float32 mismatch with {label} at {batch}x{seq} tokens: max abs error "
                                        f"{err:.3e} (rel {rel_here:.2e} > {FP32_RTOL:.0e})", tokens)
                if label == "real weights":
                    rel = max(rel, rel_here)
        if not kernels:
            return Confirmation(True, max_err, rel, None, None, "", tokens)
        fused = FusedMoE(description.spec, description.extract(block))
        x = torch.randn(3, 7, H, generator=gen).to(device=device, dtype=dtype)
        exact = _outputs(block32, x.float(), rank)
        native_err, scale, native_mean = _errors(_outputs(fused, x, rank), exact, description.spec.num_experts)
        if dtype == torch.float32:
            if not native_err / max(scale, 1e-6) <= FP32_RTOL:
                return Confirmation(False, max_err, rel, native_err, None,
                                    f"the kernels disagree with the float32 block at 3x7 tokens: max abs error "
                                    f"{native_err:.3e} (rel {native_err / max(scale, 1e-6):.2e} > {FP32_RTOL:.0e})",
                                    tokens)
            return Confirmation(True, max_err, rel, None, None, "", tokens)
        _, _, original_mean = _errors(_outputs(block, x, rank), exact, description.spec.num_experts)
        bar = max(NATIVE_MEAN_RTOL, 2 * original_mean)
        if not native_mean <= bar:
            return Confirmation(False, max_err, rel, native_err, native_mean,
                                f"{dtype} mismatch: mean relative error against the float32 block "
                                f"{native_mean:.2e} > {bar:.2e} (the original in {dtype}: {original_mean:.2e})",
                                tokens)
        return Confirmation(True, max_err, rel, native_err, native_mean, "", tokens)
    finally:
        for module, mode in was_training:
            module.training = mode
