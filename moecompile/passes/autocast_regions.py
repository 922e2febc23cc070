"""Blocks that open their own autocast region (`with torch.autocast("cuda", dtype=torch.bfloat16): ...` inside the
block's forward): describe reads them in float32, the description says which region the block runs in.

Place in the pipeline: used by copies.working_copy (describe and confirm run the user's block through such copies).
A working copy's forward runs with the block's autocast regions turned into no-ops, so it computes in float32 as
every other working copy does and describe reads it exactly; the regions it asked for are recorded on the copy
(`autocast_asked`). The description then carries the region (MoESpec.autocast) and FusedMoE opens the same one, so
the fused block computes in the dtype the original did; confirm's kernel check judges it as it judges a bf16 block.

The no-op is a patch of torch.amp.autocast's __enter__/__exit__ (torch.autocast, torch.cpu.amp.autocast and
torch.cuda.amp.autocast are that class or subclasses of it) for the duration of the copy's forward, restored after.
A region that turns autocast off (`enabled=False`, common around routers) computes in float32 either way.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_AUTOCAST = torch.amp.autocast_mode.autocast
LOW_PRECISION = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextmanager
def regions_off(asked: set[tuple[str, str]]) -> Iterator[None]:
    """Autocast regions opened inside do nothing; each one that would have enabled a low-precision dtype is added
    to `asked` as (device type, dtype name)."""
    enter, leave = _AUTOCAST.__enter__, _AUTOCAST.__exit__

    def enter_nothing(region):
        if region._enabled and region.fast_dtype in LOW_PRECISION:
            asked.add((region.device, LOW_PRECISION[region.fast_dtype]))
        return region

    _AUTOCAST.__enter__, _AUTOCAST.__exit__ = enter_nothing, lambda region, *exc: False
    try:
        yield
    finally:
        _AUTOCAST.__enter__, _AUTOCAST.__exit__ = enter, leave


def compute_in_float32(copy: nn.Module) -> None:
    """Make a working copy's forward run without its autocast regions, recording them in `copy.autocast_asked`.
    The wrapper holds the copy weakly: a copy that referred to itself would be freed only by gc (test_memory)."""
    asked = copy.autocast_asked = set()
    own = copy.__dict__.get("forward")  # a forward set on the instance, else the class's, bound at call time
    ref, method = weakref.ref(copy), type(copy).forward

    @functools.wraps(own or method)
    def float32_forward(*args, **kwargs):
        with regions_off(asked):
            return own(*args, **kwargs) if own is not None else method(ref(), *args, **kwargs)

    copy.forward = float32_forward


def asked_region(copy: nn.Module) -> tuple[str, str] | None:
    """The one autocast region the copy's forward asked for, None if none; ValueError for several."""
    asked = getattr(copy, "autocast_asked", set())
    if len(asked) > 1:
        raise ValueError(f"the block opens autocast regions of several dtypes or devices ({sorted(asked)})")
    return next(iter(asked), None)
