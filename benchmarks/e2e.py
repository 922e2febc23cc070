"""End to end: whole HF MoE models under torch.compile with Inductor against backend="moecompile", side by side.

Issue 5's shapes, bf16, experts_implementation="grouped_mm", real HF classes with random weights (vocabulary 32000):
  qwen3_moe: Qwen3MoeForCausalLM, 4 layers, H 2048, I 768, E 128, k 8, 32 heads / 4 KV heads of 128
  mixtral:   MixtralForCausalLM, 2 layers, H 4096, I 14336, E 8, k 2, 32 heads / 8 KV heads of 128
Phases: prefill (1 x 2048 tokens, no cache) and one decode step at batch 1 and 32 over 2048 past tokens (a
DynamicCache cropped back to 2048 after each step). Per backend and phase: the median time (triton do_bench), the
first call's time (compile included) and the logits' difference from eager. Each phase also gets the model's
roofline floor: max(bytes read / copy bandwidth, FLOPs / bf16 matmul rate), both ceilings measured at the start of
the run (benchmarks/moe_layer.py's measure_ceilings). Bytes: every weight but the embedding table, only the experts
the router picks for these tokens (counted from eager's router logits), and the KV cache; FLOPs: the dense layers, k
experts per token, attention (causal half for prefill) and the LM head.

Run on the device: `python benchmarks/e2e.py` (writes results/e2e.json and results/e2e.md). `--small` runs tiny
shapes, on the CPU too, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import moecompile
from moe_layer import measure_ceilings  # benchmarks/ is the script's directory

RESULTS = Path(__file__).parent / "results"
FULL = {
    "qwen3_moe": dict(layers=4, H=2048, I=768, E=128, k=8, heads=32, kv=4, head_dim=128),
    "mixtral": dict(layers=2, H=4096, I=14336, E=8, k=2, heads=32, kv=8, head_dim=128),
}
SMALL = {name: dict(cfg, H=64, I=48, heads=4, kv=2, head_dim=16, E=min(cfg["E"], 16)) for name, cfg in FULL.items()}


def build(name: str, cfg: dict, dtype: torch.dtype, device: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=cfg["H"], num_hidden_layers=cfg["layers"],
                  num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv"], head_dim=cfg["head_dim"],
                  max_position_embeddings=8192, num_experts_per_tok=cfg["k"])
    if name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=cfg["I"], num_experts=cfg["E"],
                                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.MixtralConfig(**common, intermediate_size=cfg["I"], num_local_experts=cfg["E"])
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(0)
    model = cls._from_config(config, experts_implementation="grouped_mm", dtype=dtype)
    for p in model.parameters():  # O(1) activations through the layers
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device).eval()


def timed(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=reps * 20, return_mode="median")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def phases(model, seq: int, batches: tuple[int, ...], device: str, vocab: int) -> dict:
    """name -> (call, fresh inputs, past tokens); call(model, ids, **kwargs) returns the model's output. Decode calls
    crop their cache back so every step sees `seq` past tokens."""
    gen = torch.Generator().manual_seed(1)
    out = {f"prefill 1x{seq}": (lambda m, ids, **kw: m(input_ids=ids, use_cache=False, **kw),
                                torch.randint(0, vocab, (1, seq), generator=gen).to(device), 0)}
    for b in batches:
        past = torch.randint(0, vocab, (b, seq), generator=gen).to(device)
        with torch.no_grad():
            cache = model(input_ids=past, use_cache=True).past_key_values

        def step(m, ids, cache=cache, **kw):
            output = m(input_ids=ids, past_key_values=cache, use_cache=True, **kw)
            cache.crop(-ids.shape[1])  # back to `seq` past tokens (a negative crop removes tokens)
            return output

        out[f"decode b{b} past {seq}"] = (step, torch.randint(0, vocab, (b, 1), generator=gen).to(device), seq)
    return out


def floor_ms(model, call, ids, past: int, cfg: dict, ceilings: dict | None) -> dict | None:
    """The roofline floor of one phase (see the module docstring), from the experts eager's router picks."""
    if ceilings is None:
        return None
    batch, q = ids.shape
    with torch.no_grad():
        router_logits = call(model, ids, output_router_logits=True).router_logits
    params = dict(model.named_parameters())
    expert_bytes_each = sum(p.numel() for n, p in params.items() if ".experts." in n and "layers.0." in n) * 2 // cfg["E"]
    embed = model.get_input_embeddings().weight.numel()
    dense = sum(p.numel() for n, p in params.items() if ".experts." not in n) - embed
    distinct = sum(int(torch.unique(logits.topk(cfg["k"], dim=-1).indices).numel()) for logits in router_logits)
    kv_bytes = batch * past * cfg["layers"] * 2 * cfg["kv"] * cfg["head_dim"] * 2
    attn_len = past + (q + 1) / 2  # keys each query attends to, on average (causal)
    flops = (2 * batch * q * (dense + cfg["layers"] * cfg["k"] * expert_bytes_each // 2)
             + cfg["layers"] * 4 * batch * q * attn_len * cfg["heads"] * cfg["head_dim"])
    t_bytes = (2 * dense + distinct * expert_bytes_each + kv_bytes) / (ceilings["copy_GBps"] * 1e6)
    t_flops = flops / (ceilings["bf16_TFLOPs"] * 1e9)
    return dict(floor_ms=max(t_bytes, t_flops), bound="bytes" if t_bytes >= t_flops else "flops",
                distinct_experts=distinct)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def run_model(name: str, cfg: dict, args, device: str, dtype: torch.dtype, ceilings: dict | None,
              rows: list) -> None:
    model = build(name, cfg, dtype, device, args.vocab)
    calls = phases(model, args.seq, tuple(args.batches), device, args.vocab)
    with torch.no_grad():
        eager = {phase: call(model, ids).logits for phase, (call, ids, _) in calls.items()}
    floors = {phase: floor_ms(model, call, ids, past, cfg, ceilings) for phase, (call, ids, past) in calls.items()}
    for backend in ("inductor", "moecompile"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend if backend == "inductor" else moecompile.backend())
        for phase, (call, ids, _) in calls.items():
            with torch.no_grad():
                sync(device)
                start = time.perf_counter()
                logits = call(compiled, ids).logits
                sync(device)
                first_s = time.perf_counter() - start
                ms = timed(lambda: call(compiled, ids), device, args.reps)
            row = dict(model=name, phase=phase, backend=backend, ms=ms, first_call_s=first_s,
                       logits_rel_err_vs_eager=rel(logits, eager[phase]), **(floors[phase] or {}))
            if backend == "moecompile":
                rep = moecompile.report(compiled)
                row["blocks_fused"] = f"{len(rep.fused)}/{len(rep.blocks)}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model


def markdown(result: dict) -> str:
    lines = [f"# End to end under torch.compile ({result['device']}, torch {result['torch']}, transformers "
             f"{result['transformers']}, {result['date']})", "",
             "Inductor alone against backend='moecompile' (fused MoE blocks, then Inductor); bf16, grouped_mm. "
             "Command: `python benchmarks/e2e.py`.", ""]
    if result["ceilings"]:
        lines += [f"Ceilings measured in the same run: copy {result['ceilings']['copy_GBps']:.0f} GB/s, bf16 matmul "
                  f"{result['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s. `floor`: the model's roofline floor for the phase "
                  "(see the script's docstring); `% floor` = floor / moecompile ms. First call = compile included "
                  "(decode phases: the recompile for the cached shapes).", ""]
    lines += ["| model | phase | inductor ms | moecompile ms | speedup | floor ms | % floor | first call s (ind / moe) "
              "| fused | rel err vs eager (ind / moe) |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for r in [r for r in rows if r["backend"] == "moecompile"]:
        base = next(b for b in rows if b["backend"] == "inductor" and (b["model"], b["phase"]) ==
                    (r["model"], r["phase"]))
        floor = f"{r['floor_ms']:.3f} | {100 * r['floor_ms'] / r['ms']:.0f}" if r.get("floor_ms") else "- | -"
        lines.append(f"| {r['model']} | {r['phase']} | {base['ms']:.3f} | {r['ms']:.3f} | {base['ms'] / r['ms']:.2f}x "
                     f"| {floor} "
                     f"| {base['first_call_s']:.1f} / {r['first_call_s']:.1f} | {r.get('blocks_fused', '-')} | "
                     f"{base['logits_rel_err_vs_eager']:.1e} / {r['logits_rel_err_vs_eager']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (a check of the script; CPU works)")
    parser.add_argument("--models", nargs="*", default=list(FULL))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.seq, args.batches, args.vocab, args.reps = (32, [1, 4], 256, 3) if args.small else (2048, [1, 32], 32000, 5)
    warnings.filterwarnings("ignore")
    import transformers

    result = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
                  transformers=transformers.__version__, date=datetime.date.today().isoformat(),
                  small=args.small, ceilings=measure_ceilings() if device == "cuda" else None, rows=[])
    print(json.dumps(result), flush=True)
    suffix = "_small" if args.small else ""
    RESULTS.mkdir(exist_ok=True)
    for name in args.models:
        run_model(name, (SMALL if args.small else FULL)[name], args, device, dtype, result["ceilings"],
                  result["rows"])
        # written after each model, so a run cut short keeps what it measured
        (RESULTS / f"e2e{suffix}.json").write_text(json.dumps(result, indent=1))
        (RESULTS / f"e2e{suffix}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
