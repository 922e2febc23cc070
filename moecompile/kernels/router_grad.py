"""The router's share of the fused backward in closed form, for the common top-k forms.

Place in the pipeline: kernels/backward.py's `_router_grads` calls `logits_grad` first; where it returns a gradient
the router weight, its bias and the input get theirs from it with two GEMMs, and the autograd pass through the
reference's routing (about 40 aten calls a block, each a launch and a few microseconds of host time on a GPU) is
skipped. The forms it takes (`closed_form_reason` is None): top-k or grouped top-k selection on the chosen experts
(the selection itself has no gradient), softmax or sigmoid scores, either score order, renormalisation before any
drop, a scaling factor, a logits bias and a correction bias (choice only). Capacity limits, renormalisation after
the drop and the other scores keep the autograd pass. tests/kernels/test_backward.py checks every router form against
float64 autograd; test_router_grad.py checks this form against that pass directly.

With w the combine weights of the k chosen experts and g the gradient reaching them (the experts' dw plus what
reaches the op's slot-weight output), per token:
    renormalised (w = a / S, S = max(sum a, m)):  ga = (g - sum(g w)) / S,  or g / m where the floor holds
    softmax then select (a = softmax(z)[ids]):    dz = s * (scatter(ga) - sum(ga a))
    select then softmax (a = softmax(z[ids])):    dz[ids] = a * (ga - sum(ga a))
    sigmoid (either order, a = sigmoid(z[ids])):  dz[ids] = ga a (1 - a)
"""

from __future__ import annotations

import torch

from ..spec import RouterSpec


def closed_form_reason(router: RouterSpec) -> str | None:
    """Why this router's gradient goes through autograd instead, or None."""
    if router.selection not in ("topk", "grouped_topk"):
        return f"selection {router.selection!r}"
    if router.scoring not in ("softmax", "sigmoid"):
        return f"scoring {router.scoring!r}"
    if router.has_capacity or router.renorm_after_drop:
        return "expert capacity"
    return None


def logits_grad(router: RouterSpec, logits: torch.Tensor, ids: torch.Tensor, grad_slots: torch.Tensor,
                grad_logits: torch.Tensor | None) -> torch.Tensor:
    """The gradient of the router logits [T, E] (fp32, or float64 for float64 logits), given the logits, the
    chosen experts ids [T, k], the gradient of the combine weights grad_slots [T, k] and of the logits output
    (None: not read). closed_form_reason(router) must be None."""
    acc = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64 (the tests' reference)
    z = logits.to(acc)
    g = grad_slots.to(acc) * router.scaling_factor
    if router.score_order == "score_then_select" and router.scoring == "softmax":
        scores = z.softmax(dim=-1)
        a = scores.gather(1, ids)
    else:
        zk = z.gather(1, ids)
        a = zk.softmax(dim=-1) if router.scoring == "softmax" else zk.sigmoid()
    if router.renormalize:
        total = a.sum(dim=-1, keepdim=True)
        floor = torch.full_like(total, router.renorm_min)
        S = torch.maximum(total, floor)
        w = a / S
        # clamp's gradient passes where sum >= floor, as torch's clamp(min=...) backward does
        g = torch.where(total >= floor, (g - (g * w).sum(dim=-1, keepdim=True)) / S, g / S)
    if router.scoring == "sigmoid":
        dz = torch.zeros_like(z).scatter_(1, ids, g * a * (1 - a))
    elif router.score_order == "score_then_select":
        dz = scores * (torch.zeros_like(z).scatter_(1, ids, g) - (g * a).sum(dim=-1, keepdim=True))
    else:
        dz = torch.zeros_like(z).scatter_(1, ids, a * (g - (g * a).sum(dim=-1, keepdim=True)))
    return dz if grad_logits is None else dz + grad_logits.to(acc)
