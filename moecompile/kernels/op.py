"""The kernels as PyTorch ops: `torch.ops.moecompile.moe_forward` (y, router logits, slot weights), its output alone
`moe_forward_y` (for compiled inference graphs), and `moe_backward`, all on one argument schema, with fake (shape)
implementations and moe_forward's autograd formula, so the same computation runs eagerly, is traced by
torch.compile and torch.export, and is captured in CUDA graphs.

Place in the pipeline: kernels/moe.py's `run` calls these ops where a call needs the dispatcher (gradients, compiled
graphs, the routing outputs); their implementations call the launch path (kernels/launch.py), or the PyTorch
reference off the kernels' reach (torch.compile graphs call the op on any device). Backward is an op of its own so
that AOTAutograd traces it as one call: the Triton backward kernels (kernels/backward.py), or for the calls they do
not take the differentiable reference (reference.py) recomputed under autograd.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from .. import fp8
from ..reference import reference_forward
from ..spec import MoESpec, MoEWeights
from . import backward
from .backward import autograd_inside_op
from .keep import Kept, keep_reason
from .launch import launch, reference_outputs, slots_of, unsupported_reason

# the ops' tensor arguments, in schema order (MoEWeights' names after x); the first four are always present
TENSOR_ARGS = ("x", "router_weight", "w1", "w2", "router_bias", "correction_bias", "b1", "b2", "shared_w1",
               "shared_w2", "shared_b1", "shared_b2", "shared_gate", "output_bias", "w1_scale", "w2_scale",
               "shared_w1_scale", "shared_w2_scale")
_INPUTS = ", ".join(f"Tensor{'?' if i >= 4 else ''} {name}" for i, name in enumerate(TENSOR_ARGS))
# the forward ops' one argument list: the tensors, the block's spec as JSON, and the sequence length
FORWARD_ARGS = f"({_INPUTS}, str spec_json, SymInt seq_len)"


@lru_cache(maxsize=64)
def spec_of(spec_json: str) -> MoESpec:
    return MoESpec.from_dict(json.loads(spec_json))


def op_args(spec_json: str, weights: MoEWeights, x: torch.Tensor, seq_len: int) -> tuple:
    """The forward ops' arguments, in FORWARD_ARGS' order."""
    return (x, *[getattr(weights, name) for name in TENSOR_ARGS[1:]], spec_json, seq_len)


def _unpack(args: tuple) -> tuple[torch.Tensor, MoEWeights, str, int]:
    """op_args' inverse: (x, weights, spec_json, seq_len)."""
    n = len(TENSOR_ARGS)
    return args[0], MoEWeights(**dict(zip(TENSOR_ARGS[1:], args[1:n]))), args[n], args[n + 1]


def _op_impl(x: torch.Tensor, weights: MoEWeights, spec_json: str, seq_len: int, copy_out: int,
             keep: list | None = None):
    spec = spec_of(spec_json)
    if unsupported_reason(spec, weights, x) is not None:  # torch.compile graphs call the op on any device
        return reference_outputs(spec, weights, x, seq_len)[:copy_out]
    return launch(spec, spec_json, weights, x, seq_len, copy_out=copy_out, keep=keep)


@torch.library.custom_op("moecompile::moe_forward", mutates_args=(),
                         schema=f"{FORWARD_ARGS} -> (Tensor, Tensor, Tensor)")
def moe_forward_op(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [T, H] in x's dtype, router logits [T, E] fp32, slot weights [T, k] fp32 (ReLU routing: gates [T, E])."""
    return _op_impl(*_unpack(args), copy_out=3)


@torch.library.custom_op("moecompile::moe_forward_y", mutates_args=(), schema=f"{FORWARD_ARGS} -> Tensor")
def moe_forward_y_op(*args) -> torch.Tensor:
    """moe_forward's y alone, for compiled inference graphs that read nothing else: a graph replay then copies out
    one tensor instead of three. No autograd formula: `run` calls it only when no gradient is wanted."""
    return _op_impl(*_unpack(args), copy_out=1)[0]


@moe_forward_y_op.register_fake
def _(*args):
    x = args[0]
    return x.new_empty(x.shape)


@moe_forward_op.register_fake
def _(*args):
    x, _, spec_json, _ = _unpack(args)
    spec = spec_of(spec_json)
    T = x.shape[0]
    return (x.new_empty(T, x.shape[1]), x.new_empty(T, spec.num_experts, dtype=torch.float32),
            x.new_empty(T, slots_of(spec), dtype=torch.float32))


def backward_impl(grad_y: torch.Tensor | None, grad_logits: torch.Tensor | None, grad_weight: torch.Tensor | None,
                  inputs: list[torch.Tensor | None], wanted: list[bool], spec_json: str,
                  seq_len: int, kept: Kept | None = None) -> list[torch.Tensor]:
    """The gradients of moe_forward's tensor inputs marked in `wanted` (in TENSOR_ARGS order): the Triton backward
    (kernels/backward.py) where the kernels run, else the PyTorch reference recomputed under autograd. kept: what
    the forward kept for this backward (kernels/keep.py), consumed here."""
    spec = spec_of(spec_json)
    x, weights = inputs[0], MoEWeights(**dict(zip(TENSOR_ARGS[1:], inputs[1:])))
    if _kernel_backward(spec, weights, x):
        grads = backward.backward(spec, weights, x, seq_len, grad_y, grad_logits, grad_weight,
                                  dict(zip(TENSOR_ARGS, wanted)), kept)
        return [grads[name] for name, needs in zip(TENSOR_ARGS, wanted) if needs]
    with autograd_inside_op(), torch.enable_grad():
        leaves = {name: None if t is None else t.detach().requires_grad_(needs)
                  for name, t, needs in zip(TENSOR_ARGS, inputs, wanted)}
        x = leaves.pop("x")
        y, routing = reference_forward(spec, MoEWeights(**leaves), x, seq_len)
        slot_weights = routing.slot_weights(spec.router.scaling_factor)
        targets = [x, *leaves.values()]
        # outputs whose gradient is None (eager calls do not materialise unread outputs' gradients) are left out
        outputs = [(o, g) for o, g in zip([y, routing.logits, slot_weights], [grad_y, grad_logits, grad_weight])
                   if g is not None]
        grads = torch.autograd.grad([o for o, _ in outputs], [t for t, needs in zip(targets, wanted) if needs],
                                    [g for _, g in outputs], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, [t for t, needs in zip(targets, wanted) if needs])]


