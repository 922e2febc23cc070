"""What a training forward keeps for its backward: the routed experts' up projection, when the backward would
otherwise recompute it with one more grouped GEMM.

Place in the pipeline: kernels/op.py's EagerMoE (eager calls that record gradients) asks `keep_reason`; when it is
None, kernels/launch.py's forward runs the routed experts on grouped_mm in the backward's row layout
(grouped.expert_rows_kept) and returns a `Kept`, which kernels/backward.py hands to grouped_backward.routed_grads.
The backward overwrites the kept up projection with its gradient, so a `Kept` serves one backward; a second
backward through the same graph (retain_graph) recomputes.

What is kept, per block: the up projection [T * k + E, F] in x's dtype (the rows HF's grouped_mm autograd saves as
well), the row layout (a few int64 vectors of T * k), and the routing (logits [T, E] and weights [T, k] fp32, ids
[T, k]). Not kept, and recomputed as before: under saved-tensor hooks (activation checkpointing, offloading), whose
owner decides what a forward holds; in compiled graphs (the op's schema returns y, logits and weights only); with
settings.keep_up_projection_min_rows None (the recompute option); and for the forms grouped.expert_rows_kept does
not take (ReLU routing, expert biases, the weight on the input, the grouped backward's refusals).

Why: at 4096 tokens on a Qwen3-30B-A3B layer the recomputed up GEMM was one of the backward's five grouped GEMMs
(about 0.4 of its 1.97 ms on the H100), with a [T * k, H] gather, the routing and a sort before it
(benchmarks/NOTES.md, "Training step").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import MoESpec, MoEWeights
from . import configs, grouped_backward
from .grouped import RowLayout
from .settings import settings


@dataclass
class Kept:
    """A training forward's routing and up projection, in grouped.RowLayout's rows."""

    logits: torch.Tensor  # [T, E] fp32
    weight: torch.Tensor  # [T, k] fp32: the slot weights
    ids: torch.Tensor  # [T, k]: each slot's expert
    layout: RowLayout
    gu: torch.Tensor  # [n, F]: x's rows times W1^T, overwritten by the backward


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (torch.utils.checkpoint, offloading): they decide what a forward
    holds, and a tensor kept beside them would be held through a forward that was meant to hold nothing."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # an unknown torch: assume hooks, keep nothing
        return True
    return top(False) is not None


def keep_reason(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> str | None:
    """Why this training call's forward keeps nothing (its backward recomputes the up projection), or None."""
    threshold = settings.keep_up_projection_min_rows
    if threshold is None:
        return "settings.keep_up_projection_min_rows is None (recompute)"
    if spec.router.is_variable_k:
        return "ReLU routing (its rows vary in number per token)"
    if configs.rows_per_expert(x.shape[0], spec.router.top_k, spec.num_experts) < threshold:
        return f"fewer than {threshold:g} rows an expert (the Triton forward is faster there)"
    if saved_tensor_hooks_active():
        return "saved-tensor hooks are active (activation checkpointing decides what is held)"
    reason = grouped_backward.unsupported_reason(spec, weights, x)
    if reason is not None:
        return reason
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:  # settings.grouped_backward="always"
        return f"grouped_mm takes bfloat16 only on the GPU, input is {x.dtype}"
    if weights.b1 is not None or weights.b2 is not None:
        return "expert biases"
    if spec.router.weight_on_input:
        return "the routing weight on the expert's input"
    return None
