"""Routing rewrites (TopK <-> ReLU, passes/routing.py) and routing_stats, on real HF classes built from their
configs (CPU, fp32); the regulariser: tests/test_remoe.py. Tolerances are written beside each check."""
import sys
from pathlib import Path

import pytest
import torch

import moecompile
from moecompile import MoECompileError, hf_zoo
from moecompile.passes.routing import pick_k

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
import cases  # noqa: E402  (the kernels' spec and weight builders)

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3"]


def token_batches(model, n, seed, batch=8, seq=128):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)} for _ in range(n)]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_relu_calibration_hits_the_old_k_on_held_out_batches(family, quiet):
    model = hf_zoo.build(family)
    k = model.config.num_experts_per_tok
    relu = moecompile.optimize(model, routing="relu", calibration=token_batches(model, 8, seed=1))
    rep = moecompile.report(relu)
    assert all(b.routing_change["direction"] == "topk->relu" for b in rep.fused)
    assert "topk->relu" in rep.table()
    stats = moecompile.routing_stats(relu, token_batches(model, 4, seed=2))  # held out: other tokens
    assert len(stats) == len(rep.fused)
    for s in stats:
        assert s.routing.startswith("relu>all_positive")
        assert abs(s.mean_active - k) <= 0.05 * k, (s.path, s.mean_active, k)  # within 5% of the old k
        assert abs(sum(s.expert_load) - 1) < 1e-6
    # the input model is untouched: its blocks still route top-k and its output is what it was
    assert not any(isinstance(m, moecompile.FusedMoE) for m in model.modules())


def test_relu_block_records_measured_effect(quiet):
    model = hf_zoo.build("qwen3_moe")
    relu = moecompile.optimize(model, routing="relu", calibration=token_batches(model, 2, seed=3))
    change = moecompile.report(relu).fused[0].routing_change
    assert change["calibration_tokens"] == 2 * 8 * 128
    assert change["active_p5"] <= change["active_p50"] <= change["active_p95"]
    assert 0 <= change["same_choice_share"] <= 1 and change["output_rel_error"] > 0
    block = relu.get_submodule(moecompile.report(relu).fused[0].path)
    assert block.spec.router.scaling_factor == pytest.approx(change["output_scale"])


def test_relu_without_calibration_warns_and_says_so(quiet):
    model = hf_zoo.build("mixtral")
    with pytest.warns(UserWarning, match="starting point for training"):
        relu = moecompile.optimize(model, routing="relu")
    rec = moecompile.report(relu).fused[0]
    assert "no calibration data" in rec.routing_summary and rec.routing_change["threshold"] == 0.0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_relu_to_topk_with_k_equal_E_is_exact(family, quiet):
    model = hf_zoo.build(family)
    relu = moecompile.optimize(model, routing="relu", calibration=token_batches(model, 2, seed=4))
    batch = token_batches(model, 1, seed=5, batch=2, seq=33)[0]
    want = logits(relu, batch)
    E = next(m for m in relu.modules() if isinstance(m, moecompile.FusedMoE)).spec.num_experts
    topk, changes = moecompile.rewrite_routing(relu, "topk", k=E)
    assert all(c.direction == "relu->topk" and c.k_after == E for c in changes)
    got = logits(topk, batch)
    # the same sum (zero gates add exact zeros); each expert's GEMM now runs over every token instead of its
    # positive ones, and a CPU GEMM's rounding depends on its row count: 1e-6 relative, fp32
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_relu_to_topk_auto_picks_k_covering_the_pairs(quiet):
    model = hf_zoo.build("mixtral")
    calib = token_batches(model, 2, seed=6)
    relu = moecompile.optimize(model, routing="relu", calibration=calib)
    topk, changes = moecompile.rewrite_routing(relu, "topk", k="auto", calibration=calib, coverage=0.99)
    for c in changes:
        assert c.pairs_kept_share >= 0.99 and 1 <= c.k_after <= 8
        assert topk.get_submodule(c.path).spec.router.top_k == c.k_after


def test_pick_k_is_the_smallest_k_reaching_the_coverage():
    gen = torch.Generator().manual_seed(0)
    gates = torch.relu(torch.randn(500, 16, generator=gen) - 0.8)
    active = (gates > 0).sum(1)
    for coverage in (0.5, 0.9, 0.99, 1.0):
        k = pick_k(gates, coverage)
        kept = lambda kk: active.clamp(max=kk).sum().item() / active.sum().item()  # noqa: E731
        assert kept(k) >= coverage and (k == 1 or kept(k - 1) < coverage)


def test_routing_errors_are_clear_and_leave_the_model(quiet):
    model = hf_zoo.build("mixtral")
    with pytest.raises(MoECompileError, match="routing must be one of"):
        moecompile.optimize(model, routing="softmax")
    with pytest.raises(MoECompileError, match="takes ReLU-routed blocks"):
        moecompile.optimize(model, routing="topk", k=2, inplace=True)
    assert not any(isinstance(m, moecompile.FusedMoE) for m in model.modules())  # inplace, yet restored
    relu = moecompile.optimize(model, routing="relu")
    with pytest.raises(MoECompileError, match="needs calibration batches"):
        moecompile.rewrite_routing(relu, "topk", k="auto")
    with pytest.raises(MoECompileError, match="tensor .passed positionally. or a dict"):
        moecompile.rewrite_routing(relu, "topk", k=2, calibration=[[1, 2, 3]])
    with pytest.raises(MoECompileError, match="no fused MoE block"):
        moecompile.routing_stats(torch.nn.Linear(4, 4), [torch.randn(2, 4)])


def test_relu_gradients_match_autograd_through_the_reference():
    """ReLU-routed FusedMoE on the Triton op (interpreter on CPU, fp32; its backward recomputes the reference)
    against float64 autograd through the reference: input, router weight and bias, expert weights. ReLU gates get
    gradients only where positive. Tolerance: 1e-4 relative (fp32 forward recompute vs float64)."""
    def two_dead_experts(spec, weights, x):
        weights.router_bias[:2] = -1e4

    errors, grads, logits = cases.gradient_errors("relu_bias", 8, 2, 13, 48, 32, torch.float32, "cpu", seed=21,
                                                  setup=two_dead_experts)
    assert set(errors) == {"x", "router_weight", "router_bias", "w1", "w2"}
    assert all(e < 1e-4 for e in errors.values()), errors
    dead = (logits <= 0).all(dim=0)  # experts no token reached get no router or expert gradient
    assert dead[:2].all() and not dead[2:].all()
    for name in ("router_weight", "router_bias", "w1", "w2"):
        assert torch.all(grads[name][dead] == 0) and grads[name][~dead].abs().sum() > 0, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device: "
                    "benchmarks/gpu_tests.sh)")
@pytest.mark.parametrize("router", ["relu_bias", "relu_topk"])
@pytest.mark.parametrize("T", [1, 333, 2048])
def test_relu_gradients_bf16_cuda(router, T):
    """The fused Triton forward and its backward in bf16 on the GPU (ReLU routing, and top-k of ReLU gates) against
    float64 autograd through the reference on the same bf16 values: input, router weight and bias, expert weights.
    Tolerance: 2e-2 normwise per gradient (bf16 keeps 8 significant bits; the backward recomputes the reference in
    bf16, and a gate within rounding of 0 may be on in one and off in the other). Measured figures:
    benchmarks/routing_grads.py."""
    errors, grads, _ = cases.gradient_errors(router, 60, 6, T, 200, 136, torch.bfloat16, "cuda", seed=31 + T)
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    assert all(e < 2e-2 for e in errors.values()), errors
