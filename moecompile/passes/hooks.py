"""Hooks on MoE blocks: the block's own hooks carry over to its FusedMoE; hooks inside it keep the block as it is.

Place in the pipeline: detect -> **hooks (leave)** -> describe -> confirm -> fuse (**carry over**). Profilers,
activation recorders and offloading libraries attach forward hooks and pre-hooks to modules; a fused block is one
module, so
- hooks on the block itself are moved to the FusedMoE that replaces it: the same hook objects, in the same order,
  with their kwargs / always-call flags, in the very dicts the handles point at (so `handle.remove()` still works
  after an in-place optimize). A pre-hook sees the same hidden states and a forward hook the same output structure;
  the module it is given is the FusedMoE;
- a block with hooks on a module inside it (its router, an expert) is left as it is, with the reason: those
  modules no longer run once the block is fused, and their hooks would stop firing without a word. The one
  exception is the hooks transformers installs on the router to record its logits (`output_router_logits`): the
  router tap (router_tap.py) carries them, and they see the same logits;
- a block whose `forward` was replaced on the instance (Accelerate's `add_hook_to_module`, a monkey patch) is left:
  what the replacement adds (moving weights between devices, for Accelerate's offloading) cannot be read.
describe and confirm run hook-free working copies (copies.py), so no hook sees their random inputs.
"""

from __future__ import annotations

from torch import nn

from ..router_tap import carried_hooks
from .copies import HOOK_DICTS, hooks_of


def reason_to_leave(model: nn.Module, block: nn.Module) -> str | None:
    """Why `block` (inside `model`) must stay as it is because of hooks or a replaced forward, or None. The hooks
    transformers installs on the router to record its logits do not count: the router tap carries them
    (router_tap.py)."""
    if "forward" in vars(block) or hasattr(block, "_hf_hook"):
        return ("its forward is replaced on the instance (Accelerate's hooks or a monkey patch), and what the "
                "replacement adds cannot be read; optimize the model before dispatching or offloading it, or remove "
                "the patch")
    inner = []
    recorded_router, carried = carried_hooks(model, block)
    for path, sub in block.named_modules():
        if not path:
            continue
        found = hooks_of(sub)
        if sub is recorded_router and found.get("forward_hooks") == len(carried) and carried:
            found.pop("forward_hooks")
        if found or "forward" in vars(sub) or hasattr(sub, "_hf_hook"):
            kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in found.items()) or "a replaced forward"
            inner.append(f"{path} ({kinds})")
    if inner:
        return (f"hooks on modules inside it ({'; '.join(inner[:4])}) would stop firing once the block is one fused "
                "module; remove them (handle.remove()) before optimize, or register them on the block itself, whose "
                "hooks carry over")
    return None


def carry_over(block: nn.Module, fused: nn.Module) -> None:
    """Give `fused` the hooks registered on `block` itself (the same dicts: see the module docstring)."""
    for name in HOOK_DICTS:
        hooks = getattr(block, name, None)
        if hooks:
            setattr(fused, name, hooks)
    if hooks_of(block).get("backward_hooks"):
        fused._is_full_backward_hook = getattr(block, "_is_full_backward_hook", None)
