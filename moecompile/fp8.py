"""FP8 expert weights with one scale per 128 x 128 block, the format DeepSeek-V3 and Qwen3's FP8 checkpoints ship
(transformers' fine-grained FP8: `weight` float8_e4m3fn with `weight_scale_inv`, the value being weight * scale).

Place in the pipeline: MoEWeights holds the routed experts' w1 / w2 (and the shared experts' shared_w1 / shared_w2)
in this format with `w1_scale` / `w2_scale` ([E, ceil(rows / 128), ceil(cols / 128)] fp32; the shared experts'
without the E); the Triton expert kernels (kernels/experts.py) dequantize each
weight tile in registers before the tile's dot (weight-only FP8: activations stay in x's dtype), and the reference
(reference.py) computes with `dequantize`, which rounds as the kernels do (fp32 product, then x's dtype).
`quantize` makes such weights from 16-bit or fp32 ones (for tests and benchmarks; checkpoints bring their own).
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_DTYPES = (torch.float8_e4m3fn,)
_E4M3_MAX = 448.0
# the MoEWeights that may be FP8, each with its scale `<name>_scale`: the routed and the shared experts' GEMMs
QUANTIZABLE = ("w1", "w2", "shared_w1", "shared_w2")


def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in FP8_DTYPES


def has_fp8(weights) -> bool:
    """Whether any of a MoEWeights' GEMM weights is FP8 (has a scale)."""
    return any(getattr(weights, name + "_scale") is not None for name in QUANTIZABLE)


def scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of this shape: one per BLOCK x BLOCK block of the last two dims."""
    *lead, rows, cols = weight_shape
    return (*lead, -(-rows // BLOCK), -(-cols // BLOCK))


def _blocks(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """scale [..., R, C] spread to [..., rows, cols] (each value over its block)."""
    return scale.repeat_interleave(BLOCK, dim=-2)[..., :rows, :].repeat_interleave(BLOCK, dim=-1)[..., :cols]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight (FP8) times its block scales, computed in fp32 and rounded to `dtype`: the kernels' tiles exactly."""
    rows, cols = weight.shape[-2:]
    return (weight.float() * _blocks(scale.float(), rows, cols)).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scales [..., ceil(rows/128), ceil(cols/128)]): each block scaled so that its
    largest magnitude maps to e4m3's 448 (an all-zero block gets scale 1)."""
    rows, cols = weight.shape[-2:]
    w = weight.float()
    pad_r, pad_c = -rows % BLOCK, -cols % BLOCK
    padded = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))
    *lead, R, C = padded.shape
    blocks = padded.reshape(*lead, R // BLOCK, BLOCK, C // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))
    q = (w / _blocks(scale, rows, cols)).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantized(weights, dtype: torch.dtype):
    """MoEWeights with FP8 w1 / w2 replaced by their dequantized values in `dtype` (the scales dropped); the same
    object when there are none."""
    import dataclasses

    if not has_fp8(weights):
        return weights
    changes = {}
    for name in QUANTIZABLE:
        scale = getattr(weights, name + "_scale")
        if scale is not None:
            changes[name] = dequantize(getattr(weights, name), scale, dtype)
            changes[name + "_scale"] = None
    return dataclasses.replace(weights, **changes)
