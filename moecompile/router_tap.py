"""Keep HF transformers' router-logits recording working after a block is fused.

Place in the pipeline: used by the fuse pass. HF models collect `router_logits` (for `output_router_logits=True` and
the load-balancing aux loss) with forward hooks on the router module class named in `model._can_record_outputs`.
Fusing removes that module, so the FusedMoE calls a tap instead: a module that passes the logits through and is an
instance of the original router class (a generated subclass that only overrides `__init__` and `forward`), so HF's
hook installer finds it, and that carries over any recording hook already installed on the original router.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .state import kept


class RouterLogitsTap(nn.Module):
    """Returns the logits at every tuple position up to `index`, where HF's recorder reads them."""

    def __init__(self, index: int):
        nn.Module.__init__(self)
        self.index = index

    def forward(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (router_logits,) * (self.index + 1)

    impersonates: type | None = None  # the router class a generated subclass stands in for

    def __reduce__(self):
        # the generated class is not importable by name: rebuild it, then restore the state (deepcopy must keep the
        # recording hooks HF installed, since HF does not install them again on a copied model)
        return _tap_for, (self.impersonates, self.index), self.__dict__


_TAP_CLASSES: dict[type, type] = kept("router_tap: a tap class per HF router class", {})


def _tap_for(target: type, index: int) -> RouterLogitsTap:
    if target not in _TAP_CLASSES:
        _TAP_CLASSES[target] = type(f"RouterLogitsTap_{target.__name__}", (RouterLogitsTap, target),
                                    {"__init__": RouterLogitsTap.__init__, "forward": RouterLogitsTap.forward,
                                     "__module__": __name__, "impersonates": target})
    return _TAP_CLASSES[target](index)


def _recorders(model: nn.Module) -> list:
    records = getattr(model, "_can_record_outputs", None) or {}
    specs = records.get("router_logits")
    if specs is None:
        return []
    return specs if isinstance(specs, list) else [specs]


def _recorded_router(model: nn.Module, block: nn.Module) -> tuple[nn.Module, type, int] | None:
    """(the module inside `block` whose outputs the model records as router logits, its class, the tuple index)."""
    for spec in _recorders(model):
        target = getattr(spec, "target_class", None)
        if not isinstance(target, type):
            continue
        router = next((m for m in block.modules() if isinstance(m, target)), None)
        if router is not None:
            return router, target, getattr(spec, "index", 0)
    return None


def is_recording_hook(hook: Callable) -> bool:
    """Whether a forward hook is one transformers installed to record outputs (the tap carries those)."""
    return getattr(hook, "__module__", "").startswith("transformers.")


def carried_hooks(model: nn.Module, block: nn.Module) -> tuple[nn.Module | None, list]:
    """(the recorded router inside `block`, the hooks on it the tap carries over), or (None, [])."""
    found = _recorded_router(model, block)
    if found is None:
        return None, []
    router = found[0]
    return router, [h for h in router._forward_hooks.values() if is_recording_hook(h)]


def make_tap(model: nn.Module, block: nn.Module) -> RouterLogitsTap | None:
    """A tap for `block` (about to be fused inside `model`), or None when the model records no router logits from
    a module inside the block."""
    found = _recorded_router(model, block)
    if found is None:
        return None
    _, target, index = found
    tap = _tap_for(target, index)
    for hook in carried_hooks(model, block)[1]:  # hooks HF installed before the fuse (the model already ran)
        tap.register_forward_hook(hook)
    return tap