@torch.library.custom_op("moecompile::moe_backward", mutates_args=())
def moe_backward_op(grad_y: torch.Tensor, grad_logits: torch.Tensor | None, grad_weight: torch.Tensor | None,
                    inputs: list[torch.Tensor | None], wanted: list[bool], spec_json: str,
                    seq_len: int) -> list[torch.Tensor]:
    """backward_impl as an op of its own, so that AOTAutograd (torch.compile training) traces one opaque call: both
    of its paths have data-dependent sizes inside that tracing cannot take."""
    return backward_impl(grad_y, grad_logits, grad_weight, inputs, wanted, spec_json, seq_len)


@moe_backward_op.register_fake
def _(grad_y, grad_logits, grad_weight, inputs, wanted, spec_json, seq_len):
    return [torch.empty_like(t) for t, needs in zip(inputs, wanted) if needs]


def _kernel_backward(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> bool:
    """Whether a call's backward runs on the kernels (kernels/backward.py) rather than the reference."""
    # FP8 expert weights are not trained: the input's and the router's gradients come from the reference, which
    # dequantizes them
    return (unsupported_reason(spec, weights, x) is None and backward.reason(spec) is None
            and not fp8.has_fp8(weights))


def _setup_context(ctx, inputs, output):
    ctx.spec_json, ctx.seq_len = inputs[-2], inputs[-1]
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs[:-2]])
    ctx.present = [t is not None for t in inputs[:-2]]


def _input_grads(ctx, grad_y, grad_logits, grad_weight, compute) -> tuple:
    """moe_forward's autograd formula: the saved inputs and the wanted gradients handed to `compute` (the backward
    op, or backward_impl itself), its results placed at their inputs, None elsewhere."""
    inputs = [t if present else None for t, present in zip(ctx.saved_tensors, ctx.present)]
    wanted = [present and needs for present, needs in zip(ctx.present, ctx.needs_input_grad)]
    grads = iter(compute(grad_y, grad_logits, grad_weight, inputs, wanted, ctx.spec_json, ctx.seq_len))
    return (*[next(grads) if needs else None for needs in wanted], None, None)


def _backward(ctx, grad_y, grad_logits, grad_weight):
    return _input_grads(ctx, grad_y, grad_logits, grad_weight, torch.ops.moecompile.moe_backward)


moe_forward_op.register_autograd(_backward, setup_context=_setup_context)


class EagerMoE(torch.autograd.Function):
    """moe_forward with the same autograd formula for eager calls that need gradients, without the dispatcher:
    the op's way in (schema defaults filled, redispatch below autograd, its dynamo guard) costs more host time
    per call than the launches themselves at a few thousand tokens, twice a training step. Compiled graphs keep
    the ops (kernels/moe.py's run chooses)."""

    @staticmethod
    def forward(ctx, *args):
        ctx.set_materialize_grads(False)  # unread outputs' gradients stay None, as the op's formula gets them
        x, weights, spec_json, seq_len = _unpack(args)
        spec = spec_of(spec_json)
        keep = [] if keep_reason(spec, weights, x) is None and _kernel_backward(spec, weights, x) else None
        outputs = _op_impl(x, weights, spec_json, seq_len, copy_out=3, keep=keep)
        _setup_context(ctx, args, outputs)
        # a plain attribute, not save_for_backward: the backward overwrites it (one use), and saved-tensor hooks,
        # which save_for_backward would call, are never active here (keep_reason)
        ctx.kept = keep[0] if keep else None
        return outputs

    @staticmethod
    def backward(ctx, grad_y, grad_logits, grad_weight):
        kept, ctx.kept = ctx.kept, None  # one backward uses it up; a second (retain_graph) recomputes

        def compute(*args):
            return backward_impl(*args, kept=kept)
        return _input_grads(ctx, grad_y, grad_logits, grad_weight, compute)
