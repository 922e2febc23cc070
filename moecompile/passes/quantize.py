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

import dataclasses
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


def quantize_experts(model: nn.Module, report: Report | None, fmt: str, seed: int = 0) -> None:
    """Quantize every fused block's experts in place and record the effect in `report` (when there is one). All
    blocks are quantized and measured before any is changed, so an error leaves the model as it was."""
    check_expert_weights(fmt)
    start = time.perf_counter()
    records = {r.path: r for r in report.fused} if report is not None else {}
    planned = [(path, block, *_quantized(block, seed)) for path, block in model.named_modules()
               if isinstance(block, FusedMoE) and (report is None or path in records)]
    for path, block, changes, note, _ in planned:
        if changes:
            block.replace_weights(**changes)
        if path in records:
            records[path].expert_weights = note
    if report is not None:
        errors = [error for *_, error in planned if error is not None]
        report.passes.append(PassRun(
            name="expert_weights", seconds=time.perf_counter() - start, modified=bool(errors),
            note=f"{fmt}: {len(errors)} blocks" + (f", worst output error {max(errors):.1e}" if errors else "")))


def _quantized(block: FusedMoE, seed: int) -> tuple[dict, str, float | None]:
    """(the block's FP8 tensors by MoEWeights name, or {} to leave it; the note for its record; its output error,
    None when left), measured on a twin of the block that shares its other weights: the block is not changed here."""
    w = block.weights()
    if fp8.has_fp8(w):
        return {}, "already FP8", None
    if w.w1.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return {}, f"left in {w.w1.dtype} (FP8 is made from fp32, bf16 or fp16 weights)", None
    changes = {}
    for name in fp8.QUANTIZABLE:  # the routed experts, and the shared experts where there are
        weight = getattr(w, name)
        if weight is not None:
            changes[name], changes[name + "_scale"] = fp8.quantize(weight.detach())
    twin = FusedMoE(block.spec, dataclasses.replace(w, **changes), backend=block.backend)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(PROBE_TOKENS, block.spec.hidden_size, generator=gen).to(w.w1.device, w.w1.dtype)
    with torch.no_grad():
        before, after = _output(block(x)).double(), _output(twin(x)).double()
    error = ((after - before).norm() / before.norm().clamp_min(1e-30)).item()
    return changes, (f"fp8 (float8_e4m3fn, 128 x 128 block scales): output error on {PROBE_TOKENS} probe tokens "
                     f"{error:.3e}"), error


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
