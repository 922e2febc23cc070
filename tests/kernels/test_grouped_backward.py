"""The routed experts' gradients through torch._grouped_mm (kernels/grouped_backward.py) against float64 autograd
through the reference: router forms (top-k, sigmoid + correction bias, grouped, capacity, ReLU with its variable
count), activations on both sides of their clamps, expert biases, shared experts beside it, token counts 1/odd,
experts with no rows (their weight and bias gradients must be exactly 0, not whatever grouped_mm left there), the
routing weight on the input, a refused grouped_mm, and the blocks it leaves to the
Triton backward. On the CPU with settings.grouped_backward="always" (torch's CPU _grouped_mm, the activation kernel
in Triton's interpreter); the *_cuda tests take it by default ("auto": bf16 on Hopper).

Tolerances, as in test_backward.py: normwise relative error of each gradient, 1e-5 in fp32, 2.5e-2 in bf16."""
from __future__ import annotations

import cases
import pytest
import torch

from moecompile.kernels import grouped_backward
from moecompile.kernels import moe as kernel_moe
from moecompile.kernels import op as kernel_op
from moecompile.kernels.settings import configured
from moecompile.reference import reference_forward

GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                            reason="needs a Hopper GPU (run on the device)")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter cases run on the CPU machine")
ROUTERS = [r for r in cases.ROUTERS if r != "sparsemixer"]


@pytest.fixture
def grouped_calls(monkeypatch):
    """The grouped path's calls (their routed-pair counts); the reference is never recomputed in the backward."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference was recomputed in the backward")
    monkeypatch.setattr(kernel_op, "reference_forward", refuse)
    calls = []
    cases.record_calls(monkeypatch, grouped_backward, "routed_grads", lambda *a: calls.append(a[11]))
    return calls


def check(errors: dict[str, float], dtype) -> None:
    bad = {n: e for n, e in errors.items() if not e <= GRAD_TOLERANCE[dtype]}
    assert not bad, f"gradients off the float64 reference: {bad}"


@cpu_only
@pytest.mark.parametrize("router", ROUTERS)
def test_router_forms_cpu(grouped_calls, router):
    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors(router, 8, 2, 37, 48, 32, torch.float32, "cpu", seed=17)
    check(errors, torch.float32)
    assert grouped_calls, "the grouped path was not taken"


@cpu_only
@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "gelu_tanh", "plain_relu", "plain_relu2", "clamped_swiglu",
                                 "clamped_silu", "shared_gated", "shared_output_bias", "gelu_bias",
                                 "clamped_swiglu_bias"])
def test_activations_and_shared_experts_cpu(grouped_calls, mlp):
    """The clamped forms with a limit inside the values' range, so both sides of each clamp are taken."""
    def small_limit(spec, weights, x):
        if "clamped" in mlp:
            object.__setattr__(spec.experts, "activation_limit", 0.4)

    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors("softmax_topk_renorm", 8, 2, 31, 48, 32, torch.float32, "cpu", seed=5,
                                             mlp=mlp, setup=small_limit)
    check(errors, torch.float32)
    assert grouped_calls


@cpu_only
@pytest.mark.parametrize("mlp", ["clamped_silu", "silu"])
def test_clamp_bound_in_bf16_cpu(grouped_calls, mlp):
    """bf16 with the clamp's bound (1.5, exact in bf16) inside the values' range: grouped_mm's rounded up projection
    would put values onto the bound and give them a gradient the forward's fp32 values did not have (3.5e-2 against
    the Triton backward's 3.8e-3 on x when it was let through), so the clamped forms keep the Triton backward in
    16-bit; the unclamped form beside it takes the grouped path. Tolerance 2.5e-2 (bf16)."""
    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors("softmax_topk", 16, 4, 300, 64, 32, torch.bfloat16, "cpu", seed=4,
                                             mlp="clamped_silu" if mlp == "clamped_silu" else "swiglu")
    check(errors, torch.bfloat16)
    assert bool(grouped_calls) == (mlp == "silu")


@cpu_only
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (3, 64, 2), (1, 1, 1), (50, 3, 3)])
def test_token_and_expert_counts_cpu(grouped_calls, T, E, k):
    """T=3 over 64 experts leaves most experts without rows: their weight gradients must be exactly zero."""
    with configured(grouped_backward="always"):
        errors, grads, logits = cases.gradient_errors("softmax_topk", E, k, T, 48, 32, torch.float32, "cpu",
                                                      seed=T + E)
    check(errors, torch.float32)
    if T:
        assert grouped_calls
        unused = torch.ones(E, dtype=torch.bool)
        unused[logits.topk(k, dim=-1).indices.reshape(-1)] = False
        for name in ("w1", "w2"):
            assert torch.all(grads[name][unused] == 0), name


