"""Compiled graphs that hold the kernels' launches (wrap_triton; kernels/moe.py's `traceable`) and the TTIR memo
(kernels/traced.py), against the fp64 reference.

Tolerances (normwise, vs fp64 on the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2;
logits 1e-5; combine weights 1e-5 abs. Every buffer the kernels allocate is poisoned (NaN / huge index) first
(the `poisoned` fixture), so an element no kernel wrote shows up as NaN or an out-of-range access. On the CPU
the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU the `cuda` cases run the full grid.
"""
from __future__ import annotations

import cases
import pytest
import torch
from cases import needs_cuda

import moecompile
from moecompile.kernels import moe as kernel_moe
from moecompile.reference import reference_forward
from moecompile.spec import MoEWeights

pytestmark = pytest.mark.usefixtures("poisoned")


@needs_cuda
@pytest.mark.parametrize("router", ["softmax_topk", "relu", "sigmoid_grouped_corr"])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_traced_launches_cuda(router, T):
    """A compiled inference graph with static shapes holds the kernels' launches themselves (wrap_triton), not the
    op: traced here with fake tensors as AOTAutograd traces for Inductor, then run (Inductor's code calling them:
    tests/backends/test_dynamo_cuda.py). Shared experts run on the one stream there. fp32 within cases.TOLERANCE."""
    from torch.fx.experimental.proxy_tensor import make_fx

    spec = cases.make_spec(router, 16, 4, 64, 48, "shared_gated")
    w = cases.make_weights(spec, torch.float32, "cuda", torch.Generator().manual_seed(11))
    x = torch.randn(T, 64, device="cuda")
    names = [name for name, t in w.items() if t is not None]

    def block(t, *tensors):  # the weights are graph inputs, as in the backend's graphs
        weights = MoEWeights(**dict(zip(names, tensors)))
        return kernel_moe.run(spec, weights, t, need_routing=False, through_op=True)[0]

    inputs = (x, *[getattr(w, name) for name in names])
    with torch.no_grad():
        graph = make_fx(block, tracing_mode="fake")(*inputs)
        got = graph(*inputs)
    want, _ = reference_forward(spec, cases.upcast(w), x.double())
    assert "triton_kernel_wrapper" in graph.code and "moecompile.moe_forward" not in graph.code
    assert cases.relative_error(got, want) < cases.TOLERANCE[torch.float32]


@needs_cuda
@pytest.mark.parametrize("mlp", ["swiglu", "shared_output_bias"])
def test_traced_launches_grouped_mm_cuda(grouped_mm_always, mlp):
    """The grouped_mm path traced the same way (bf16, the dtype it takes): within cases.TOLERANCE of fp64."""
    from torch.fx.experimental.proxy_tensor import make_fx

    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 256, 128, mlp)
    w = cases.make_weights(spec, torch.bfloat16, "cuda", torch.Generator().manual_seed(23))
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    names = [name for name, t in w.items() if t is not None]

    def block(t, *tensors):
        return kernel_moe.run(spec, MoEWeights(**dict(zip(names, tensors))), t, need_routing=False,
                              through_op=True)[0]

    inputs = (x, *[getattr(w, name) for name in names])
    want, _ = reference_forward(spec, cases.upcast(w), x.double())
    with torch.no_grad():
        graph = make_fx(block, tracing_mode="fake")(*inputs)
        got = graph(*inputs)
    assert "triton_kernel_wrapper" in graph.code and "_grouped_mm" in graph.code
    assert grouped_mm_always == [300]
    assert cases.relative_error(got, want) < cases.TOLERANCE[torch.bfloat16]


@needs_cuda
def test_inductor_compile_cuda():
    spec = cases.make_spec("softmax_topk_renorm", 128, 8, 256, 192)
    w = cases.make_weights(spec, torch.bfloat16, "cuda", torch.Generator().manual_seed(13))
    fused = moecompile.FusedMoE(spec, w)
    compiled = torch.compile(fused, fullgraph=True, mode="reduce-overhead")
    for T in (5, 300):
        x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(3):
                got = compiled(x).clone()
            assert cases.relative_error(got, fused(x)) < 1e-3


def test_traced_ttir_memo_builds_once_per_key_and_only_for_our_kernels(monkeypatch):
    """kernels/traced.py's memo in front of torch's TTIR build (a counting stand-in here: the real build needs a
    GPU target; tests/backends/test_dynamo_cuda.py checks the key against real builds): the same kernel with the
    same dtypes and scalars builds once; another dtype, scalar or kernel builds again; kernels of other code are
    never memoized, nor calls whose arguments cannot be keyed."""
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moecompile.kernels import traced
    from moecompile.kernels.dispatch import _dispatch_kernel
    from moecompile.kernels.gating import _gating_kernel

    builds = []

    def build(kernel, kernel_args, tma):
        builds.append(kernel)
        return object(), list(kernel_args)

    memo = traced._memoized(build)
    monkeypatch.setattr(traced, "_CACHE", {})
    with FakeTensorMode():
        bf16_a, bf16_b = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(300, dtype=torch.bfloat16)
        fp32 = torch.empty(4, 8)
    first = memo(_gating_kernel, {"x": bf16_a, "T": 5, "E": 8}, {})
    again = memo(_gating_kernel, {"x": bf16_b, "T": 5, "E": 8}, {})  # another shape: the build reads dtypes
    assert len(builds) == 1 and again[0] is first[0] and again[1] == ["x", "T", "E"]
    memo(_gating_kernel, {"x": fp32, "T": 5, "E": 8}, {})
    memo(_gating_kernel, {"x": bf16_a, "T": 16, "E": 8}, {})
    memo(_dispatch_kernel, {"x": bf16_a, "T": 5, "E": 8}, {})
    assert len(builds) == 4

    @triton.jit
    def other_kernel(x):
        pass

    memo(other_kernel, {"x": bf16_a}, {})
    memo(other_kernel, {"x": bf16_a}, {})
    memo(_gating_kernel, {"x": bf16_a, "T": [5]}, {})  # a list cannot be keyed
    memo(_gating_kernel, {"x": bf16_a, "T": [5]}, {})
    assert len(builds) == 8
