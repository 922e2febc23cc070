"""MoE layer training benchmark: one layer's forward + backward (bf16, gradients for the input and every weight),
HF transformers' block (experts_implementation="grouped_mm") under torch.compile against moecompile's FusedMoE on
the same tensors, and a floor, side by side in one process.

floor = max(weight bytes read twice (forward, backward) + activations / measured copy bandwidth,
            3 x the forward's FLOPs (forward, input gradient, weight gradient) / measured bf16 matmul rate)
The ceilings are measured at the start of the run (moe_layer.measure_ceilings). `peak_mb` is the peak memory a step
adds over what is allocated before it (weights, input). The ReLU-routed Qwen3 shape (a router bias placing 8 of 128
experts above zero per token on average) has no HF counterpart; its row shows how its time follows its active
pairs (`active_pairs`, beside the top-k shape's T * 8).

Run on the device: `python benchmarks/moe_train.py --out benchmarks/results` (moe_train.json and moe_train.md).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_layer import bench, hf_block, peak_extra_mb, run_benchmark, twin  # noqa: E402

TOKENS = (1024, 4096, 16384)
SHAPES = {
    "mixtral_8x7b": dict(family="mixtral", H=4096, I=14336, E=8, k=2),
    "qwen3_30b_a3b": dict(family="qwen3_moe", H=2048, I=768, E=128, k=8),
    "olmoe": dict(family="olmoe", H=2048, I=1024, E=64, k=8),
    "qwen3_relu": dict(family="qwen3_moe", H=2048, I=768, E=128, k=8, relu=True),
}


def train_floor_ms(fused, x: torch.Tensor, ceilings: dict) -> tuple[float, dict]:
    from moecompile.reference import route
    spec, w = fused.spec, fused.weights()
    T, H, I, E = x.shape[0], spec.hidden_size, spec.experts.intermediate_size, spec.num_experts
    with torch.no_grad():
        routing = route(spec.router, w, x)
    pairs = int(routing.expert_index.numel())
    distinct = int(torch.unique(routing.expert_index).numel())
    weight_bytes = distinct * 3 * H * I * 2 + E * H * 2
    io_bytes = 2 * (2 * T * H * 2) + 2 * weight_bytes  # x, y, dy, dx; the weight gradients written
    flops = 3 * (2 * pairs * 3 * H * I + 2 * T * H * E)
    t_bytes = (2 * weight_bytes + io_bytes) / (ceilings["copy_GBps"] * 1e6)
    t_flops = flops / (ceilings["bf16_TFLOPs"] * 1e9)
    return max(t_bytes, t_flops), dict(active_pairs=pairs, bound="bytes" if t_bytes >= t_flops else "flops")


def step_fn(module, x: torch.Tensor, gy: torch.Tensor, **kernel_settings):
    """One training step; `kernel_settings` (moecompile.kernels.settings) apply inside it."""
    from moecompile.kernels.settings import configured
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        with configured(**kernel_settings):
            y = module(x)
            (y[0] if isinstance(y, tuple) else y).backward(gy)
    return step


def run_shape(name: str, cfg: dict, tokens, ceilings: dict, quick: bool, rows: list) -> None:
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    block, _ = hf_block(cfg["family"], H, I, E, k)
    block.train()
    relu = cfg.get("relu", False)
    fused = twin(block, cfg["family"], H, I, E, k, relu)
    if relu:
        fused.router_bias = torch.nn.Parameter(fused.router_bias.detach())
    compiled = torch.compile(block)
    for T in tokens:
        x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
        floor, info = train_floor_ms(fused, x[0].detach(), ceilings)
        # moecompile as shipped ("auto": the experts' gradients through grouped_mm on Hopper), and with the
        # Triton backward for the routed experts, the path other GPUs and deterministic mode take
        # "recompute": the forward keeps nothing and the backward recomputes the up projection (the memory-saving
        # option); "keep_all": the up projection kept at every size, where the default keeps it from 128 rows an
        # expert (kernels/keep.py)
        impls = {"moecompile": step_fn(fused, x, gy),
                 "moecompile_recompute": step_fn(fused, x, gy, keep_up_projection_min_rows=None),
                 "moecompile_keep_all": step_fn(fused, x, gy, keep_up_projection_min_rows=0.0),
                 "moecompile_triton_backward": step_fn(fused, x, gy, grouped_backward="never")}
        if not relu:
            impls["hf_grouped_mm_compile"] = step_fn(compiled, x, gy)
        input_grads, shape_rows = {}, []
        for impl, fn in impls.items():
            try:
                with warnings.catch_warnings(record=True) as caught:  # a fallback the kernels announce
                    warnings.simplefilter("always")
                    fn()
                input_grads[impl] = x.grad.float().clone()
                ms = bench(fn, quick)
                row = dict(shape=name, tokens=T, impl=impl, ms=ms, peak_mb=peak_extra_mb(fn), floor_ms=floor, **info,
                           warnings=sorted({str(w.message)[:200] for w in caught}))
            except Exception as exc:  # a baseline that fails at a size is recorded, not fatal
                row = dict(shape=name, tokens=T, impl=impl, ms=None, peak_mb=None, floor_ms=floor,
                           error=f"{type(exc).__name__}: {exc}"[:300])
            shape_rows.append(row)
        # the input gradient of each moecompile path against HF's (both bf16: a sanity check, the tests hold the
        # tolerances against float64)
        ref = input_grads.get("hf_grouped_mm_compile", input_grads.get("moecompile_triton_backward"))
        for row in shape_rows:
            if ref is not None and row["impl"] in input_grads:
                row["dx_rel_err_vs_ref"] = float((input_grads[row["impl"]] - ref).norm() / ref.norm().clamp_min(1e-12))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del input_grads
    del block, fused, compiled
    torch.compiler.reset()
    torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    by = {(r["shape"], r["tokens"], r["impl"]): r for r in result["rows"]}
    c = result["ceilings"]
    lines = [f"# MoE layer training benchmark ({result['device']}, torch {result['torch']}, triton "
             f"{result['triton']}, transformers {result['transformers']}, {result['date']})", "",
             f"One layer, bf16, forward + backward (input and every weight), median ms. Ceilings measured in the "
             f"same run: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_TFLOPs']:.0f} TFLOP/s. `x HF` = HF "
             "grouped_mm compiled / moecompile; `% floor` = floor / moecompile. `Triton bwd ms`: moecompile with "
             "the routed experts' gradients on the Triton kernels (settings.grouped_backward='never'), the path "
             "of GPUs other than Hopper and of deterministic mode. `recompute`: the forward keeps nothing and the "
             "backward recomputes the up projection (settings.keep_up_projection_min_rows=None); `keep all`: the "
             "up projection kept at every size (the default keeps it from 128 rows an expert).", "",
             "| shape | tokens | active pairs | HF compiled ms | moecompile ms | x HF | recompute ms | keep all ms "
             "| Triton bwd ms | floor ms | % floor | peak MB HF / ours / recompute |", "|---" * 12 + "|"]

    def f(v, fmt=".2f"):
        return "—" if v is None else format(v, fmt)
    for shape, T in sorted({(r["shape"], r["tokens"]) for r in result["rows"]},
                           key=lambda st: (list(SHAPES).index(st[0]), st[1])):
        ours, hf = by.get((shape, T, "moecompile"), {}), by.get((shape, T, "hf_grouped_mm_compile"), {})
        triton_bwd = by.get((shape, T, "moecompile_triton_backward"), {})
        recompute = by.get((shape, T, "moecompile_recompute"), {})
        keep_all = by.get((shape, T, "moecompile_keep_all"), {})
        speed = hf["ms"] / ours["ms"] if hf.get("ms") and ours.get("ms") else None
        pct = 100 * ours["floor_ms"] / ours["ms"] if ours.get("ms") else None
        lines.append(f"| {shape} | {T} | {ours.get('active_pairs', '—')} | {f(hf.get('ms'))} | {f(ours.get('ms'))} "
                     f"| {f(speed)} | {f(recompute.get('ms'))} | {f(keep_all.get('ms'))} | {f(triton_bwd.get('ms'))} "
                     f"| {f(ours.get('floor_ms'))} | {f(pct, '.0f')} | {f(hf.get('peak_mb'), '.0f')} / "
                     f"{f(ours.get('peak_mb'), '.0f')} / {f(recompute.get('peak_mb'), '.0f')} |")
    return "\n".join(lines) + "\n"


def main():
    run_benchmark(__doc__.split("\n\n")[0], "moe_train", SHAPES, TOKENS, run_shape, markdown)


if __name__ == "__main__":
    main()
