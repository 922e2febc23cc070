"""The gating kernel (kernels/gating.py): every router form, grouped top-k over groups of several experts, expert
capacity and NaN tokens, through the whole op against the fp64 reference (gating decides every later launch).

Tolerances (normwise, vs fp64 on the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2;
logits 1e-5; combine weights 1e-5 abs. Every buffer the kernels allocate is poisoned (NaN / huge index) first
(the `poisoned` fixture), so an element no kernel wrote shows up as NaN or an out-of-range access. On the CPU
the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU the `cuda` cases run the full grid.
"""
from __future__ import annotations

import itertools

import cases
import pytest
import torch
from cases import DTYPES, needs_cuda, run_case

from moecompile.kernels import moe as kernel_moe
from moecompile.reference import reference_forward

pytestmark = pytest.mark.usefixtures("poisoned")


_seed = itertools.count(4321)


# up to 64 tokens (32 from 128 experts) one gating program routes and dispatches them all; past that, dispatch is a
# launch of its own: (70, 8, 2) and (33, 128, 1) take it
CPU_SHAPES = [(0, 8, 2), (1, 8, 2), (3, 1, 1), (37, 60, 6), (21, 8, 8), (70, 8, 2), (33, 128, 1)]


@pytest.mark.parametrize("router", list(cases.ROUTERS))
@pytest.mark.parametrize("T,E,k", CPU_SHAPES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in CPU_SHAPES])
def test_router_forms_cpu(router, T, E, k):
    if router == "sparsemixer" and E < 2:
        pytest.skip("sparsemixer picks 2 experts; E=1 is not a valid block")  # the spec refuses it
    run_case(router, E, k, T, 72, 40, torch.float32, "cpu")


def test_capacity_sequences_cpu():
    """Expert capacity counts within each sequence: 3 sequences of 12 tokens."""
    run_case("capacity", 4, 2, 36, 72, 40, torch.float32, "cpu", seq_len=12)


GROUPINGS = [(8, 2, 1, "top2_sum"), (8, 4, 2, "top2_sum"), (8, 2, 1, "max"), (64, 8, 3, "top2_sum"),
             (16, 4, 1, "max")]  # (E, n_group, topk_group, group score): groups of several experts, E < 16 padded


def run_grouped(E, n_group, topk_group, score, T, dtype, device):
    import dataclasses

    spec = cases.make_spec("sigmoid_grouped_corr", E, 2, 64, 48)
    spec = dataclasses.replace(spec, router=dataclasses.replace(spec.router, n_group=n_group, topk_group=topk_group,
                                                                group_score=score))
    gen = torch.Generator().manual_seed(next(_seed))
    weights = cases.make_weights(spec, dtype, device, gen)
    x = torch.randn(T, 64, generator=gen).to(device=device, dtype=dtype)
    y, logits, slot_weights = kernel_moe.kernels_forward(spec, weights, x)
    cases.check_against_reference(spec, weights, x, y, logits, slot_weights)


@pytest.mark.parametrize("E,n_group,topk_group,score", GROUPINGS)
def test_grouped_topk_groups_of_several_experts_cpu(E, n_group, topk_group, score):
    run_grouped(E, n_group, topk_group, score, 37, torch.float32, "cpu")


def run_nan_token(router, dtype, device, T=21):
    """A token holding a NaN gives a NaN row, in the kernels as in the reference (a ReLU gate of NaN runs its
    expert), and the other tokens are untouched (cases.TOLERANCE against the reference)."""
    spec = cases.make_spec(router, 8, 2, 72, 40)
    gen = torch.Generator().manual_seed(next(_seed))
    weights = cases.make_weights(spec, dtype, device, gen)
    x = torch.randn(T, 72, generator=gen)
    x[5, 3] = float("nan")
    x = x.to(device=device, dtype=dtype)
    y, _, _ = kernel_moe.kernels_forward(spec, weights, x)
    with cases.reference_ties(spec):
        y_ref, _ = reference_forward(spec, cases.upcast(weights), x.double())
    assert y_ref[5].isnan().all() and y[5].isnan().all()
    others = torch.arange(T, device=device) != 5
    assert cases.relative_error(y[others], y_ref[others]) <= cases.TOLERANCE[dtype]


@pytest.mark.parametrize("router", ["relu", "relu_bias", "softmax_topk_renorm", "sigmoid_grouped_fill0"])
def test_nan_token_stays_nan_cpu(router):
    run_nan_token(router, torch.float32, "cpu")


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("router", list(cases.ROUTERS))
@pytest.mark.parametrize("E,k", [(60, 6), (128, 8), (256, 8)])
def test_router_forms_cuda(router, dtype, E, k):
    run_case(router, E, k, 1000, 200, 136, DTYPES[dtype], "cuda")


@needs_cuda
@pytest.mark.parametrize("E,n_group,topk_group,score", GROUPINGS)
def test_grouped_topk_groups_of_several_experts_cuda(E, n_group, topk_group, score):
    run_grouped(E, n_group, topk_group, score, 1000, torch.bfloat16, "cuda")


@needs_cuda
@pytest.mark.parametrize("router", ["relu", "relu_bias", "softmax_topk_renorm", "sigmoid_grouped_fill0"])
@pytest.mark.parametrize("T", [21, 300])
def test_nan_token_stays_nan_cuda(router, T):
    run_nan_token(router, torch.bfloat16, "cuda", T)
