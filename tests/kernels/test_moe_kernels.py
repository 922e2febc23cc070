"""The Triton MoE op (gating, dispatch, expert GEMMs) against the fp64 reference, on fresh random inputs.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU) on small
shapes; on a GPU the `cuda` cases run the full grid. Every buffer the op allocates is poisoned (NaN / huge index)
first, so an element no kernel wrote shows up as NaN or an out-of-range access. Tolerances (normwise, vs fp64 on
the same inputs) are in cases.TOLERANCE: fp32 1e-5, fp16 3e-3, bf16 1.5e-2; logits 1e-5; combine weights 1e-5 abs.
"""
from __future__ import annotations

import itertools

import cases
import pytest
import torch

import moecompile
from moecompile import MoECompileError
from moecompile.kernels import graphs
from moecompile.kernels import launch as kernel_launch
from moecompile.kernels import moe as kernel_moe
from moecompile.kernels import op as kernel_op
from moecompile.kernels.settings import settings
from moecompile.reference import reference_forward
from moecompile.spec import MoEWeights

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device: see benchmarks/gpu_tests.sh)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(settings, "poison_buffers", True)


_seed = itertools.count(1234)


def record_calls(monkeypatch, owner, name: str, record) -> None:
    """Replace owner.name with a wrapper that calls record(*args) and then the original."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: (record(*a), real(*a, **kw))[1])


def run_case(router, E, k, T, H, I, dtype, device, mlp="swiglu", setup=None, seq_len=None):
    spec = cases.make_spec(router, E, k, H, I, mlp)
    gen = torch.Generator().manual_seed(next(_seed))
    weights = cases.make_weights(spec, dtype, device, gen)
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    if setup is not None:
        setup(spec, weights, x)
    y, logits, slot_weights = kernel_moe.kernels_forward(spec, weights, x, seq_len)
    cases.check_against_reference(spec, weights, x, y, logits, slot_weights, seq_len)
    return spec, weights, x, y


# ---------------------------------------------------------------- CPU (interpreter): small shapes

# up to 64 tokens (32 from 128 experts) one gating program routes and dispatches them all; past that, dispatch is a
# launch of its own: (70, 8, 2) and (33, 128, 1) take it
CPU_SHAPES = [(0, 8, 2), (1, 8, 2), (3, 1, 1), (37, 60, 6), (21, 8, 8), (70, 8, 2), (33, 128, 1)]


@pytest.mark.parametrize("router", list(cases.ROUTERS))
@pytest.mark.parametrize("T,E,k", CPU_SHAPES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in CPU_SHAPES])
def test_router_forms_cpu(router, T, E, k):
    if router == "sparsemixer" and E < 2:
        pytest.skip("sparsemixer picks 2 experts; E=1 is not a valid block")  # the spec refuses it
    run_case(router, E, k, T, 72, 40, torch.float32, "cpu")


@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cpu(mlp):
    run_case("softmax_topk_renorm", 8, 2, 19, 72, 40, torch.float32, "cpu", mlp=mlp)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_grouped_corr", "relu"])
def test_low_precision_cpu(dtype, router):
    run_case(router, 16, 4, 29, 72, 40, DTYPES[dtype], "cpu")


def one_expert_takes_all(spec, weights, x):
    weights.router_bias[0] = 100.0  # expert 0 first for every token; with k=1 every other expert gets nothing


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


def test_one_expert_takes_every_token_cpu():
    run_case("sigmoid_topk_bias", 8, 1, 50, 72, 40, torch.float32, "cpu", setup=one_expert_takes_all)


def test_capacity_sequences_cpu():
    """Expert capacity counts within each sequence: 3 sequences of 12 tokens."""
    run_case("capacity", 4, 2, 36, 72, 40, torch.float32, "cpu", seq_len=12)


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


GROUPED_MLPS = ["swiglu", "plain_relu2", "plain_relu", "gelu_tanh", "gelu", "clamped_swiglu", "shared_gated",
                "shared_output_bias", "weight_on_input"]
GROUPED_CPU_SHAPES = [(0, 8, 2), (1, 8, 2), (3, 1, 1), (37, 60, 6), (21, 8, 8), (70, 8, 2)]


@pytest.fixture
def grouped_mm_always(monkeypatch):
    """Every call whose layout grouped_mm reads takes it (the row threshold off); yields the calls that did."""
    from moecompile.kernels import grouped

    monkeypatch.setattr(settings, "grouped_mm_min_rows", 0.0)
    taken = []
    record_calls(monkeypatch, grouped, "expert_rows", lambda *a: taken.append(a[2].shape[0]))
    return taken


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


# ---------------------------------------------------------------- GPU: the full grid

GPU_TOKENS, GPU_EXPERTS, GPU_K = (0, 1, 3, 64, 1000), (1, 8, 60, 128, 256), (1, 2, 6, 8)
GPU_GRID = [(t, e, k) for t in GPU_TOKENS for e in GPU_EXPERTS for k in GPU_K if k <= e]


@needs_cuda
@pytest.mark.parametrize("T,E,k", GPU_GRID, ids=[f"T{t}-E{e}-k{k}" for t, e, k in GPU_GRID])
def test_grid_cuda(T, E, k):
    run_case("softmax_topk_renorm", E, k, T, 200, 136, torch.bfloat16, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("router", list(cases.ROUTERS))
@pytest.mark.parametrize("E,k", [(60, 6), (128, 8), (256, 8)])
def test_router_forms_cuda(router, dtype, E, k):
    run_case(router, E, k, 1000, 200, 136, DTYPES[dtype], "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mlp", list(cases.MLPS))
def test_mlp_variants_cuda(mlp, dtype):
    run_case("softmax_topk_renorm", 64, 8, 333, 200, 136, DTYPES[dtype], "cuda", mlp=mlp)


@needs_cuda
@pytest.mark.parametrize("router", ["relu", "relu_bias", "softmax_topk_renorm", "sigmoid_grouped_fill0"])
@pytest.mark.parametrize("T", [21, 300])
def test_nan_token_stays_nan_cuda(router, T):
    run_nan_token(router, torch.bfloat16, "cuda", T)


@needs_cuda
@pytest.mark.parametrize("E,n_group,topk_group,score", GROUPINGS)
def test_grouped_topk_groups_of_several_experts_cuda(E, n_group, topk_group, score):
    run_grouped(E, n_group, topk_group, score, 1000, torch.bfloat16, "cuda")


@needs_cuda
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_one_expert_takes_every_token_cuda(T):
    run_case("sigmoid_topk_bias", 128, 1, T, 256, 192, torch.bfloat16, "cuda", setup=one_expert_takes_all)


@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 1024])
def test_large_layer_cuda(T):
    """A real layer size (Qwen3-30B-A3B: H 2048, I 768, E 128, k 8) in bf16."""
    run_case("softmax_topk_renorm", 128, 8, T, 2048, 768, torch.bfloat16, "cuda")


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
