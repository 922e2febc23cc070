"""CUDA graphs (kernels/graphs.py): the op captured in a caller's graph, and eager decode calls replayed from
graphs of their own, against eager calls and the fp64 reference.

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
from moecompile.kernels import graphs
from moecompile.kernels import moe as kernel_moe

pytestmark = pytest.mark.usefixtures("poisoned")


@needs_cuda
def test_cuda_graph_replay_matches():
    """Captured in a CUDA graph, replayed on new inputs copied into the static input: same results as eager."""
    spec = cases.make_spec("sigmoid_grouped_corr", 64, 8, 256, 192, "shared_gated")
    w = cases.make_weights(spec, torch.bfloat16, "cuda", torch.Generator().manual_seed(11))
    fused = moecompile.FusedMoE(spec, w)
    static_x = torch.randn(77, 256, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        fused(static_x)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = fused(static_x)
    for _ in range(3):
        x = torch.randn(77, 256, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            eager = fused(x)
        assert cases.relative_error(static_y, eager) < 1e-3


@needs_cuda
def test_eager_decode_graphs_cuda():
    """Small eager calls replay a captured graph from the second call of a shape on: every call's outputs (kept,
    not overwritten by later replays) match the reference, and an in-place weight update is seen by the replay."""
    graphs.clear()
    spec = cases.make_spec("sigmoid_grouped_corr", 64, 8, 256, 192, "shared_gated")
    w = cases.make_weights(spec, torch.bfloat16, "cuda", torch.Generator().manual_seed(17))
    calls = [torch.randn(3, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    results = [kernel_moe.kernels_forward(spec, w, x) for x in calls]
    assert any(entry.graph is not None for entry in graphs._ENTRIES.values())
    for x, (y, logits, slot_weights) in zip(calls, results):
        cases.check_against_reference(spec, w, x, y, logits, slot_weights, None)
    w.w2.mul_(-0.5)
    y, logits, slot_weights = kernel_moe.kernels_forward(spec, w, calls[0])
    cases.check_against_reference(spec, w, calls[0], y, logits, slot_weights, None)
    fused = moecompile.FusedMoE(spec, w)  # its replays copy out y only
    with torch.no_grad():
        outs = [fused(x) for x in calls]
    for x, y in zip(calls, outs):
        y_ref, _ = cases.reference_forward(spec, cases.upcast(w), x.double())
        assert cases.relative_error(y, y_ref) <= cases.TOLERANCE[torch.bfloat16]


@needs_cuda
def test_decode_graphs_switch_off_cuda(monkeypatch):
    monkeypatch.setenv("MOECOMPILE_CUDA_GRAPHS", "0")
    graphs.clear()
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 64, 32)
    w = cases.make_weights(spec, torch.bfloat16, "cuda", torch.Generator().manual_seed(19))
    for _ in range(3):
        kernel_moe.kernels_forward(spec, w, torch.randn(2, 64, device="cuda", dtype=torch.bfloat16))
    assert not graphs._ENTRIES
