"""A training forward that keeps its up projection for the backward (kernels/keep.py): the backward must give the
same gradients as the one that recomputes it, bit for bit (same rows, same layout, same GEMMs), and the float64
reference's within tolerance; a kept projection serves one backward only (retain_graph's second one recomputes);
activation checkpointing keeps nothing; NaN in an expert without pairs stays out. On the CPU with
settings.grouped_backward="always" (torch's CPU _grouped_mm, the Triton kernels in the interpreter).

Tolerances: the float64 reference's normwise relative error, 1e-5 in fp32 and 2.5e-2 in bf16 (test_backward.py's);
kept against recomputed: exact."""
from __future__ import annotations

import cases
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moecompile import FusedMoE
from moecompile.kernels import grouped, grouped_backward, keep
from moecompile.kernels.settings import configured
from moecompile.reference import reference_forward
from moecompile.spec import MoEWeights

GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter cases run on the CPU machine")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                            reason="needs a Hopper GPU (run on the device)")
KEEP_ALL = dict(grouped_backward="always", keep_up_projection_min_rows=0.0)
RECOMPUTE = dict(grouped_backward="always", keep_up_projection_min_rows=None)


@pytest.fixture
def kept_calls(monkeypatch):
    """(forwards that kept rows, backwards handed a kept projection)."""
    forwards, backwards = [], []
    cases.record_calls(monkeypatch, grouped, "expert_rows_kept", lambda *a: forwards.append(a[2].shape[0]))
    real = grouped_backward.routed_grads

    def routed_grads(*args, **kwargs):
        backwards.append(args[15] if len(args) > 15 else kwargs.get("kept"))
        return real(*args, **kwargs)
    monkeypatch.setattr(grouped_backward, "routed_grads", routed_grads)
    return forwards, backwards


def block(router: str, mlp: str, E: int, k: int, dtype, device="cpu", seed=0, H=48, I=32):
    spec = cases.make_spec(router, E, k, H, I, mlp)
    gen = torch.Generator().manual_seed(seed)
    weights = cases.make_weights(spec, dtype, device, gen)
    return spec, weights, gen


def step(spec, weights, x, probe, settings, wrap=None, backwards=1):
    """One forward and `backwards` backward calls of sum(y * probe); the gradients of x and every weight."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in weights.items() if t is not None}
    xg = x.detach().clone().requires_grad_(True)
    fused = FusedMoE(spec, MoEWeights(**leaves), backend="triton")
    with configured(**settings):
        y = wrap(fused, xg) if wrap is not None else fused(xg)
        loss = (y.float() * probe).sum()
        for i in range(backwards):
            for t in (xg, *leaves.values()):
                t.grad = None
            loss.backward(retain_graph=i + 1 < backwards)
    return y.detach(), {"x": xg.grad, **{n: t.grad for n, t in leaves.items()}}


def assert_same(a: dict, b: dict) -> None:
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differ, f"gradients differ between the kept and the recomputed up projection: {differ}"


FORMS = [("softmax_topk", "swiglu"), ("softmax_topk_renorm", "gelu"), ("sigmoid_grouped_corr", "swiglu"),
         ("topk_softmax", "plain_relu2"), ("capacity", "swiglu"), ("softmax_topk", "shared_gated")]


@cpu_only
@pytest.mark.parametrize("router,mlp,dtype", [(*form, torch.float32) for form in FORMS]
                         + [(*FORMS[0], torch.bfloat16), (*FORMS[-1], torch.bfloat16)])
def test_kept_gradients_equal_recomputed_and_reference_cpu(kept_calls, router, mlp, dtype):
    """Router forms (the closed-form router gradient and the autograd one: capacity, a shared gate), activations,
    fp32 for each and bf16 for two, 301 tokens over 16 experts (some experts get few rows)."""
    spec, weights, gen = block(router, mlp, 16, 4, dtype, seed=3)
    x = torch.randn(301, 48, generator=gen).to(dtype)
    probe = torch.randn(301, 48, generator=gen)
    y_kept, kept = step(spec, weights, x, probe, KEEP_ALL)
    forwards, backwards = kept_calls
    assert forwards == [301] and backwards and backwards[-1] is not None, "the forward did not keep its rows"
    y_rec, recomputed = step(spec, weights, x, probe, RECOMPUTE)
    assert backwards[-1] is None, "the recompute setting still kept"
    assert_same(kept, recomputed)
    y_ref, want = reference_grads(spec, weights, x, probe)
    errors = {n: cases.relative_error(g.double(), want[n]) if want[n].norm() > 0 else g.abs().max().item()
              for n, g in kept.items()}
    bad = {n: e for n, e in errors.items() if not e <= GRAD_TOLERANCE[dtype]}
    assert not bad, f"gradients off the float64 reference: {bad}"
    assert cases.relative_error(y_kept.double(), y_ref) <= cases.TOLERANCE[dtype]


def reference_grads(spec, weights, x, probe) -> tuple[torch.Tensor, dict]:
    """y and the gradients of sum(y * probe) through the reference in float64 (a choice-only tensor: zeros)."""
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in weights.items() if t is not None}
    xr = x.detach().double().requires_grad_(True)
    with cases.reference_ties(spec):
        y, _ = reference_forward(spec, MoEWeights(**leaves), xr)
    (y * probe.double()).sum().backward()
    grads = {"x": xr.grad, **{n: t.grad for n, t in leaves.items()}}
    return y.detach(), {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in grads.items()}


@cpu_only
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (3, 64, 2), (1, 1, 1), (50, 3, 3)])
def test_token_and_expert_counts_cpu(kept_calls, T, E, k):
    """Experts without rows (3 tokens over 64 experts) get exactly zero weight gradients through the kept path;
    one token, one expert."""
    spec, weights, gen = block("softmax_topk", "swiglu", E, k, torch.float32, seed=T + E)
    x, probe = torch.randn(T, 48, generator=gen), torch.randn(T, 48, generator=gen)
    _, kept = step(spec, weights, x, probe, KEEP_ALL)
    assert kept_calls[0] == [T]
    _, recomputed = step(spec, weights, x, probe, RECOMPUTE)
    assert_same(kept, recomputed)
    chosen = (x @ weights.router_weight.t()).topk(k, dim=-1).indices.unique()
    unused = torch.ones(E, dtype=torch.bool)
    unused[chosen] = False
    assert torch.all(kept["w1"][unused] == 0) and torch.all(kept["w2"][unused] == 0)


@cpu_only
def test_retain_graph_second_backward_recomputes_cpu(kept_calls):
    """The backward overwrites the kept projection with its gradient: a second backward through the same graph
    must recompute it and give the same gradients, not read the overwritten rows."""
    spec, weights, gen = block("softmax_topk_renorm", "swiglu", 8, 2, torch.float32, seed=7)
    x, probe = torch.randn(40, 48, generator=gen), torch.randn(40, 48, generator=gen)
    _, once = step(spec, weights, x, probe, KEEP_ALL)
    _, twice = step(spec, weights, x, probe, KEEP_ALL, backwards=2)
    backwards = kept_calls[1]
    assert [b is not None for b in backwards] == [True, True, False]
    assert_same(twice, once)


@cpu_only
def test_activation_checkpointing_keeps_nothing_cpu(kept_calls):
    """Under torch.utils.checkpoint (saved-tensor hooks) the forward keeps nothing; the gradients are the
    recomputing backward's."""
    spec, weights, gen = block("softmax_topk", "swiglu", 8, 2, torch.float32, seed=8)
    x, probe = torch.randn(40, 48, generator=gen), torch.randn(40, 48, generator=gen)
    _, checkpointed = step(spec, weights, x, probe, KEEP_ALL,
                           wrap=lambda fused, xg: checkpoint(fused, xg, use_reentrant=False))
    assert not kept_calls[0] and all(b is None for b in kept_calls[1])
    _, recomputed = step(spec, weights, x, probe, RECOMPUTE)
    assert_same(checkpointed, recomputed)


