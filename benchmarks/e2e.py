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

What the MoE blocks can win at most (Amdahl): the same model with every MoE block replaced by a zero (its residual
add kept) is compiled by Inductor and timed too: `rest` is the time of everything but the MoE blocks. With MoE
blocks at their own roofline floor (`moe floor`: the picked experts' and routers' bytes over the copy bandwidth, or
their FLOPs over the matmul rate, whichever is larger), a phase cannot take less than rest + moe floor, so no MoE
rewrite can beat inductor / (rest + moe floor): the `bound` column.

First call: compile included; `passes` is the part spent in the backend's own passes (find, describe, confirm and
rewrite the blocks). The rest is dynamo and Inductor, which (static shapes, inference) compiles moecompile's Triton
kernels too, in its parallel compile workers, since the graph holds their launches. Both backends run in this one
process, so the second reuses kernels the first compiled, and a machine that ran earlier calls has warm caches:
`--cold-compile` also times each backend's first calls in a process of its own with empty Inductor and Triton caches
(tools/profile_compile.py), which is what a first compile on a fresh machine costs.

Run on the device, one model a call (each fits the device's 10-minute limit): `python benchmarks/e2e.py --models
qwen3_moe --cold-compile`, then `--models mixtral --cold-compile`. Each run replaces its model's rows in
results/e2e.json and rewrites
results/e2e.md from all rows. `--small` runs tiny shapes, on the CPU too, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from moe_layer import measure_ceilings  # benchmarks/ is the script's directory

import moecompile

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
    with torch.device(device):  # built and initialised where it runs: on the host, 5 GB of normal_ takes minutes
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


def picked_experts(model, call, ids, cfg: dict) -> tuple[int, int]:
    """(distinct experts eager's routers pick for these tokens, summed over layers; parameters of one expert)."""
    with torch.no_grad():
        router_logits = call(model, ids, output_router_logits=True).router_logits
    distinct = sum(int(torch.unique(logits.topk(cfg["k"], dim=-1).indices).numel()) for logits in router_logits)
    per_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "layers.0." in n)
    return distinct, per_expert // cfg["E"]


def floor_ms(model, call, ids, past: int, cfg: dict, ceilings: dict | None) -> dict | None:
    """The roofline floor of one phase (see the module docstring), from the experts eager's router picks."""
    if ceilings is None:
        return None
    batch, q = ids.shape
    distinct, expert_params_each = picked_experts(model, call, ids, cfg)
    expert_bytes_each = 2 * expert_params_each
    params = dict(model.named_parameters())
    embed = model.get_input_embeddings().weight.numel()
    dense = sum(p.numel() for n, p in params.items() if ".experts." not in n) - embed
    kv_bytes = batch * past * cfg["layers"] * 2 * cfg["kv"] * cfg["head_dim"] * 2
    attn_len = past + (q + 1) / 2  # keys each query attends to, on average (causal)
    flops = (2 * batch * q * (dense + cfg["layers"] * cfg["k"] * expert_bytes_each // 2)
             + cfg["layers"] * 4 * batch * q * attn_len * cfg["heads"] * cfg["head_dim"])
    t_bytes = (2 * dense + distinct * expert_bytes_each + kv_bytes) / (ceilings["copy_GBps"] * 1e6)
    t_flops = flops / (ceilings["bf16_TFLOPs"] * 1e9)
    return dict(floor_ms=max(t_bytes, t_flops), bound="bytes" if t_bytes >= t_flops else "flops",
                distinct_experts=distinct)


def moe_floor_ms(model, call, ids, cfg: dict, ceilings: dict | None) -> float | None:
    """The MoE blocks' own roofline floor for one phase: the picked experts' and the routers' weights read once,
    or their FLOPs (k experts per token, the router GEMM), whichever takes longer."""
    if ceilings is None:
        return None
    batch, q = ids.shape
    distinct, expert_params_each = picked_experts(model, call, ids, cfg)
    router_params = cfg["E"] * cfg["H"]
    t_bytes = 2 * (distinct * expert_params_each + cfg["layers"] * router_params) / (ceilings["copy_GBps"] * 1e6)
    flops = 2 * batch * q * cfg["layers"] * (cfg["k"] * expert_params_each + router_params)
    return max(t_bytes, flops / (ceilings["bf16_TFLOPs"] * 1e9))


class ZeroMoE(torch.nn.Module):
    """Stands in for an MoE block when timing the rest of the model: zeros of the input's shape."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def rest_of_model_ms(model, calls: dict, device: str, reps: int) -> dict:
    """Per phase: the model under Inductor with every MoE block replaced by ZeroMoE (restored afterwards)."""
    layers = model.model.layers
    blocks = [layer.mlp for layer in layers]
    out = {}
    try:
        for layer in layers:
            layer.mlp = ZeroMoE()
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for phase, (call, ids, _) in calls.items():
            with torch.no_grad():
                call(compiled, ids)
                out[phase] = timed(lambda: call(compiled, ids), device, reps)
    finally:
        for layer, block in zip(layers, blocks):
            layer.mlp = block
        torch._dynamo.reset()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def run_model(name: str, cfg: dict, args, device: str, dtype: torch.dtype, ceilings: dict | None,
              rows: list) -> None:
    model = build(name, cfg, dtype, device, args.vocab)
    calls = phases(model, args.seq, tuple(args.batches), device, args.vocab)
    with torch.no_grad():
        eager = {phase: call(model, ids).logits for phase, (call, ids, _) in calls.items()}
    floors = {phase: floor_ms(model, call, ids, past, cfg, ceilings) for phase, (call, ids, past) in calls.items()}
    moe_floors = {phase: moe_floor_ms(model, call, ids, cfg, ceilings) for phase, (call, ids, _) in calls.items()}
    for backend in ("inductor", "moecompile"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend if backend == "inductor" else moecompile.backend())
        for phase, (call, ids, _) in calls.items():
            passes_before = passes_seconds(compiled) if backend == "moecompile" else 0.0
            with torch.no_grad():
                sync(device)
                start = time.perf_counter()
                logits = call(compiled, ids).logits
                sync(device)
                first_s = time.perf_counter() - start
                ms = timed(lambda: call(compiled, ids), device, args.reps)
            row = dict(model=name, phase=phase, backend=backend, ms=ms, first_call_s=first_s,
                       logits_rel_err_vs_eager=rel(logits, eager[phase]), **(floors[phase] or {}),
                       moe_floor_ms=moe_floors[phase])
            if backend == "moecompile":
                rep = moecompile.report(compiled)
                row["blocks_fused"] = f"{len(rep.fused)}/{len(rep.blocks)}"
                row["first_call_passes_s"] = passes_seconds(compiled) - passes_before
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_rest:
        for phase, ms in rest_of_model_ms(model, calls, device, args.reps).items():
            for row in rows:
                if row["phase"] == phase:
                    row["rest_ms"] = ms
            print(json.dumps(dict(model=name, phase=phase, rest_ms=ms)), flush=True)
    del model
    if args.cold_compile:
        cold = cold_first_calls(name)
        for row in rows:
            if "backend" in row:
                row["cold_first_call_s"] = cold.get((row["backend"], row["phase"]))


def cold_first_calls(name: str) -> dict:
    """(backend, phase) -> first call s, each backend in a process of its own with empty caches
    (tools/profile_compile.py), so the second backend does not reuse the first one's compiled kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = {}
    for backend in ("inductor", "moecompile"):
        script = Path(__file__).resolve().parents[1] / "tools" / "profile_compile.py"
        proc = subprocess.run([sys.executable, str(script), "--backend", backend, "--model", name],
                              capture_output=True, text=True, check=True, env=env)
        for line in proc.stdout.splitlines():
            row = json.loads(line) if line.startswith("{") else {}
            if "first_call_s" in row:
                out[(row["backend"], row["phase"])] = row["first_call_s"]
    print(json.dumps(dict(model=name, cold_first_call_s={f"{b} {p}": s for (b, p), s in out.items()})), flush=True)
    return out


def passes_seconds(compiled) -> float:
    try:
        rep = moecompile.report(compiled)
    except moecompile.MoECompileError:  # nothing compiled yet
        return 0.0
    return sum(p.seconds for p in rep.passes)


def markdown(result: dict) -> str:
    lines = ["# End to end under torch.compile", "",
             "Inductor alone against backend='moecompile' (fused MoE blocks, then Inductor); bf16, grouped_mm. "
             "Commands: `python benchmarks/e2e.py --models qwen3_moe --cold-compile`, `python benchmarks/e2e.py "
             "--models "
             "mixtral --cold-compile` (one device call each).", ""]
    for name, run in result["runs"].items():
        ceil = run.get("ceilings") or {}
        lines.append(f"- {name}: {run['device']}, torch {run['torch']}, triton {run.get('triton', '?')}, "
                     f"transformers {run['transformers']}, {run['date']}" + (
                         f"; ceilings measured in the same run: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul "
                         f"{ceil['bf16_TFLOPs']:.0f} TFLOP/s" if ceil else ""))
    lines += ["", "`floor`: the whole model's roofline floor for the phase; `% floor` = floor / moecompile ms. `rest`: "
              "the model with its MoE blocks replaced by zeros, under Inductor; `bound` = inductor / (rest + the MoE "
              "blocks' own floor), the most any MoE rewrite can gain (see the script's docstring). First call: "
              "compile included (decode phases: the recompile for the cached shapes), both backends in one process, "
              "moecompile second (it reuses the Triton kernels Inductor compiled for the rest of the model); `cold`: "
              "the same first calls with each backend in a process of its own with empty Inductor and Triton caches "
              "(what a first compile on a fresh machine costs; `--cold-compile`); `passes`: the part of moecompile's "
              "first call spent in its own passes.", "",
              "| model | phase | inductor ms | moecompile ms | speedup | floor ms | % floor | rest ms | bound | "
              "first call s (ind / moe) | cold first call s (ind / moe) | passes s | fused | rel err vs eager "
              "(ind / moe) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for r in [r for r in rows if r["backend"] == "moecompile"]:
        base = next(b for b in rows if b["backend"] == "inductor" and (b["model"], b["phase"]) ==
                    (r["model"], r["phase"]))
        floor = f"{r['floor_ms']:.3f} | {100 * r['floor_ms'] / r['ms']:.0f}" if r.get("floor_ms") else "- | -"
        if r.get("rest_ms") is not None and r.get("moe_floor_ms") is not None:
            rest = f"{r['rest_ms']:.3f} | {base['ms'] / (r['rest_ms'] + r['moe_floor_ms']):.2f}x"
        else:
            rest = f"{r['rest_ms']:.3f} | -" if r.get("rest_ms") is not None else "- | -"
        compile_split = f"{r.get('first_call_passes_s', float('nan')):.1f}"
        cold = (f"{base['cold_first_call_s']:.1f} / {r['cold_first_call_s']:.1f} "
                f"({r['cold_first_call_s'] / base['cold_first_call_s']:.2f}x)"
                if r.get("cold_first_call_s") and base.get("cold_first_call_s") else "-")
        lines.append(f"| {r['model']} | {r['phase']} | {base['ms']:.3f} | {r['ms']:.3f} | {base['ms'] / r['ms']:.2f}x "
                     f"| {floor} | {rest} "
                     f"| {base['first_call_s']:.1f} / {r['first_call_s']:.1f} | {cold} | {compile_split} "
                     f"| {r.get('blocks_fused', '-')} | "
                     f"{base['logits_rel_err_vs_eager']:.1e} / {r['logits_rel_err_vs_eager']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (a check of the script; CPU works)")
    parser.add_argument("--models", nargs="*", default=list(FULL))
    parser.add_argument("--no-rest", action="store_true", help="skip timing the model without its MoE blocks")
    parser.add_argument("--cold-compile", action="store_true",
                        help="also time each backend's first calls in a process of its own with empty caches")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.seq, args.batches, args.vocab, args.reps = (32, [1, 4], 256, 3) if args.small else (2048, [1, 32], 32000, 5)
    warnings.filterwarnings("ignore")
    import transformers
    import triton

    run = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__,
               date=datetime.date.today().isoformat(), small=args.small,
               ceilings=measure_ceilings() if device == "cuda" else None)
    print(json.dumps(run), flush=True)
    suffix = "_small" if args.small else ""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"e2e{suffix}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if "runs" not in result:  # a file from before runs were kept per model
        result = dict(runs={}, rows=[])
    for name in args.models:
        rows: list = []
        run_model(name, (SMALL if args.small else FULL)[name], args, device, dtype, run["ceilings"], rows)
        # written after each model, so a run cut short keeps what it measured
        result["rows"] = [r for r in result["rows"] if r["model"] != name] + rows
        result["runs"][name] = run
        path.write_text(json.dumps(result, indent=1))
        (RESULTS / f"e2e{suffix}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
