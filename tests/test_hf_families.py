"""Real HF transformers MoE families built from their configs, optimized under each experts implementation: every
block fused and the logits match the original (fp32: max abs error <= 1e-4 of max |logit|)."""
import copy

import pytest
import torch
import transformers

import moecompile
from moecompile import hf_zoo

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
            "granitemoe", "granitemoeshared", "llama4", "glm4_moe", "minimax", "hunyuan_v1_moe", "dots1", "flint",
            "nemotron_h", "aria", "kimi_linear", "exaone_moe", "phimoe", "dbrx", "jamba", "switch_transformers",
            "ernie4_5_moe", "jetmoe"]


# JetMoE's mixture of attention heads (JetMoeMoA) has a router and stacked experts too, but its experts are
# attention projections driven by the attention module (map/reduce), not a block that maps hidden states: left.
PARTLY = {"jetmoe": "JetMoeMoA"}


# Known gaps with transformers before 5.23 (the device has 5.17); strict, so a fix shows up as a failure to update
OLD_TRANSFORMERS = tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 23)
OLD_TRANSFORMERS_GAPS = {
    "switch_transformers": "5.17's sparse MLP flattens the batch before routing, so its expert capacity counts "
                           "tokens over the whole batch, not per sequence, and wires the router's outputs to the "
                           "experts differently (README, gpu_check); no description reproduces it: the block is left",
    "aria": "5.17's Aria selects experts inside AriaExperts (it takes router logits), a form detect does not find",
}


def _cases():
    """(family, experts implementation) pairs; a family without the switch runs once, as it is built ("n/a"); a
    family newer than the installed transformers (the device has 5.17) is skipped, saying so."""
    for family in FAMILIES:
        try:
            implementations = hf_zoo.experts_implementations(family)
        except LookupError as exc:
            yield pytest.param(family, "n/a", marks=pytest.mark.skip(
                reason=f"not in transformers {transformers.__version__}: {exc}"))
            continue
        marks = [pytest.mark.xfail(strict=True, reason=OLD_TRANSFORMERS_GAPS[family])] if (
            family in OLD_TRANSFORMERS_GAPS and OLD_TRANSFORMERS) else []
        yield from (pytest.param(family, impl, marks=marks) for impl in implementations)


CASES = list(_cases())


def first_case_per_family(families=None) -> list:
    """One of CASES per family (of `families`, or all), its first experts implementation (the others give the same
    blocks), with the case's marks."""
    firsts = {}
    for case in CASES:
        family = case.values[0]
        if families is None or family in families:
            firsts.setdefault(family, case)
    return list(firsts.values())


@pytest.mark.parametrize("family, impl", CASES)
def test_family_fully_fused_and_logits_match(family, impl, quiet):
    model = hf_zoo.build(family, None if impl == "n/a" else impl)
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    optimized = moecompile.optimize(model, strict=family not in PARTLY)
    rep = moecompile.report(optimized)
    assert rep.blocks and rep.fused
    for left in rep.left:
        assert type(model.get_submodule(left.path)).__name__ == PARTLY[family] and left.reason
    got = hf_zoo.model_output(optimized, inputs)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.xfail(OLD_TRANSFORMERS, strict=True, reason=OLD_TRANSFORMERS_GAPS["switch_transformers"])
def test_switch_transformers_expert_capacity_drops_late_tokens(quiet):
    # capacity 3 per sequence and expert, 40 tokens over 8 experts, top-1: many tokens overflow and get no expert
    model = hf_zoo.build("switch_transformers")
    inputs = hf_zoo.example_inputs(model, batch=2, seq=40)
    want = hf_zoo.model_output(model, inputs)
    optimized = moecompile.optimize(model, strict=True)
    assert all(b.spec["router"]["expert_capacity"] == 3 for b in moecompile.report(optimized).blocks)
    got = hf_zoo.model_output(optimized, inputs)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("ran_before", [True, False, "deepcopy"])  # HF installs its recording hooks on the first
def test_router_logits_and_aux_loss_still_recorded(family, ran_before, quiet, tmp_path):  # forward, and only then
    model = hf_zoo.build(family)
    inputs = hf_zoo.example_inputs(model)
    if ran_before:
        model(**inputs, output_router_logits=True)
    optimized = moecompile.optimize(model, strict=True)
    if ran_before == "deepcopy":  # a copy must keep the hooks: HF does not install them again on the copy
        optimized = copy.deepcopy(optimized)
    if not ran_before:  # a model HF has hooked cannot be pickled (its hooks are local functions): save before
        torch.save(optimized, tmp_path / "model.pt")  # the tap pickles, rebuilt on load
        optimized = torch.load(tmp_path / "model.pt", weights_only=False)
    want = model(**inputs, output_router_logits=True)
    got = optimized(**inputs, output_router_logits=True)
    if getattr(want, "router_logits", None) is None:  # this transformers records none for the family (DeepSeek-V3
        assert getattr(got, "router_logits", None) is None  # in 5.17): neither may the optimized model
        return
    assert len(got.router_logits) == len(want.router_logits) == model.config.num_hidden_layers
    for g, w in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    if want.aux_loss is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-5, rtol=1e-5)
