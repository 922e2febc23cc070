"""Random MoE blocks for the kernel tests: a spec per router form and MLP variant, weights scaled so outputs are O(1),
and the checks every kernel test makes against the reference."""
from __future__ import annotations

import itertools

import pytest
import torch

from moecompile.kernels import moe as kernel_moe
from moecompile.reference import reference_forward
from moecompile.spec import MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec

# router forms: name -> RouterSpec kwargs (num_experts and top_k are filled in per case)
ROUTERS = {
    "softmax_topk": dict(),
    "softmax_topk_renorm": dict(renormalize=True),
    "topk_softmax": dict(score_order="select_then_score"),
    "sigmoid_grouped_corr": dict(scoring="sigmoid", selection="grouped_topk", has_correction_bias=True,
                                 renormalize=True, renorm_min=1e-20, scaling_factor=2.5),
    # DeepSeek-V3's remote-code gate: the masked groups' experts compete at 0.0; make_weights draws the correction
    # bias around -0.6 so that biased scores are often negative and the branch is taken (with exact ties at 0.0)
    "sigmoid_grouped_fill0": dict(scoring="sigmoid", selection="grouped_topk", has_correction_bias=True,
                                  renormalize=True, renorm_min=1e-20, scaling_factor=2.5, group_fill="zero"),
    "sigmoid_topk_bias": dict(scoring="sigmoid", has_bias=True, renormalize=True),
    "sqrtsoftplus_topk": dict(scoring="sqrtsoftplus", renormalize=True),
    "relu": dict(scoring="relu", selection="all_positive", top_k=None),
    "relu_bias": dict(scoring="relu", selection="all_positive", top_k=None, has_bias=True),  # what routing="relu" makes
    "relu_topk": dict(scoring="relu", has_bias=True),  # ReLU -> TopK deployment form: top-k of ReLU gates, no renorm
    # routed by PyTorch, experts by the kernels
    "sparsemixer": dict(selection="sparsemixer", score_order="select_then_score", jitter_eps=0.01),
    "capacity": dict(expert_capacity=3),
    # DeepSpeed top2gating: a capacity from the token count over the batch, second choices queued after all first
    # choices, renormalised over the kept ones
    "capacity_factor": dict(capacity_factor=0.5, min_capacity=1, capacity_scope="batch", capacity_order="slot_major",
                            renormalize=True, renorm_after_drop=True, renorm_min=1.2e-7),
}
# expert MLP variants: name -> (MLPSpec kwargs, spec extras)
MLPS = {
    "swiglu": (dict(), {}),
    "gelu_bias": (dict(activation="gelu", has_bias=True), {}),
    "plain_relu2": (dict(gated=False, activation="relu2"), {}),
    "gelu_tanh": (dict(activation="gelu_tanh"), {}),
    "gelu": (dict(activation="gelu"), {}),
    "plain_relu": (dict(gated=False, activation="relu"), {}),
    "clamped_swiglu": (dict(activation="clamped_swiglu"), {}),
    "clamped_swiglu_bias": (dict(activation="clamped_swiglu", has_bias=True), {}),
    "clamped_silu": (dict(activation="clamped_silu", activation_limit=1.5), {}),
    "shared_gated": (dict(), dict(shared=True, sigmoid_gate=True)),
    "shared_output_bias": (dict(), dict(shared=True, output_bias=True)),
    "weight_on_input": (dict(), dict(weight_on_input=True)),
}

