"""The expert GEMMs (kernels/experts.py): every MLP variant, low precision and
a real layer size, through the whole op against the fp64 reference.

Tolerances (normwise, vs fp64 on the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2;
logits 1e-5; combine weights 1e-5 abs. Every buffer the kernels allocate is poisoned (NaN / huge index) first
(the `poisoned` fixture), so an element no kernel wrote shows up as NaN or an out-of-range access. On the CPU
the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU the `cuda` cases run the full grid.
"""
from __future__ import annotations

import cases
import pytest
import torch
from cases import DTYPES, needs_cuda, run_case

from moecompile.kernels import moe as kernel_moe

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cpu(mlp):
    run_case("softmax_topk_renorm", 8, 2, 19, 72, 40, torch.float32, "cpu", mlp=mlp)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_grouped_corr", "relu"])
def test_low_precision_cpu(dtype, router):
    run_case(router, 16, 4, 29, 72, 40, DTYPES[dtype], "cpu")


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cuda(mlp, dtype):
    run_case("softmax_topk_renorm", 64, 8, 333, 200, 136, DTYPES[dtype], "cuda", mlp=mlp)


@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 1024])
def test_large_layer_cuda(T):
    """A real layer size (Qwen3-30B-A3B: H 2048, I 768, E 128, k 8) in bf16."""
    run_case("softmax_topk_renorm", 128, 8, T, 2048, 768, torch.bfloat16, "cuda")


@pytest.mark.parametrize("router", ["softmax_topk", "relu_bias"])
def test_deterministic_forward_cpu(router):
    """torch.use_deterministic_algorithms: each pair's row is stored and the rows summed in slot order (no atomics);
    the output still matches the fp64 reference (shared experts on the same stream, before the routed ones)."""
    torch.use_deterministic_algorithms(True)
    try:
        run_case(router, 8, 2, 29, 72, 40, torch.float32, "cpu", mlp="shared_gated")
    finally:
        torch.use_deterministic_algorithms(False)


@needs_cuda
@pytest.mark.parametrize("T", [1000, 3000])
def test_deterministic_forward_is_bitwise_repeatable_cuda(T):
    """On the GPU the fp32 atomics of the default path sum in a varying order; deterministic mode gives the same
    bits every call, and the reference's values (checked by run_case)."""
    torch.use_deterministic_algorithms(True)
    try:
        spec, w, x, y = run_case("softmax_topk", 64, 8, T, 512, 256, torch.bfloat16, "cuda", mlp="shared_gated")
        for _ in range(3):
            assert torch.equal(kernel_moe.kernels_forward(spec, w, x)[0], y)
    finally:
        torch.use_deterministic_algorithms(False)