@cpu_only
def test_nan_in_an_expert_without_pairs_cpu(kept_calls):
    """The kept forward's zero rows multiply an unused expert's weights too: with NaN and inf there, y and every
    gradient must equal the clean weights' (the unused expert's gradients exactly zero)."""
    spec, clean, gen = block("softmax_topk", "swiglu", 16, 2, torch.float32, seed=11)
    x, probe = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
    chosen = (x @ clean.router_weight.t()).topk(2, dim=-1).indices.unique().tolist()
    unused = next(e for e in range(16) if e not in chosen)
    dirty = MoEWeights(**{n: t.clone() if t is not None else None for n, t in clean.items()})
    dirty.w1[unused, 0, 0] = float("nan")
    dirty.w2[unused, 1, 1] = float("inf")
    y_clean, g_clean = step(spec, clean, x, probe, KEEP_ALL)
    y_dirty, g_dirty = step(spec, dirty, x, probe, KEEP_ALL)
    assert len(kept_calls[0]) == 2
    assert torch.equal(y_clean, y_dirty)
    assert torch.all(g_dirty["w1"][unused] == 0) and torch.all(g_dirty["w2"][unused] == 0)
    assert_same({n: g for n, g in g_dirty.items()}, g_clean)


@cpu_only
@pytest.mark.parametrize("router,mlp,why", [("relu_bias", "swiglu", "ReLU routing"),
                                            ("softmax_topk", "gelu_bias", "expert biases"),
                                            ("softmax_topk", "weight_on_input", "weight on the expert's input")])
def test_forms_it_does_not_take_recompute_cpu(kept_calls, router, mlp, why):
    spec, weights, gen = block(router, mlp, 8, 2, torch.float32, seed=2)
    x, probe = torch.randn(30, 48, generator=gen), torch.randn(30, 48, generator=gen)
    with configured(**KEEP_ALL):
        assert why in keep.keep_reason(spec, weights, x)
    step(spec, weights, x, probe, KEEP_ALL)
    assert not kept_calls[0]


@hopper
@pytest.mark.parametrize("T", [4096, 1023])
def test_kept_gradients_equal_recomputed_cuda(kept_calls, T):
    """bf16 on the H100/H200 with the shipped settings ("auto"): a Qwen3-shaped block (E 128, k 8) at 4096 tokens
    (256 rows an expert: kept) and 1023 (64 rows: below the threshold, recomputed), against the recompute setting,
    exactly."""
    spec, weights, gen = block("softmax_topk_renorm", "swiglu", 128, 8, torch.bfloat16, "cuda", seed=T, H=256, I=128)
    x = torch.randn(T, 256, generator=gen).to("cuda", torch.bfloat16)
    probe = torch.randn(T, 256, generator=gen).cuda()
    _, default = step(spec, weights, x, probe, {})
    assert bool(kept_calls[0]) == (T == 4096)
    _, recomputed = step(spec, weights, x, probe, dict(keep_up_projection_min_rows=None))
    assert_same(default, recomputed)
