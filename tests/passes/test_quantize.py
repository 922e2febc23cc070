"""optimize(model, expert_weights="fp8") (passes/quantize.py) on real transformers models built from their configs:
every fused block's routed experts become float8_e4m3fn with block scales, the error each block's record reports is
the block's own error against the original block on the same probe inputs (recomputed here, not read back), the
user's model is untouched, and bad flags leave everything as it was (inplace too).

Tolerances: the recorded error must equal the recomputed one within 1e-3 of itself (both are the same normwise
relative error, the fused block before quantization being the original within 1e-6); FP8 e4m3 with 3 mantissa bits
puts a block's error between 1e-2 and 1e-1; the whole model's logits stay within 5e-2 of the original's."""
from __future__ import annotations

import pytest
import torch

import moecompile
from moecompile import fp8, hf_zoo
from moecompile.errors import MoECompileError
from moecompile.fused import FusedMoE
from moecompile.passes import quantize


def state(model):
    return {n: t.clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_fp8_experts_recorded_error_is_the_blocks_own(family):
    model = hf_zoo.build(family).eval()
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    saved = state(model)
    optimized = moecompile.optimize(model, expert_weights="fp8")
    records = {r.path: r for r in moecompile.report(optimized).fused}
    blocks = [(p, m) for p, m in optimized.named_modules() if isinstance(m, FusedMoE)]
    assert blocks and len(blocks) == len(records)
    for path, block in blocks:
        w = block.weights()
        assert fp8.is_fp8(w.w1) and fp8.is_fp8(w.w2)
        assert w.w1_scale.shape == fp8.scale_shape(tuple(w.w1.shape))
        if block.spec.shared is not None:  # Qwen2-MoE's shared expert (with its sigmoid gate) too
            assert fp8.is_fp8(w.shared_w1) and fp8.is_fp8(w.shared_w2) and w.shared_w1_scale.dim() == 2
        x = torch.randn(quantize.PROBE_TOKENS, block.spec.hidden_size,
                        generator=torch.Generator().manual_seed(0)).to(w.router_weight.dtype)
        with torch.no_grad():
            original = model.get_submodule(path)(x[None])
            original = (original[0] if isinstance(original, tuple) else original)[0].double()
            quantized = block(x)
            quantized = (quantized[0] if isinstance(quantized, tuple) else quantized).double()
        error = ((quantized - original).norm() / original.norm()).item()
        recorded = float(records[path].expert_weights.rsplit(" ", 1)[-1])
        assert abs(recorded - error) <= 1e-3 * error, (recorded, error)
        assert 1e-2 < error < 1e-1
    got = hf_zoo.model_output(optimized, inputs)
    assert ((got - want).norm() / want.norm()).item() < 5e-2
    assert all(torch.equal(saved[n], t) for n, t in model.state_dict().items()), "the user's model changed"
    assert "expert weights" in moecompile.report(optimized).table()


def test_bad_format_and_combinations_change_nothing():
    model = hf_zoo.build("mixtral").eval()
    saved = state(model)
    with pytest.raises(MoECompileError, match="expert_weights='int4' is not one of"):
        moecompile.optimize(model, expert_weights="int4", inplace=True)
    with pytest.raises(MoECompileError, match="'expert_weights' must be str"):
        moecompile.optimize(model, expert_weights=8)
    with pytest.raises(MoECompileError, match="expert_parallel and expert_weights"):
        moecompile.optimize(model, expert_weights="fp8", expert_parallel=object(), inplace=True)
    assert not any(isinstance(m, FusedMoE) for m in model.modules())
    assert all(torch.equal(saved[n], t) for n, t in model.state_dict().items())


def test_failure_midway_puts_the_original_blocks_back_inplace(monkeypatch):
    """A quantization that fails on the second block, inplace=True: the model gets its original blocks back."""
    model = hf_zoo.build("qwen3_moe").eval()
    originals = {p: m for p, m in model.named_modules() if p.endswith("mlp")}
    calls = []
    real = fp8.quantize

    def failing(weight):
        calls.append(1)
        if len(calls) > 2:  # w1 and w2 of the first block, then the second block's w1
            raise RuntimeError("quantization failed")
        return real(weight)
    monkeypatch.setattr(fp8, "quantize", failing)
    with pytest.raises(RuntimeError, match="quantization failed"):
        moecompile.optimize(model, expert_weights="fp8", inplace=True)
    assert {p: m for p, m in model.named_modules() if p.endswith("mlp")} == originals
    assert not any(isinstance(m, FusedMoE) for m in model.modules())


def test_quantize_an_optimized_model_in_place():
    """moecompile.quantize_experts on a model optimized earlier gives what optimize(expert_weights="fp8") gives:
    the same FP8 tensors and recorded errors; a model with no fused block is refused, unchanged."""
    model = hf_zoo.build("mixtral").eval()
    at_once = moecompile.optimize(model, expert_weights="fp8")
    later = moecompile.quantize_experts(moecompile.optimize(model))
    pairs = list(zip([m for m in at_once.modules() if isinstance(m, FusedMoE)],
                     [m for m in later.modules() if isinstance(m, FusedMoE)]))
    assert len(pairs) == 2
    for a, b in pairs:
        assert torch.equal(a.weights().w1.view(torch.uint8), b.weights().w1.view(torch.uint8))
        assert torch.equal(a.weights().w2_scale, b.weights().w2_scale)
    assert [r.expert_weights for r in moecompile.report(at_once).fused] == \
        [r.expert_weights for r in moecompile.report(later).fused]
    with pytest.raises(MoECompileError, match="no fused MoE blocks"):
        moecompile.quantize_experts(hf_zoo.build("mixtral"))
