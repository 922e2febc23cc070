"""Real HF transformers MoE families built from their configs, optimized under each experts implementation: every
block fused and the logits match the original (fp32: max abs error <= 1e-4 of max |logit|)."""
import pytest
import torch

import moecompile
from moecompile import hf_zoo

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
            "granitemoe", "granitemoeshared", "llama4", "glm4_moe", "minimax", "hunyuan_v1_moe", "dots1", "flint",
            "nemotron_h", "aria", "kimi_linear", "exaone_moe"]
IMPLS = list(hf_zoo.EXPERTS_IMPLEMENTATIONS)


def _build(family, impl):
    if hf_zoo.experts_implementations(family) == ("n/a",):  # no switch: run once, under "eager"
        return hf_zoo.build(family) if impl == "eager" else None
    return hf_zoo.build(family, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_fully_fused_and_logits_match(family, impl, quiet):
    model = _build(family, impl)
    if model is None:  # families without the switch run once, under "eager"
        return
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    optimized = moecompile.optimize(model, strict=True)
    rep = moecompile.report(optimized)
    assert rep.blocks and len(rep.fused) == len(rep.blocks)
    got = hf_zoo.model_output(optimized, inputs)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("family", ["phimoe", "jetmoe"])
def test_unsupported_family_left_with_reason(family, quiet):
    model = hf_zoo.build(family)
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    optimized = moecompile.optimize(model)
    rep = moecompile.report(optimized)
    assert rep.left and all(b.reason for b in rep.left)
    torch.testing.assert_close(hf_zoo.model_output(optimized, inputs), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(moecompile.MoECompileError, match="strict=False"):
        moecompile.optimize(model, strict=True)
