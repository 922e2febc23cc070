"""Expert weights in FP8: `optimize(model, expert_weights="fp8")`.

Place in the pipeline: after the fuse pass (and a routing rewrite, if one was asked for), each fused block's routed
experts (and its shared experts) are quantized to float8_e4m3fn with one scale per 128 x 128 block
(moecompile/fp8.py), the format DeepSeek-V3's and Qwen3's FP8 checkpoints ship, as serving engines quantize a 16-bit
checkpoint on load. The kernels then read half the expert bytes (kernels/experts.py's FP8 path); the router, the
shared expert's gate and the activations stay as they were.

This changes what the model computes, so it is opt-in and measured: each block's output on probe inputs is compared
with its own output before quantization, and the normwise relative error goes to the block's record (and the pass
log's table). The user's model is not touched: its weights are shared with the optimized copy, and quantization
makes new tensors.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import fp8
from ..errors import MoECompileError
from ..fused import FusedMoE
from .log import PassRun, Report

EXPERT_WEIGHT_FORMATS = ("fp8",)
PROBE_TOKENS = 64


def check_expert_weights(value: str) -> None:
    if value not in EXPERT_WEIGHT_FORMATS:
        raise MoECompileError(f"optimize: expert_weights={value!r} is not one of {EXPERT_WEIGHT_FORMATS}; "
                              "leave it out to keep the experts' weights as they are")


def quantize_experts(model: nn.Module, report: Report, fmt: str, seed: int = 0) -> None:
    """Quantize every fused block's routed experts in place (model is the optimized copy) and record the effect."""
    check_expert_weights(fmt)
    start = time.perf_counter()
    records = {r.path: r for r in report.fused}
    errors = []
    for path, block in model.named_modules():
        if not isinstance(block, FusedMoE) or path not in records:
            continue
        note = _quantize_block(block, seed)
        records[path].expert_weights = note
        errors.append(note)
    worst = max((float(n.rsplit(" ", 1)[-1]) for n in errors if n.startswith("fp8")), default=None)
    report.passes.append(PassRun(name="expert_weights", seconds=time.perf_counter() - start, modified=bool(errors),
                                 note=f"{fmt}: {len(errors)} blocks"
                                      + ("" if worst is None else f", worst output error {worst:.1e}")))


def _quantize_block(block: FusedMoE, seed: int) -> str:
    """Swap one block's w1 / w2 for FP8 and block scales; returns the note for its record."""
    w = block.weights()
    if fp8.has_fp8(w):
        return "already FP8"
    if w.w1.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"left in {w.w1.dtype} (FP8 is made from fp32, bf16 or fp16 weights)"
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(PROBE_TOKENS, block.spec.hidden_size, generator=gen).to(w.w1.device, w.w1.dtype)
    with torch.no_grad():
        before = _output(block(x)).double()
        changes = {}
        for name in fp8.QUANTIZABLE:  # the routed experts, and the shared experts where there are
            weight = getattr(w, name)
            if weight is not None:
                changes[name], changes[name + "_scale"] = fp8.quantize(weight.detach())
        block.replace_weights(**changes)
        after = _output(block(x)).double()
    error = ((after - before).norm() / before.norm().clamp_min(1e-30)).item()
    return f"fp8 (float8_e4m3fn, 128 x 128 block scales): output error on {PROBE_TOKENS} probe tokens {error:.3e}"


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
