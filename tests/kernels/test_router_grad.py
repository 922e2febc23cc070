"""The router's gradient in closed form (kernels/router_grad.py) against autograd through the reference's routing on
the same chosen experts, for every router form it takes, in float64 so that the comparison is of formulas, not of
rounding: relative error 1e-12. Inputs aimed at its branches: the renormalisation's floor held and not held, ties
in the logits, a logits gradient present and absent, sigmoid scores near 0 and 1."""
from __future__ import annotations

import cases
import pytest
import torch

from moecompile.kernels import router_grad
from moecompile.reference import route
from moecompile.spec import MoEWeights

CLOSED = [name for name in cases.ROUTERS if router_grad.closed_form_reason(cases.make_spec(name, 16, 4, 32, 8).router)
          is None]


def test_the_common_forms_take_the_closed_form_and_the_rest_do_not():
    assert set(CLOSED) == {"softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_grouped_corr",
                           "sigmoid_grouped_fill0", "sigmoid_topk_bias"}
    for name in ("sqrtsoftplus_topk", "relu_topk", "sparsemixer", "capacity", "relu_bias"):
        assert router_grad.closed_form_reason(cases.make_spec(name, 16, 4, 32, 8).router) is not None, name


def autograd_logits_grad(router, weights, x, ids, g, grad_logits):
    """The logits' gradient as backward.py's autograd pass gets it: through route(..., chosen=ids)."""
    logits = (x @ weights.router_weight.t() + (weights.router_bias if weights.router_bias is not None else 0))
    logits = logits.detach().requires_grad_(True)
    # route() computes the logits itself: hand it these through an identity router weight
    eye = torch.eye(logits.shape[1], dtype=logits.dtype)
    routing = route(router, MoEWeights(router_weight=eye, w1=weights.w1, w2=weights.w2,
                                       correction_bias=weights.correction_bias), logits, chosen=ids)
    outputs, incoming = [routing.slot_weights(router.scaling_factor)], [g]
    if grad_logits is not None:
        outputs.append(routing.logits)
        incoming.append(grad_logits)
    return torch.autograd.grad(outputs, [logits], incoming)[0]


@pytest.mark.parametrize("name", CLOSED)
@pytest.mark.parametrize("case", ["plain", "ties", "floor", "saturated"])
@pytest.mark.parametrize("with_logits_grad", [False, True])
def test_closed_form_equals_autograd(name, case, with_logits_grad):
    E, k, H, T = 16, 4, 32, 57
    spec = cases.make_spec(name, E, k, H, 8)
    gen = torch.Generator().manual_seed(hash((name, case)) % 2**31)
    w = cases.upcast(cases.make_weights(spec, torch.float32, "cpu", gen))
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    router = spec.router
    if case == "ties":  # tokens 0..9 identical and the router's rows pairwise equal: tied logits within a token
        x[:10] = x[0]
        w.router_weight[1::2] = w.router_weight[0::2]
    if case == "floor":  # the renormalisation floor above every sum: w = a / floor
        router = type(router)(**{**router.__dict__, "renorm_min": 50.0})
    if case == "saturated":  # scores at 0 and 1 (sigmoid) or one dominant expert (softmax)
        x = x * 40
    logits = x @ w.router_weight.t() + (w.router_bias if w.router_bias is not None else 0)
    ids = route(router, w, x).expert_index.view(T, k)
    g = torch.randn(T, k, generator=gen, dtype=torch.float64)
    grad_logits = torch.randn(T, E, generator=gen, dtype=torch.float64) if with_logits_grad else None
    got = router_grad.logits_grad(router, logits, ids, g, grad_logits)
    want = autograd_logits_grad(router, w, x, ids, g, grad_logits)
    assert got.dtype == torch.float64
    assert cases.relative_error(got.double(), want) < 1e-12
