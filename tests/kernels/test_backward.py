"""The Triton backward (kernels/backward.py) against float64 autograd through the reference, on the same values:
router forms, MLP variants, token counts 0/1/odd, E 1..256, k 1..8, fp32/bf16/fp16, the branches that tell the
activation's derivative from its neighbours (clamps), the routing outputs' own gradients (ReMoE's L1 term), frozen
experts, and deterministic mode. On the CPU the kernels run in Triton's interpreter; the *_cuda tests on the GPU.

Tolerances: normwise relative error of each gradient against the float64 reference on the same (rounded) inputs,
1e-5 in fp32 (the products are exact in fp32, sums of a few hundred terms), 3e-3 in fp16 and 2.5e-2 in bf16 (h, dpre
and the scaled dy are rounded to the input dtype before their GEMMs, as autograd in that dtype would)."""
from __future__ import annotations

import cases
import pytest
import torch

import moecompile
from moecompile.kernels import backward as kernel_backward
from moecompile.kernels import launch as kernel_launch
from moecompile.kernels import moe as kernel_moe
from moecompile.kernels import op as kernel_op
from moecompile.spec import MoEWeights

GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter cases run on the CPU machine")


@pytest.fixture
def no_reference_backward(monkeypatch):
    """The backward must not fall back to recomputing the reference under autograd."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference was recomputed in the backward")
    monkeypatch.setattr(kernel_op, "reference_forward", refuse)


def assert_close(errors: dict[str, float], dtype) -> None:
    bad = {n: e for n, e in errors.items() if not e <= GRAD_TOLERANCE[dtype]}
    assert not bad, f"gradients off the float64 reference: {bad}"


ROUTERS = [r for r in cases.ROUTERS if r != "sparsemixer"]


@cpu_only
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (29, 8, 2), (37, 16, 4)])
def test_router_forms_cpu(no_reference_backward, router, T, E, k):
    errors, _, _ = cases.gradient_errors(router, E, k, T, 48, 32, torch.float32, "cpu", seed=T + E)
    assert_close(errors, torch.float32)


@cpu_only
@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cpu(no_reference_backward, mlp):
    errors, _, _ = cases.gradient_errors("softmax_topk_renorm", 8, 2, 23, 48, 32, torch.float32, "cpu", seed=4,
                                         mlp=mlp)
    assert_close(errors, torch.float32)


@cpu_only
@pytest.mark.parametrize("E,k", [(1, 1), (3, 2), (64, 8), (256, 8)])
def test_expert_counts_cpu(no_reference_backward, E, k):
    errors, _, _ = cases.gradient_errors("softmax_topk", E, k, 40, 32, 16, torch.float32, "cpu", seed=E)
    assert_close(errors, torch.float32)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router", ["softmax_topk_renorm", "relu_bias", "sigmoid_grouped_corr"])
def test_low_precision_cpu(no_reference_backward, dtype, router):
    errors, _, _ = cases.gradient_errors(router, 16, 4, 67, 64, 48, dtype, "cpu", seed=2)
    assert_close(errors, dtype)


@cpu_only
@pytest.mark.parametrize("mlp", ["clamped_swiglu", "clamped_swiglu_bias", "clamped_silu"])
def test_clamped_gates_both_sides_of_each_clamp_cpu(no_reference_backward, mlp):
    """The limit is set inside the range of the gate and up values, so the clamps' zero-gradient side is taken by
    a good share of the elements (a derivative that ignored the clamps would be off by far more than 1e-5)."""
    def small_limit(spec, weights, x):
        object.__setattr__(spec.experts, "activation_limit", 0.4)

    errors, _, _ = cases.gradient_errors("softmax_topk", 8, 2, 31, 48, 32, torch.float32, "cpu", seed=9, mlp=mlp,
                                         setup=small_limit)
    assert_close(errors, torch.float32)


@cpu_only
def test_zero_tokens_cpu(no_reference_backward):
    spec = cases.make_spec("softmax_topk", 8, 2, 24, 16, "shared_gated")
    w = {n: t.requires_grad_(True) for n, t in cases.make_weights(spec, torch.float32, "cpu",
                                                                  torch.Generator().manual_seed(0)).items()
         if t is not None}
    x = torch.zeros(0, 24, requires_grad=True)
    y, logits, slot = kernel_moe.kernels_forward(spec, MoEWeights(**w), x)
    (y.sum() + logits.sum() + slot.sum()).backward()
    assert x.grad.shape == (0, 24)
    for name, t in w.items():
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name


def _loss_with_routing_outputs(spec, weights, x, probe, forward):
    """y against a probe plus terms on the logits and on the slot weights (ReMoE's L1 on the gates is of the
    latter kind)."""
    y, logits, slot = forward(spec, weights, x)
    slot_probe = torch.linspace(-1, 2, slot.shape[-1], dtype=torch.float64)
    return ((y.double() * probe).sum() + 0.3 * (logits.double() ** 2).sum()
            + (slot.double() * slot_probe).sum())


def _reference_outputs(spec, weights, x):
    y, routing = moecompile.reference.reference_forward(spec, weights, x)
    return y, routing.logits, routing.slot_weights(spec.router.scaling_factor)


@cpu_only
@pytest.mark.parametrize("router", ["softmax_topk_renorm", "relu_bias", "sigmoid_grouped_corr", "capacity"])
def test_gradients_through_the_routing_outputs_cpu(no_reference_backward, router):
    spec = cases.make_spec(router, 8, 2, 32, 24)
    gen = torch.Generator().manual_seed(11)
    base = cases.make_weights(spec, torch.float32, "cpu", gen)
    x0 = torch.randn(19, 32, generator=gen)
    probe = torch.randn(19, 32, generator=gen, dtype=torch.float64)
    got, want = {}, {}
    for target, forward, dtype in ((got, kernel_moe.kernels_forward, torch.float32),
                                   (want, _reference_outputs, torch.float64)):
        leaves = {n: t.detach().to(dtype).requires_grad_(True) for n, t in base.items() if t is not None}
        x = x0.to(dtype, copy=True).requires_grad_(True)
        with cases.reference_ties(spec):
            _loss_with_routing_outputs(spec, MoEWeights(**leaves), x, probe, forward).backward()
        target.update({"x": x.grad, **{n: t.grad for n, t in leaves.items()}})
    for name in ("x", "router_weight", "w1", "w2"):
        assert cases.relative_error(got[name], want[name]) < 1e-5, name


@cpu_only
def test_frozen_experts_get_no_gradient_work_cpu(no_reference_backward, monkeypatch):
    """Only the router and the input need gradients (experts frozen, as when fine-tuning a router): the weight
    gradient kernel is not launched, and the router's gradient is still exact."""
    launched = []
    real = kernel_backward._weight_grad
    monkeypatch.setattr(kernel_backward, "_weight_grad", lambda *a, **k: launched.append(1) or real(*a, **k))
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 32, 24)
    gen = torch.Generator().manual_seed(5)
    w = cases.make_weights(spec, torch.float32, "cpu", gen)
    w.router_weight.requires_grad_(True)
    x = torch.randn(21, 32, generator=gen, requires_grad=True)
    kernel_moe.kernels_forward(spec, w, x)[0].square().sum().backward()
    assert not launched and w.w1.grad is None
    wr = w.router_weight.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    y, _ = moecompile.reference.reference_forward(spec, MoEWeights(**{**cases.upcast(w).__dict__, "router_weight": wr}),
                                            xr)
    y.square().sum().backward()
    assert cases.relative_error(w.router_weight.grad, wr.grad) < 1e-5
    assert cases.relative_error(x.grad, xr.grad) < 1e-5


