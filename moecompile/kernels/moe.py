"""The kernels' entry: one MoE block's forward on the Triton kernels, by the shortest path the call allows.

Place in the pipeline: FusedMoE.forward calls `run` (after checking `unsupported_reason` once) and users of the
kernels alone call `kernels_forward`. Eager inference launches directly (kernels/launch.py), without the op's
dispatch; calls that need gradients, or the routing outputs inside a compiled graph, go through the registered op
(kernels/op.py); compiled inference graphs with static shapes trace the launches themselves, so that Inductor calls
the kernels from its own code.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from ..errors import MoECompileError
from ..spec import MoESpec, MoEWeights
from . import launch, op, traced
from .launch import INTERPRETED, gating_fallback_reason, unsupported_reason

__all__ = ["kernels_forward", "run", "traceable", "unsupported_reason"]


def kernels_forward(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None = None,
                    spec_json: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block on x [T, H] through the kernels: (y [T, H], logits [T, E] fp32, slot weights [T, S] fp32). Raises
    if the kernels cannot take this call (unsupported_reason)."""
    reason = unsupported_reason(spec, weights, x)
    if reason is not None:
        raise MoECompileError(f"the Triton MoE kernels cannot run this call: {reason}; use the reference path "
                              f"(FusedMoE(..., backend='reference'))")
    return run(spec, weights, x, seq_len, spec_json)


def traceable(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> bool:
    """Whether this call is being traced into a compiled graph that can hold its launches (launch.TRACED_LAUNCHES):
    fake tensors (AOTAutograd tracing for Inductor; dynamo itself, tracing an optimize()d model, keeps the op), a
    static token count (the tile choice and the grids depend on it; a symbolic count takes the op, so one graph
    serves every length), the gating kernel's router forms, and the kernels' devices and dtypes."""
    if torch.compiler.is_compiling():  # checked first: dynamo does not trace is_fake
        return False
    return (is_fake(x) and isinstance(x.shape[0], int)
            and x.device.type == "cuda" and not INTERPRETED  # wrap_triton takes no interpreted kernel
            and gating_fallback_reason(spec) is None and unsupported_reason(spec, weights, x) is None)


def run(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None = None,
        spec_json: str | None = None, need_routing: bool = True, through_op: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """kernels_forward for a call already checked with unsupported_reason (FusedMoE checks once, to pick a path).
    With need_routing=False a caller that reads only y may get None for the logits and slot weights (the graph
    replay then skips copying them out). through_op: the compile backend's graph calls, which Inductor traces with
    fake tensors (the eager shortcut cannot take them): inference calls with static shapes that read y alone trace
    the launches themselves (traceable), the rest go through the registered op (off the kernels' reach it computes
    with the reference)."""
    seq_len = seq_len if seq_len is not None else max(x.shape[0], 1)
    spec_json = spec_json or spec.to_json()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for _, t in weights.items()))
    if not through_op and not torch.compiler.is_compiling():  # eager: no op dispatch (tens of microseconds a call)
        if needs_grad:
            return op.EagerMoE.apply(*op.op_args(spec_json, weights, x, seq_len))
        outputs = launch.launch(spec, spec_json, weights, x, seq_len, copy_out=3 if need_routing else 1)
        return outputs if need_routing else (outputs[0], None, None)
    if need_routing or needs_grad:
        return torch.ops.moecompile.moe_forward(*op.op_args(spec_json, weights, x, seq_len))
    if traceable(spec, weights, x):
        traced.install()
        token = launch.TRACED_LAUNCHES.set(True)
        try:
            return launch.forward(spec, weights, x, seq_len)[0], None, None
        finally:
            launch.TRACED_LAUNCHES.reset(token)
    return torch.ops.moecompile.moe_forward_y(*op.op_args(spec_json, weights, x, seq_len)), None, None
