"""The expert GEMMs (kernels/experts.py) and their tiles (kernels/configs.py): every MLP variant, low precision and
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

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cpu(mlp):
    run_case("softmax_topk_renorm", 8, 2, 19, 72, 40, torch.float32, "cpu", mlp=mlp)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_grouped_corr", "relu"])
def test_low_precision_cpu(dtype, router):
    run_case(router, 16, 4, 29, 72, 40, DTYPES[dtype], "cpu")


def test_tuned_tiles_serve_token_counts_within_twice_theirs_in_the_same_regime(monkeypatch):
    """configs.choose takes a tuned entry for token counts within 2x of the tuned one whose heuristic row block is
    the same (decode-sized calls keep their own); other counts and other layer shapes get the heuristic."""
    from moecompile.kernels import configs

    entry = {"up": dict(BM=64, BN=128, BK=64), "down": dict(BM=64, BN=128, BK=64)}
    monkeypatch.setattr(configs, "_table", lambda: {configs.table_key(1024, 2048, 768, 128, 8): entry})
    configs._tuned_tokens.cache_clear()
    configs.nearest_tuned.cache_clear()
    try:
        shape = (2048, 768, 128, 8)
        # 1024 tokens x 8 slots over 128 experts is 64 rows an expert (64-row blocks); 700 tokens is 44 (32-row)
        assert [configs.nearest_tuned(T, *shape) for T in (1024, 800, 2048, 2049, 700, 1)] == [
            1024, 1024, 1024, None, None, None]
        assert configs.nearest_tuned(1024, 2048, 768, 64, 8) is None
    finally:
        configs._tuned_tokens.cache_clear()
        configs.nearest_tuned.cache_clear()


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
