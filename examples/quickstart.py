"""Quickstart: build a small Mixtral-style and a small Qwen3-MoE-style model from their HF configs (random weights,
no download), optimize them with moecompile, print the pass log, and show the outputs still match; then export the
Qwen3-MoE-style model to ONNX and check the file with onnxruntime against PyTorch at two sequence lengths."""
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import moecompile

warnings.filterwarnings("ignore")
torch.manual_seed(0)
small = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
models = {
    "Mixtral-style (E=8, k=2)": MixtralForCausalLM._from_config(
        MixtralConfig(**small, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
        experts_implementation="grouped_mm"),
    "Qwen3-MoE-style (E=16, k=4)": Qwen3MoeForCausalLM._from_config(
        Qwen3MoeConfig(**small, head_dim=32, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                       norm_topk_prob=True), experts_implementation="grouped_mm"),
}
input_ids = torch.randint(0, 512, (3, 7))
for name, model in models.items():
    model.eval()
    optimized = moecompile.optimize(model, strict=True)
    print(f"\n== {name}")
    print(moecompile.report(optimized).table())
    with torch.no_grad():
        want = model(input_ids, use_cache=False).logits
        got = optimized(input_ids, use_cache=False).logits
    err = (got - want).abs().max().item()
    print(f"logits max abs error vs the original: {err:.2e} (max |logit| {want.abs().max().item():.2f})")
    assert err <= 1e-4 * want.abs().max().item(), "outputs differ"
print("\nall outputs match")

onnx_path = Path(tempfile.mkdtemp()) / "qwen3_moe_style.onnx"
moecompile.export_onnx(model, onnx_path, {"input_ids": input_ids}, verify=True)  # raises on a mismatch
print(f"\n== ONNX export: {onnx_path}")
print(moecompile.export_report(onnx_path).table())
