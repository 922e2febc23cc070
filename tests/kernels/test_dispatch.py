"""Dispatch (kernels/dispatch.py, and gating's own dispatch for a block of few tokens): rows grouped by expert,
the block table, skewed loads and ReLU routing's rounds, through the whole op against the fp64 reference.

Tolerances (normwise, vs fp64 on the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2;
logits 1e-5; combine weights 1e-5 abs. Every buffer the kernels allocate is poisoned (NaN / huge index) first
(the `poisoned` fixture), so an element no kernel wrote shows up as NaN or an out-of-range access. On the CPU
the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU the `cuda` cases run the full grid.
"""
from __future__ import annotations

import pytest
import torch
from cases import needs_cuda, record_calls, run_case

from moecompile.kernels import launch as kernel_launch

pytestmark = pytest.mark.usefixtures("poisoned")


def one_expert_takes_all(spec, weights, x):
    weights.router_bias[0] = 100.0  # expert 0 first for every token; with k=1 every other expert gets nothing


def test_one_expert_takes_every_token_cpu():
    run_case("sigmoid_topk_bias", 8, 1, 50, 72, 40, torch.float32, "cpu", setup=one_expert_takes_all)


@pytest.mark.parametrize("router", ["softmax_topk", "relu"])
def test_few_tokens_are_dispatched_by_the_gating_program_cpu(monkeypatch, router):
    """Up to gating_block_tokens tokens, gating dispatches them itself (no dispatch launch); past that, dispatch
    runs. Both within tolerance (run_case)."""
    launches = []
    record_calls(monkeypatch, kernel_launch, "_dispatch", lambda *a: launches.append(1))
    limit = kernel_launch.gating_block_tokens(16)
    run_case(router, 16, 4, limit, 72, 40, torch.float32, "cpu")
    assert launches == []
    run_case(router, 16, 4, limit + 1, 72, 40, torch.float32, "cpu")
    assert launches == [1]


def test_relu_rounds_cpu(monkeypatch):
    """ReLU routing with more positive pairs than one round's buffer: the rounds cover them all."""
    monkeypatch.setattr(kernel_launch, "RELU_ROUND_SLOTS", 1)
    _, _, _, _ = run_case("relu", 16, 0, 23, 72, 40, torch.float32, "cpu")


@needs_cuda
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_one_expert_takes_every_token_cuda(T):
    run_case("sigmoid_topk_bias", 128, 1, T, 256, 192, torch.bfloat16, "cuda", setup=one_expert_takes_all)
