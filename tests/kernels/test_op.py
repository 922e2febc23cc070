"""The op as PyTorch sees it (kernels/op.py, kernels/moe.py): schema, fake implementation and autograd (opcheck),
torch.compile and torch.export, FusedMoE's backend flag, gradients, and the full grid of shapes on a GPU.

Tolerances (normwise, vs fp64 on the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2;
logits 1e-5; combine weights 1e-5 abs. Every buffer the kernels allocate is poisoned (NaN / huge index) first
(the `poisoned` fixture), so an element no kernel wrote shows up as NaN or an out-of-range access. On the CPU
the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU the `cuda` cases run the full grid.
"""
from __future__ import annotations

import cases
import pytest
import torch
from cases import needs_cuda, run_case

import moecompile
from moecompile import MoECompileError
from moecompile.kernels import moe as kernel_moe
from moecompile.kernels import op as kernel_op

pytestmark = pytest.mark.usefixtures("poisoned")


def test_fused_module_uses_kernels_and_matches(quiet):
    """FusedMoE(backend='triton') on an HF-shaped [B, S, H] input, extra outputs included."""
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 72, 40, "shared_gated")
    spec = moecompile.MoESpec(**{**spec.__dict__, "extra_output": "router_logits"})
    weights = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(7))
    fused = moecompile.FusedMoE(spec, weights, backend="triton")
    ref = moecompile.FusedMoE(spec, weights, backend="reference")
    x = torch.randn(2, 5, 72)
    (y, logits), (y_ref, logits_ref) = fused(x), ref(x)
    assert y.shape == (2, 5, 72) and cases.relative_error(y, y_ref) < 1e-5
    assert cases.relative_error(logits, logits_ref) < 1e-5


def test_backend_flag_errors():
    spec = cases.make_spec("softmax_topk", 4, 2, 16, 8)
    weights = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(MoECompileError, match="backend 'cuda' is not one of"):
        moecompile.FusedMoE(spec, weights, backend="cuda")
    fused = moecompile.FusedMoE(spec, weights, backend="triton")
    with pytest.raises(MoECompileError, match="input dtype torch.float64"):
        fused(torch.randn(3, 16, dtype=torch.float64))


def test_gradients_match_reference():
    """Backward (the reference, recomputed) gives the reference's gradients for input and weights."""
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 24, 16, "shared_gated")
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(3))
    for _name, t in w.items():
        if t is not None:
            t.requires_grad_(True)
    x = torch.randn(11, 24, requires_grad=True)
    y, logits, _ = kernel_moe.kernels_forward(spec, w, x)
    (y.square().sum() + logits.sum()).backward()
    got = [x.grad] + [t.grad for _, t in w.items() if t is not None]
    for t in [x] + [t for _, t in w.items() if t is not None]:
        t.grad = None
    y_ref, routing = moecompile.reference.reference_forward(spec, w, x)
    (y_ref.square().sum() + routing.logits.sum()).backward()
    want = [x.grad] + [t.grad for _, t in w.items() if t is not None]
    for g, r in zip(got, want):
        assert g is not None and cases.relative_error(g, r) < 1e-5


def test_eager_gradients_skip_the_dispatcher_and_equal_the_op():
    """Eager calls that need gradients take op.EagerMoE (the op's formula without the dispatcher's host cost); the
    gradients of every input, with gradients flowing into the logits and slot weights too (ReMoE's L1 term reads
    them) and without, are bit-identical to those of the registered op."""
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 24, 16, "shared_gated")
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(9))
    x = torch.randn(13, 24)
    probe = torch.randn(13, 24)

    def grads(through_op: bool, use_routing: bool):
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in w.items() if t is not None}
        xl = x.clone().requires_grad_(True)
        y, logits, slot_weights = kernel_moe.run(spec, type(w)(**leaves), xl, through_op=through_op)
        loss = (y * probe).sum() + ((logits.square().sum() + slot_weights.sum()) if use_routing else 0)
        loss.backward()
        return y.grad_fn, [xl.grad] + [t.grad for t in leaves.values()]

    for use_routing in (True, False):
        eager_fn, eager = grads(False, use_routing)
        op_fn, through = grads(True, use_routing)
        assert "EagerMoE" in type(eager_fn).__name__ and "EagerMoE" not in type(op_fn).__name__
        for a, b in zip(eager, through):
            assert a is not None and torch.equal(a, b)


def test_opcheck_and_tracing():
    """The op's schema, fake implementation and autograd registration (torch.library.opcheck), torch.compile with
    fullgraph (aot_eager: the op stays one node) and torch.export."""
    spec = cases.make_spec("sigmoid_grouped_corr", 16, 4, 32, 24, "shared_gated")
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(5))
    x = torch.randn(9, 32)
    args = kernel_op.op_args(spec.to_json(), w, x, 9)
    torch.library.opcheck(torch.ops.moecompile.moe_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.moecompile.moe_forward_y.default, args, test_utils=("test_schema",
                                                                                        "test_faketensor"))
    assert cases.relative_error(torch.ops.moecompile.moe_forward_y(*args), torch.ops.moecompile.moe_forward(*args)[0]
                                ) == 0
    fused = moecompile.FusedMoE(spec, w, backend="triton")
    want = fused(x)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert cases.relative_error(compiled(x), want) < 1e-6
    exported = torch.export.export(fused, (x,))
    assert "moecompile.moe_forward" in str(exported.graph)
    assert cases.relative_error(exported.module()(x), want) < 1e-6


GPU_TOKENS, GPU_EXPERTS, GPU_K = (0, 1, 3, 64, 1000), (1, 8, 60, 128, 256), (1, 2, 6, 8)


GPU_GRID = [(t, e, k) for t in GPU_TOKENS for e in GPU_EXPERTS for k in GPU_K if k <= e]


@needs_cuda
@pytest.mark.parametrize("T,E,k", GPU_GRID, ids=[f"T{t}-E{e}-k{k}" for t, e, k in GPU_GRID])
def test_grid_cuda(T, E, k):
    run_case("softmax_topk_renorm", E, k, T, 200, 136, torch.bfloat16, "cuda")