@cpu_only
@pytest.mark.parametrize("router,T,E", [("relu_bias", 33, 8), ("softmax_topk", 3, 64)])
def test_expert_biases_cpu(grouped_calls, router, T, E):
    """Bias gradients per expert (sums over its rows); with 3 tokens over 64 experts most experts have no rows and
    their bias gradients must be exactly zero."""
    with configured(grouped_backward="always"):
        errors, grads, logits = cases.gradient_errors(router, E, 2, T, 48, 32, torch.float32, "cpu", seed=E,
                                                      mlp="gelu_bias")
    check(errors, torch.float32)
    assert grouped_calls
    if router == "softmax_topk":
        unused = torch.ones(E, dtype=torch.bool)
        unused[logits.topk(2, dim=-1).indices.reshape(-1)] = False
        assert torch.all(grads["b1"][unused] == 0) and torch.all(grads["b2"][unused] == 0)


@cpu_only
def test_nan_in_an_expert_without_pairs_stays_out_of_every_gradient_cpu(grouped_calls):
    """Each expert gets a row of zeros so that grouped_mm writes its weight gradient; an expert that no token chose
    and whose weights hold NaN and inf must still get exactly zero gradients, and every other gradient must be
    bit-identical to the run with clean weights (0 * NaN would leak through the zero rows otherwise)."""
    spec = cases.make_spec("softmax_topk", 16, 2, 48, 32, "gelu_bias")
    gen = torch.Generator().manual_seed(11)
    clean = cases.make_weights(spec, torch.float32, "cpu", gen)
    x, probe = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
    chosen = (x @ clean.router_weight.t()).topk(2, dim=-1).indices.unique()
    unused = next(e for e in range(16) if e not in chosen.tolist())

    def grads(weights):
        leaves = {n: t.clone().requires_grad_(True) for n, t in weights.items() if t is not None}
        xl = x.clone().requires_grad_(True)
        with configured(grouped_backward="always"):
            (kernel_moe.kernels_forward(spec, type(weights)(**leaves), xl)[0] * probe).sum().backward()
        return {"x": xl.grad, **{n: t.grad for n, t in leaves.items()}}

    poisoned = type(clean)(**{n: t.clone() if t is not None else None for n, t in clean.items()})
    for name in ("w1", "w2", "b1", "b2"):
        getattr(poisoned, name)[unused] = float("nan")
    poisoned.w1[unused, 0] = float("inf")
    ref, got = grads(clean), grads(poisoned)
    assert len(grouped_calls) == 2
    for name, g in got.items():
        assert torch.isfinite(g).all(), name
        if name in ("w1", "w2", "b1", "b2"):
            assert not g[unused].any(), name
        assert torch.equal(g, ref[name]), name


@cpu_only
def test_relu_routing_with_no_active_pair_cpu(grouped_calls):
    """Every gate negative: no routed pair (grouped_mm with zero rows); every expert gradient exactly zero."""
    spec = cases.make_spec("relu_bias", 8, 2, 48, 32)
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(7))
    w.router_bias.fill_(-1e3)
    leaves = {n: t.requires_grad_(True) for n, t in w.items() if t is not None}
    x = torch.randn(19, 48, requires_grad=True)
    with configured(grouped_backward="always"):
        y, _, _ = kernel_moe.kernels_forward(spec, w, x)
        (y * torch.randn_like(y)).sum().backward()
    assert grouped_calls == [0] and not y.any()
    for name, t in {"x": x, **leaves}.items():
        assert t.grad is not None and not t.grad.any(), name


@cpu_only
def test_transposed_expert_weights_cpu(grouped_calls):
    """Expert weights held transposed ([E, H, F] and [E, I, H] parameters viewed as [E, F, H] and [E, H, I], as
    transformers' is_transposed experts are): grouped_mm reads the views and the gradients reach the parameters
    in their own layout."""
    spec = cases.make_spec("softmax_topk_renorm", 8, 2, 48, 32)
    gen = torch.Generator().manual_seed(13)
    w = cases.make_weights(spec, torch.float32, "cpu", gen)
    p1 = w.w1.transpose(1, 2).contiguous().requires_grad_(True)
    p2 = w.w2.transpose(1, 2).contiguous().requires_grad_(True)
    x, probe = torch.randn(25, 48, generator=gen), torch.randn(25, 48, generator=gen)
    views = type(w)(**{**w.__dict__, "w1": p1.transpose(1, 2), "w2": p2.transpose(1, 2)})
    with configured(grouped_backward="always"):
        (kernel_moe.kernels_forward(spec, views, x)[0] * probe).sum().backward()
    r1, r2 = p1.detach().double().requires_grad_(True), p2.detach().double().requires_grad_(True)
    ref = type(w)(**{**cases.upcast(w).__dict__, "w1": r1.transpose(1, 2), "w2": r2.transpose(1, 2)})
    (reference_forward(spec, ref, x.double())[0] * probe.double()).sum().backward()
    assert grouped_calls
    assert cases.relative_error(p1.grad, r1.grad) < 1e-5 and cases.relative_error(p2.grad, r2.grad) < 1e-5