def _grads_twice(spec, weights, x, deterministic: bool = False):
    """The op's gradients of sum(y^2) twice on the same values, with torch.use_deterministic_algorithms on or off."""
    torch.use_deterministic_algorithms(deterministic)
    try:
        return [_grads(spec, weights, x) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)


def _grads(spec, weights, x):
    """The op's gradients of sum(y^2) in x and every weight, on fresh leaves."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in weights.items() if t is not None}
    xg = x.detach().clone().requires_grad_(True)
    y, _, _ = kernel_moe.kernels_forward(spec, MoEWeights(**leaves), xg)
    y.float().square().sum().backward()
    return {"x": xg.grad, **{n: t.grad for n, t in leaves.items()}}


@cpu_only
def test_deterministic_mode_cpu(no_reference_backward):
    """With torch.use_deterministic_algorithms the sums go through the per-pair buffers: the same gradients (to
    rounding) as the atomic path, and bit for bit the same twice."""
    spec = cases.make_spec("softmax_topk", 8, 4, 32, 24, "shared_gated")
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(2))
    x = torch.randn(27, 32)
    plain = _grads(spec, w, x)
    first, second = _grads_twice(spec, w, x, deterministic=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert cases.relative_error(first[name], plain[name]) < 1e-6, name


def test_pair_table_is_dispatch_layout():
    """The backward's table (stable sort, no atomics) has dispatch.py's layout: each expert's rows in one
    BM-padded segment, in pair order, and the block -> expert / end entries the GEMMs walk."""
    gen = torch.Generator().manual_seed(0)
    E, BM = 5, 4
    expert_of_pair = torch.randint(0, E + 1, (40,), generator=gen)  # E: not routed
    expert_of_pair[expert_of_pair == 2] = 3  # an expert with no rows
    max_blocks = kernel_launch.max_row_blocks(40, 1, E, BM, False)
    t = kernel_backward.pair_table(expert_of_pair, E, BM, max_blocks)
    counts = torch.bincount(expert_of_pair, minlength=E + 1)[:E]
    start = 0
    for e in range(E):
        assert t.row_start[e] == start and t.counts[e] == counts[e]
        rows = t.sorted_pair[start:start + counts[e]].long()
        assert torch.equal(rows, (expert_of_pair == e).nonzero().view(-1))
        for b in range(start // BM, (start + int(counts[e]) + BM - 1) // BM):
            assert t.block_expert[b] == e and t.block_end[b] == start + counts[e]
        start += (int(counts[e]) + BM - 1) // BM * BM
    assert int(t.num_blocks) == start // BM


# ---------------------------------------------------------------- on the GPU


@cuda
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_forms_cuda(no_reference_backward, router, dtype):
    errors, _, _ = cases.gradient_errors(router, 64, 6, 1000, 256, 128, dtype, "cuda", seed=3)
    assert_close(errors, dtype)


@cuda
@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cuda(no_reference_backward, mlp):
    errors, _, _ = cases.gradient_errors("softmax_topk_renorm", 32, 4, 777, 256, 128, torch.bfloat16, "cuda",
                                         seed=6, mlp=mlp)
    assert_close(errors, torch.bfloat16)


@cuda
@pytest.mark.parametrize("T", [1, 5, 4096])
def test_token_counts_cuda(no_reference_backward, T):
    errors, _, _ = cases.gradient_errors("softmax_topk", 128, 8, T, 512, 256, torch.bfloat16, "cuda", seed=T)
    assert_close(errors, torch.bfloat16)


@cuda
def test_deterministic_mode_cuda(no_reference_backward):
    spec = cases.make_spec("softmax_topk", 64, 8, 512, 256, "shared_gated")
    w = cases.make_weights(spec, torch.bfloat16, "cuda", torch.Generator().manual_seed(2))
    x = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    first, second = _grads_twice(spec, w, x, deterministic=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@cpu_only
def test_remoe_penalty_enters_the_fused_backward_cpu(no_reference_backward):
    """ReMoE's L1 term on the gates, read from the block's own logits (ReMoERegularizer), is differentiated by the
    Triton backward through the logits output: the same gradients as float64 autograd through the reference."""
    spec = cases.make_spec("relu_bias", 8, 2, 32, 24)
    gen = torch.Generator().manual_seed(8)
    base = {n: t for n, t in cases.make_weights(spec, torch.float32, "cpu", gen).items() if t is not None}
    x0, probe = torch.randn(33, 32, generator=gen), torch.randn(33, 32, generator=gen, dtype=torch.float64)
    grads = []
    for dtype, backend in ((torch.float32, "triton"), (torch.float64, "reference")):
        params = {n: torch.nn.Parameter(t.to(dtype, copy=True)) for n, t in base.items()}
        block = moecompile.FusedMoE(spec, MoEWeights(**params), backend=backend)
        reg = moecompile.ReMoERegularizer(block, k=2, coefficient=0.5)
        x = x0.to(dtype, copy=True).requires_grad_(True)
        ((block(x).double() * probe).sum() + reg()).backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in params.items()}})
    for name in ("x", "router_weight", "router_bias", "w1", "w2"):
        assert cases.relative_error(grads[0][name], grads[1][name]) < 1e-5, name


@cpu_only
def test_transposed_expert_weights_cpu(no_reference_backward):
    """Expert weights held transposed ([E, H, F] and [E, I, H] parameters viewed as [E, F, H] and [E, H, I], as
    some HF layouts are): the gradients reach the parameters in their own layout."""
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 32, 24, "gelu_bias")
    gen = torch.Generator().manual_seed(13)
    w = cases.make_weights(spec, torch.float32, "cpu", gen)
    p1 = w.w1.transpose(1, 2).contiguous().requires_grad_(True)  # [E, H, F]
    p2 = w.w2.transpose(1, 2).contiguous().requires_grad_(True)  # [E, I, H]
    x = torch.randn(25, 32, generator=gen)
    probe = torch.randn(25, 32, generator=gen)
    views = MoEWeights(**{**w.__dict__, "w1": p1.transpose(1, 2), "w2": p2.transpose(1, 2)})
    (kernel_moe.kernels_forward(spec, views, x)[0] * probe).sum().backward()
    r1, r2 = p1.detach().double().requires_grad_(True), p2.detach().double().requires_grad_(True)
    ref = MoEWeights(**{**cases.upcast(w).__dict__, "w1": r1.transpose(1, 2), "w2": r2.transpose(1, 2)})
    (moecompile.reference.reference_forward(spec, ref, x.double())[0] * probe.double()).sum().backward()
    assert cases.relative_error(p1.grad, r1.grad) < 1e-5 and cases.relative_error(p2.grad, r2.grad) < 1e-5
