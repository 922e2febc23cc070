"""Memory optimize adds, at full size: a Qwen3-30B-A3B-shaped model (48 layers, 128 experts, bf16, random weights) on
the GPU, optimized with the garbage collector disabled, so that anything kept alive only by a reference cycle counts.

Measured (torch.cuda.memory_allocated, relative to the model alone): the peak while optimize runs, what is left right
after it returns (gc still off), and after a gc.collect(). The bars: the peak under one layer's expert weights
(128 x 3 x 2048 x 768 bf16 = 1.21 GB), and what is left under 1% of the model. Also the time optimize takes and
that the optimized model's logits match the original's on one batch (bf16: normwise relative <= 2e-2).

Run on the device: `python benchmarks/memory_optimize.py --out benchmarks/results` (about 5 minutes on an H100);
`--layers N` for a shorter model. Writes memory_optimize.json and memory_optimize.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

GB = 1e9


def qwen3_30b_a3b(layers: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                            num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True,
                            max_position_embeddings=4096)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    return model.eval(), config


def measure(layers: int) -> dict:
    import moecompile

    model, config = qwen3_30b_a3b(layers)
    experts_bytes = 3 * config.num_experts * config.hidden_size * config.moe_intermediate_size * 2
    ids = torch.randint(0, config.vocab_size, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    gc.disable()
    try:
        start = time.perf_counter()
        optimized = moecompile.optimize(model)
        seconds = time.perf_counter() - start
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        after = torch.cuda.memory_allocated() - base
    finally:
        gc.enable()
    gc.collect()
    after_gc = torch.cuda.memory_allocated() - base
    rep = moecompile.report(optimized)
    with torch.no_grad():
        got = optimized(input_ids=ids).logits.float()
    err = ((got - want).norm() / want.norm()).item()
    return {"layers": layers, "model_gb": round(base / GB, 2), "one_layer_experts_gb": round(experts_bytes / GB, 3),
            "optimize_s": round(seconds, 1), "fused": len(rep.fused), "blocks": len(rep.blocks),
            "peak_extra_gb": round(peak / GB, 3), "left_after_gb": round(after / GB, 3),
            "left_after_gc_gb": round(after_gc / GB, 3), "logits_rel_err": err,
            "peak_under_one_layer": peak < experts_bytes, "left_under_1pct": after < 0.01 * base,
            "logits_ok": err <= 2e-2}


def write_results(result: dict, out: Path) -> None:
    """memory_optimize.json and .md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_optimize.json").write_text(json.dumps(result, indent=1) + "\n")
    r = result
    (out / "memory_optimize.md").write_text(
        f"# GPU memory optimize adds ({r['device']}, {r['date']})\n\n"
        f"torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}; `{r['command']}`; garbage "
        "collector disabled while optimize runs.\n\n"
        "| model | layers | model GB | optimize s | fused | peak extra GB (bar: one layer's experts) | left after "
        "GB (bar: 1%) | left after gc.collect GB | logits rel err |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| Qwen3-30B-A3B shape, bf16 | {r['layers']} | {r['model_gb']} | {r['optimize_s']} | "
        f"{r['fused']}/{r['blocks']} | {r['peak_extra_gb']} ({r['one_layer_experts_gb']}) | {r['left_after_gb']} "
        f"({0.01 * r['model_gb']:.2f}) | {r['left_after_gc_gb']} | {r['logits_rel_err']:.1e} |\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    import transformers
    import triton

    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
              "command": " ".join(["python benchmarks/memory_optimize.py", *(argv or sys.argv[1:])]),
              **measure(args.layers)}
    write_results(result, Path(args.out))
    print(json.dumps(result, indent=1))
    return 0 if r["peak_under_one_layer"] and r["left_under_1pct"] and r["logits_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
