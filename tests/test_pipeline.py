"""optimize(): inplace, strict, failure half-way, dtypes, token counts, autograd, bad input, report round trip."""
import handwritten as hw
import pytest
import torch
from model_state import same_state, state

import moecompile
from moecompile import hf_zoo


def test_input_model_untouched_unless_inplace(mixtral, quiet):
    saved = state(mixtral)
    optimized = moecompile.optimize(mixtral)
    assert optimized is not mixtral and same_state(mixtral, saved)
    assert moecompile.report(mixtral) is moecompile.report(optimized)
    again = moecompile.optimize(mixtral, inplace=True)
    assert again is mixtral and isinstance(mixtral.model.layers[0].mlp, moecompile.FusedMoE)


def test_strict_raises_and_leaves_model(quiet):
    model = hw.ExpertChoiceModel()
    saved = state(model)
    with pytest.raises(moecompile.MoECompileError, match=r"layers\.0\.ffn\.0: .*strict=False"):
        moecompile.optimize(model, strict=True, inplace=True)
    assert same_state(model, saved)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(0, 32), (1, 1, 32), (3, 7, 32), (1, 256, 32)])
def test_dtypes_and_token_counts(dtype, atol, shape, quiet):
    # bf16/fp16: the original routes in its own dtype, FusedMoE in fp32, so a near-tie can pick another expert for
    # a token: every token within atol except at most 2% of them (the tie flips), and the mean error within atol/10.
    torch.manual_seed(0)
    model = hw.ListMoE().to(dtype).eval()
    optimized = moecompile.optimize(model)
    record = moecompile.report(optimized).blocks[0]
    assert record.decision == "fused" and record.dtype == str(dtype).split(".")[1]
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        got, want = optimized(x), model(x)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    elif got.numel():
        diff = (got.float() - want.float()).abs().reshape(-1, 32)
        assert (diff.amax(-1) > atol).float().mean().item() <= 0.02
        assert diff.mean().item() <= atol / 10


def test_autograd_matches_original(quiet):
    torch.manual_seed(0)
    model = hw.Top1SharedMoE()
    optimized = moecompile.optimize(model)
    x = torch.randn(3, 7, 32)
    for m in (model, optimized):
        m.zero_grad()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(x1).square().sum().backward()
    optimized(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    # parameters shared with the source get their gradient through the fused module (router and shared gate)
    torch.testing.assert_close(optimized.router_weight.grad, model.gate.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(optimized.shared_gate.grad, model.shared_expert_gate.weight.grad, atol=1e-5, rtol=1e-5)


def test_no_moe_warns_and_returns_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with pytest.warns(UserWarning, match="no MoE block found"):
        out = moecompile.optimize(model)
    assert out is model and moecompile.report(model).blocks == []


@pytest.mark.parametrize("bad, match", [
    (dict(seed="1"), "option 'seed' must be int"),
    (dict(fast=True), "unknown option 'fast'"),
])
def test_wrong_flags_named(mixtral, bad, match):
    with pytest.raises(moecompile.MoECompileError, match=match):
        moecompile.optimize(mixtral, **bad)


def test_not_a_module_and_not_optimized():
    with pytest.raises(moecompile.MoECompileError, match="expected a torch.nn.Module"):
        moecompile.optimize("model")
    with pytest.raises(moecompile.MoECompileError, match="call optimize"):
        moecompile.report(torch.nn.Linear(2, 2))


def test_report_round_trip_and_fields(mixtral, quiet):
    rep = moecompile.report(moecompile.optimize(mixtral))
    again = moecompile.Report.from_json(rep.to_json())
    assert again == rep
    b = rep.blocks[0]
    assert (b.path, b.decision, b.reason) == ("model.layers.0.mlp", "fused", "")
    assert moecompile.MoESpec.from_dict(b.spec).router.top_k == 2 and b.max_abs_error < 1e-5
    assert "model.layers.1.mlp" in rep.table()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; run on the device (benchmarks/gpu_check.py)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype, quiet):
    model = hf_zoo.build("qwen3_moe", "grouped_mm").to("cuda", dtype)
    inputs = {k: v.cuda() for k, v in hf_zoo.example_inputs(model).items()}
    want = hf_zoo.model_output(model, inputs)
    optimized = moecompile.optimize(model, strict=True)
    got = hf_zoo.model_output(optimized, inputs)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got.float() - want.float()).abs().max().item() <= tol * want.float().abs().max().item()