# normwise relative error allowed against the fp64 reference on the same (upcast) inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def groups_for(E: int, k: int) -> tuple[int, int]:
    """(n_group, topk_group) for a grouped router of E experts picking k: DeepSeek-V3's 8 / 4 where it fits."""
    for n_group in (8, 4, 2, 1):
        if E % n_group == 0:
            for topk_group in range(min(4, n_group), n_group + 1):
                if k <= topk_group * (E // n_group):
                    return n_group, topk_group
    return 1, 1


def make_spec(router: str, E: int, k: int, H: int, I: int, mlp: str = "swiglu") -> MoESpec:
    rk = dict(ROUTERS[router])
    rk.setdefault("top_k", k)
    if router == "sparsemixer":
        rk["top_k"] = 2
    if rk.get("selection") == "grouped_topk":
        rk["n_group"], rk["topk_group"] = groups_for(E, k)
    mk, extra = MLPS[mlp]
    if extra.get("weight_on_input"):
        rk["weight_on_input"] = True
    shared = None
    if extra.get("shared"):
        shared = SharedExpertSpec(MLPSpec(hidden_size=H, intermediate_size=I + 8), sigmoid_gate=extra.get(
            "sigmoid_gate", False))
    return MoESpec(router=RouterSpec(num_experts=E, **rk), experts=MLPSpec(hidden_size=H, intermediate_size=I, **mk),
                   shared=shared, has_output_bias=extra.get("output_bias", False))


def make_weights(spec: MoESpec, dtype, device, gen: torch.Generator) -> MoEWeights:
    E, H = spec.num_experts, spec.hidden_size
    e = spec.experts

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    w = MoEWeights(router_weight=rnd(E, H, scale=H ** -0.5), w1=rnd(E, e.fc1_rows, H, scale=H ** -0.5),
                   w2=rnd(E, H, e.intermediate_size, scale=e.intermediate_size ** -0.5))
    r = spec.router
    if r.has_bias:
        w.router_bias = rnd(E, scale=0.5)
    if r.has_correction_bias:
        w.correction_bias = (rnd(E, scale=0.1) - (0.6 if r.group_fill == "zero" else 0.0)).float()
    if e.has_bias:
        w.b1, w.b2 = rnd(E, e.fc1_rows, scale=0.1), rnd(E, H, scale=0.1)
    if spec.shared is not None:
        s = spec.shared.mlp
        w.shared_w1 = rnd(s.fc1_rows, H, scale=H ** -0.5)
        w.shared_w2 = rnd(H, s.intermediate_size, scale=s.intermediate_size ** -0.5)
        if spec.shared.sigmoid_gate:
            w.shared_gate = rnd(1, H, scale=H ** -0.5)
    if spec.has_output_bias:
        w.output_bias = rnd(H, scale=0.1)
    return w


def reference_ties(spec: MoESpec):
    """Where the block's own selection meets exact ties (masked groups at 0.0), the reference breaks them as the
    kernels do, lowest index first (torch.topk's order among ties is unspecified); elsewhere, torch.topk as it is."""
    from contextlib import nullcontext

    from moecompile.backends.topk_ties import onnx_topk_ties

    return onnx_topk_ties() if spec.router.group_fill == "zero" else nullcontext()


def upcast(weights: MoEWeights) -> MoEWeights:
    return MoEWeights(**{name: None if t is None else t.double() for name, t in weights.items()})


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def check_against_reference(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, y: torch.Tensor,
                            logits: torch.Tensor, slot_weights: torch.Tensor, seq_len: int | None = None) -> None:
    """Output, logits and the per-token combine weights against the fp64 reference on the same inputs."""
    T = x.shape[0]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not y.isnan().any(), "NaN in the output: an element was left unwritten (buffers are poisoned)"
    with reference_ties(spec):
        y_ref, routing = reference_forward(spec, upcast(weights), x.double(), seq_len)
    err = relative_error(y, y_ref)
    assert err <= TOLERANCE[x.dtype], f"output relative error {err:.2e} > {TOLERANCE[x.dtype]:.0e}"
    assert relative_error(logits, routing.logits) <= 1e-5
    if spec.router.is_variable_k:
        ref_weights = routing.logits.relu() * spec.router.scaling_factor
    else:  # as sets per token: two choice values within float32 rounding of each other (one case in an H100 run:
        # 0.24379340 and 0.24379343 in float64) may take their slots in either order; y above checks the pairing
        ref_weights = routing.weight.view(T, spec.router.top_k).sort(dim=-1).values
        slot_weights = slot_weights.sort(dim=-1).values
    assert slot_weights.shape == ref_weights.shape
    if T:
        assert (slot_weights.double() - ref_weights).abs().max().item() <= 1e-5, "combine weights differ"


def gradient_errors(router: str, E: int, k: int, T: int, H: int, I: int, dtype, device: str, seed: int,
                    setup=None, mlp: str = "swiglu") -> tuple[dict[str, float], dict[str, torch.Tensor], torch.Tensor]:
    """FusedMoE on the Triton op (forward kernels; the backward recomputes the reference) against float64 autograd
    through the reference on the same values, for a linear loss sum(y * probe). Returns the normwise relative error
    of each gradient (input "x" and every weight), the op's gradients, and the reference's router logits.
    `setup(spec, weights, x)` may change the weights in place first."""
    from moecompile import FusedMoE

    spec = make_spec(router, E, k, H, I, mlp)
    gen = torch.Generator().manual_seed(seed)
    weights = make_weights(spec, dtype, device, gen)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    if setup is not None:
        setup(spec, weights, x)
    probe = torch.randn(T, H, generator=gen, dtype=torch.float64)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in weights.items() if t is not None}
    xg = x.clone().requires_grad_(True)
    fused = FusedMoE(spec, MoEWeights(**leaves), backend="triton")  # raises if the kernels cannot run it
    (fused(xg).double() * probe.to(device)).sum().backward()
    ref_leaves = {n: t.detach().cpu().double().requires_grad_(True) for n, t in leaves.items()}
    xr = x.cpu().double().requires_grad_(True)
    with reference_ties(spec):
        y_ref, routing = reference_forward(spec, MoEWeights(**ref_leaves), xr)
    (y_ref * probe).sum().backward()
    grads = {"x": xg.grad, **{n: t.grad for n, t in leaves.items()}}
    want = {"x": xr.grad, **{n: t.grad for n, t in ref_leaves.items()}}
    # a tensor that counts for choice only (a correction bias) has no gradient in the reference: zero
    want = {n: torch.zeros_like(ref_leaves[n]) if g is None and n != "x" else g for n, g in want.items()}
    errors = {n: relative_error(g.cpu(), want[n]) if want[n].norm() > 0 else g.abs().max().item()
              for n, g in grads.items()}
    return errors, grads, routing.logits.detach()


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device: see benchmarks/gpu_tests.sh)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_seed = itertools.count(1234)


def record_calls(monkeypatch, owner, name: str, record) -> None:
    """Replace owner.name with a wrapper that calls record(*args) and then the original."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: (record(*a), real(*a, **kw))[1])


def run_case(router, E, k, T, H, I, dtype, device, mlp="swiglu", setup=None, seq_len=None):
    spec = make_spec(router, E, k, H, I, mlp)
    gen = torch.Generator().manual_seed(next(_seed))
    weights = make_weights(spec, dtype, device, gen)
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    if setup is not None:
        setup(spec, weights, x)
    y, logits, slot_weights = kernel_moe.kernels_forward(spec, weights, x, seq_len)
    check_against_reference(spec, weights, x, y, logits, slot_weights, seq_len)
    return spec, weights, x, y
