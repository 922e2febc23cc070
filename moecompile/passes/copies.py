"""Working copies of a candidate block for describe and confirm: float32, on the CPU, hooks stripped, redrawn or not.

Place in the pipeline: describe and confirm run the user's block only through these copies, never the block itself.
- On the CPU: a block's float32 copy is twice its bf16 weights (a Qwen3-30B-A3B block: 2.4 GB against 1.2 GB), so
  copies on the GPU would raise a model's memory by more than a layer while it is optimized. The copy is built by
  deepcopy with a memo that maps each of the block's tensors straight to its CPU float32 copy, so nothing is
  duplicated on the block's device first. A block already float32 on the CPU shares its tensors with the copy.
- Float32 inside: a block's own autocast region is a no-op in the copy, recorded (passes/autocast_regions.py).
- Hooks stripped: the copy computes the block's own forward (a hook's effect is not part of the description, and a
  profiler's hook must not record moecompile's random calls); the fuse pass carries the block's hooks over.
- Redrawn (`seed`): floating tensors drawn N(0, 1/fan_in) for matrices (per expert for 3-D ones), N(0, 0.5) for
  vectors, so a bias initialised to zero (DeepSeek-V3's correction bias) takes part. Drawn on the block's own device
  in chunks of CHUNK elements and copied over: a CPU generator takes seconds for a 600M-weight block.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import torch
from torch import nn

from .autocast_regions import compute_in_float32

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
CHUNK = 1 << 25  # elements drawn at a time on the block's device (128 MB in float32)


HOOK_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")  # the others
# in HOOK_DICTS are flags keyed by these hooks' ids


def hooks_of(module: nn.Module) -> dict[str, int]:
    """The forward/backward hooks registered on `module` itself: {kind: count}, empty if none."""
    return {name.strip("_"): len(getattr(module, name)) for name in HOOK_KINDS if getattr(module, name, None)}


def registered_hooks(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(submodule, hook dict name) for every non-empty hook dict in `module` and below."""
    return [(sub, name) for sub in module.modules() for name in HOOK_DICTS if getattr(sub, name, None)]


def _strip_hooks(module: nn.Module) -> None:
    for sub, name in registered_hooks(module):
        setattr(sub, name, OrderedDict())


def working_copy(block: nn.Module, *, seed: int | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """A float32 copy of `block` on `device` in eval mode, without hooks; its floating tensors redrawn if `seed` is
    given (see the module docstring)."""
    device = torch.device(device)
    generators: dict[torch.device, torch.Generator] = {}
    memo: dict[int, object] = {}
    for tensor in itertools.chain(block.parameters(), block.buffers()):
        if id(tensor) in memo:
            continue
        if seed is not None and tensor.is_floating_point():
            value = _drawn(tensor, device, generators, seed)
        elif tensor.device == device and (tensor.dtype == torch.float32 or not tensor.is_floating_point()):
            memo[id(tensor)] = tensor  # shared: nothing to convert
            continue
        else:
            value = tensor.detach().to(device=device, dtype=torch.float32 if tensor.is_floating_point() else None)
        memo[id(tensor)] = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else value
    dup = copy.deepcopy(block, memo)
    _strip_hooks(dup)
    compute_in_float32(dup)  # a block's own autocast region does nothing in the copy (autocast_regions.py)
    return dup.eval()


def _drawn(tensor: torch.Tensor, device: torch.device, generators: dict, seed: int) -> torch.Tensor:
    std = (1.0 / tensor.shape[-1]) ** 0.5 if tensor.dim() >= 2 else 0.5
    source = tensor.device
    if source not in generators:
        generators[source] = torch.Generator(device=source).manual_seed(seed)
    out = torch.empty(tensor.shape, dtype=torch.float32, device=device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        flat[start:start + n].copy_(torch.randn(n, generator=generators[source], device=source).mul_(std))
    return out


def redraw_vectors(block: nn.Module, num_experts: int, mean: float, std: float, seed: int) -> None:
    """Redraw in place every floating [E] or [1, E] tensor of a working copy (router and correction biases, whatever
    their names) from N(mean, std): confirm's negative-bias and large-bias weight variants."""
    if num_experts < 2:
        return  # nothing to route; a scalar parameter of the block is not a bias
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in itertools.chain(block.parameters(), block.buffers()):
            if tensor.is_floating_point() and tensor.numel() == num_experts and max(tensor.shape, default=0) == \
                    num_experts and tensor.dim() <= 2:
                tensor.copy_((torch.randn(tensor.shape, generator=gen) * std + mean).to(tensor.device))