@cpu_only
def test_block_level_thousands_of_tokens_cpu(grouped_calls):
    """A DeepSeek-V3-like router (sigmoid, groups, correction bias) over 256 experts, k 8, 2049 tokens: uneven
    loads, many experts with a handful of rows."""
    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors("sigmoid_grouped_corr", 256, 8, 2049, 32, 16, torch.float32, "cpu",
                                             seed=21)
    check(errors, torch.float32)
    assert grouped_calls == [2049 * 8]


@cpu_only
def test_bf16_cpu(grouped_calls):
    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors("sigmoid_grouped_corr", 16, 4, 67, 64, 48, torch.bfloat16, "cpu", seed=2)
    check(errors, torch.bfloat16)
    assert grouped_calls


@cpu_only
@pytest.mark.parametrize("router", ["softmax_topk", "relu_bias"])
def test_weight_on_the_input_cpu(grouped_calls, router):
    """Llama 4's form: the routing weight scales the expert's input; dw comes from the unscaled products."""
    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors(router, 8, 1, 27, 48, 32, torch.float32, "cpu", seed=3,
                                             mlp="weight_on_input")
    check(errors, torch.float32)
    assert grouped_calls


@cpu_only
def test_weight_on_the_input_with_an_up_bias_is_left_to_the_triton_backward_cpu():
    spec = cases.make_spec("softmax_topk", 8, 2, 48, 32, "weight_on_input")
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(1))
    w.b1 = torch.zeros(8, spec.experts.fc1_rows)
    with configured(grouped_backward="always"):
        assert "up-projection bias" in grouped_backward.unsupported_reason(spec, w, torch.zeros(1, 48))


@cpu_only
def test_a_refused_grouped_mm_falls_back_with_a_warning_cpu(grouped_calls, monkeypatch):
    """torch._grouped_mm raising on its last call (the input gradient's rows): the Triton backward runs instead,
    says so, and the gradients are still exact (nothing of the attempt was added to them)."""
    real, seen = torch._grouped_mm, []

    def refuse_fifth(*args, **kwargs):
        seen.append(1)
        if len(seen) == 5:
            raise RuntimeError("grouped_mm: expected strides to be aligned (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", refuse_fifth)
    with configured(grouped_backward="always"), pytest.warns(RuntimeWarning, match="ran the Triton backward"):
        errors, _, _ = cases.gradient_errors("softmax_topk_renorm", 8, 2, 29, 48, 32, torch.float32, "cpu", seed=8)
    check(errors, torch.float32)
    assert grouped_calls and len(seen) == 5


@cpu_only
def test_deterministic_mode_keeps_the_triton_backward_cpu(grouped_calls):
    spec = cases.make_spec("softmax_topk", 8, 2, 48, 32)
    w = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(1))
    torch.use_deterministic_algorithms(True)
    try:
        with configured(grouped_backward="always"):
            assert "deterministic" in grouped_backward.unsupported_reason(spec, w, torch.zeros(1, 48))
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- on the GPU


@hopper
@pytest.mark.parametrize("router", ["softmax_topk_renorm", "sigmoid_grouped_corr", "relu_bias", "capacity"])
@pytest.mark.parametrize("T", [1, 777, 8192])
def test_default_on_hopper_cuda(grouped_calls, router, T):
    errors, _, _ = cases.gradient_errors(router, 64, 6, T, 256, 128, torch.bfloat16, "cuda", seed=T)
    check(errors, torch.bfloat16)
    assert grouped_calls, "bf16 on Hopper should take the grouped path by default"


@cuda
@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "plain_relu2", "clamped_swiglu", "clamped_silu", "shared_gated",
                                 "clamped_swiglu_bias"])
def test_activations_cuda(grouped_calls, mlp):
    with configured(grouped_backward="always"):
        errors, _, _ = cases.gradient_errors("softmax_topk", 32, 4, 1000, 256, 128, torch.bfloat16, "cuda", seed=4,
                                             mlp=mlp)
    check(errors, torch.bfloat16)
    assert bool(grouped_calls) != mlp.startswith("clamped"), "clamped forms in bf16 stay on the Triton backward"
