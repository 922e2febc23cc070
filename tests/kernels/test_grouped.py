"""torch's grouped GEMM as the routed experts' path (kernels/grouped.py): forced at every size by the
`grouped_mm_always` fixture, against the fp64 reference; the calls it refuses stay on the Triton GEMMs.

Tolerances (normwise, vs fp64 on the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2;
logits 1e-5; combine weights 1e-5 abs. Every buffer the kernels allocate is poisoned (NaN / huge index) first
(the `poisoned` fixture), so an element no kernel wrote shows up as NaN or an out-of-range access. On the CPU
the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU the `cuda` cases run the full grid.
"""
from __future__ import annotations

import cases
import pytest
import torch
from cases import needs_cuda, record_calls, run_case

pytestmark = pytest.mark.usefixtures("poisoned")


GROUPED_MLPS = ["swiglu", "plain_relu2", "plain_relu", "gelu_tanh", "gelu", "clamped_swiglu", "clamped_silu",
                "shared_gated",
                "shared_output_bias", "weight_on_input"]


GROUPED_CPU_SHAPES = [(0, 8, 2), (1, 8, 2), (3, 1, 1), (37, 60, 6), (21, 8, 8), (70, 8, 2)]


@pytest.mark.parametrize("T,E,k", GROUPED_CPU_SHAPES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in GROUPED_CPU_SHAPES])
def test_grouped_mm_experts_cpu(grouped_mm_always, T, E, k):
    """The routed experts through torch._grouped_mm (unpadded dispatch, activation and combine kernels): bf16
    within cases.TOLERANCE of fp64 (1.5e-2)."""
    run_case("sigmoid_topk_bias" if E > 1 else "softmax_topk", E, k, T, 72, 40, torch.bfloat16, "cpu")
    assert grouped_mm_always == ([T] if T else [])


@pytest.mark.parametrize("mlp", GROUPED_MLPS)
def test_grouped_mm_mlp_variants_cpu(grouped_mm_always, mlp):
    """Every activation, shared experts (their sum joins in the combine), output bias, weight on the input."""
    run_case("sigmoid_topk_bias", 8, 8, 21, 72, 40, torch.bfloat16, "cpu", mlp=mlp)
    assert grouped_mm_always == [21]


@pytest.mark.parametrize("router", ["softmax_topk_renorm", "topk_softmax", "sigmoid_grouped_corr", "capacity"])
def test_grouped_mm_router_forms_cpu(grouped_mm_always, router):
    run_case(router, 16, 4, 36, 72, 40, torch.bfloat16, "cpu", seq_len=12 if router == "capacity" else None)
    assert grouped_mm_always == [36]


@pytest.mark.parametrize("why,router,mlp,dtype", [
    ("expert biases", "softmax_topk", "gelu_bias", torch.bfloat16),
    ("ReLU routing", "relu", "swiglu", torch.bfloat16),
    ("bfloat16 only", "softmax_topk", "swiglu", torch.float32),
])
def test_grouped_mm_refuses_what_it_cannot_compute_cpu(grouped_mm_always, why, router, mlp, dtype):
    """Calls grouped_mm cannot take stay on the Triton GEMMs (and are still right), whatever their size."""
    from moecompile.kernels import grouped

    spec, w, x, _ = run_case(router, 8, 2, 30, 72, 40, dtype, "cpu", mlp=mlp)
    assert grouped_mm_always == []
    assert why in grouped.unsupported_reason(spec, w, x)


def test_grouped_mm_choice_takes_fake_tensors_cpu(grouped_mm_always):
    """Compiled graphs make the choice while tracing with fake tensors (no data pointer to read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moecompile.kernels import grouped

    spec = cases.make_spec("softmax_topk", 8, 2, 72, 40)
    with FakeTensorMode():
        w = cases.make_weights(spec, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
        assert grouped.applies(spec, w, torch.empty(30, 72, dtype=torch.bfloat16))
        w.w1 = w.w1[..., 1:]  # starts 2 bytes into its storage
        assert "strides" in grouped.unsupported_reason(spec, w, torch.empty(30, 72, dtype=torch.bfloat16))


def test_grouped_mm_reads_transposed_expert_weights_cpu(grouped_mm_always):
    """Expert weights stored [E, H, F] (transposed views, as some checkpoints keep them) go through grouped_mm too."""
    def transpose_weights(spec, w, x):
        w.w1 = w.w1.transpose(1, 2).contiguous().transpose(1, 2)
        w.w2 = w.w2.transpose(1, 2).contiguous().transpose(1, 2)

    run_case("softmax_topk_renorm", 8, 2, 30, 72, 40, torch.bfloat16, "cpu", setup=transpose_weights)
    assert grouped_mm_always == [30]


GROUPED_GPU_GRID = [(t, e, k) for t in (1, 3, 64, 1000, 4096) for e in (1, 8, 60, 128, 256) for k in (1, 2, 8)
                    if k <= e]


@needs_cuda
@pytest.mark.parametrize("T,E,k", GROUPED_GPU_GRID, ids=[f"T{t}-E{e}-k{k}" for t, e, k in GROUPED_GPU_GRID])
def test_grouped_mm_grid_cuda(grouped_mm_always, T, E, k):
    """The grouped_mm path (forced at every size) over the grid, bf16 within cases.TOLERANCE (1.5e-2)."""
    run_case("softmax_topk_renorm", E, k, T, 256, 136, torch.bfloat16, "cuda")
    assert grouped_mm_always == [T]


@needs_cuda
@pytest.mark.parametrize("mlp", GROUPED_MLPS)
def test_grouped_mm_mlp_variants_cuda(grouped_mm_always, mlp):
    run_case("sigmoid_grouped_corr", 64, 8, 777, 256, 136, torch.bfloat16, "cuda", mlp=mlp)
    assert grouped_mm_always == [777]


@needs_cuda
def test_grouped_mm_takes_a_mixtral_layer_by_default_cuda(monkeypatch):
    """At its default threshold grouped_mm takes a Mixtral-sized layer at 2048 tokens (512 rows an expert), and
    the result is within the bf16 tolerance of the fp64 reference."""
    from moecompile.kernels import grouped

    taken = []
    record_calls(monkeypatch, grouped, "expert_rows", lambda *a: taken.append(1))
    run_case("softmax_topk_renorm", 8, 2, 2048, 4096, 14336, torch.bfloat16, "cuda")
    assert taken == [1]
