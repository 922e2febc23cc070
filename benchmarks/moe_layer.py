"""MoE layer benchmark: HF transformers' block (experts_implementation="grouped_mm", eager and torch.compile; and
experts_implementation="moecompile" under torch.compile) against moecompile's FusedMoE (eager and in a CUDA graph),
and the roofline floor, side by side in one process (bf16).

floor = max(bytes of the distinct active experts' weights (+ shared expert + router) / measured copy bandwidth,
            FLOPs of the active (token, expert) pairs / measured bf16 matmul rate)
Both ceilings are measured at the start of the run: a 2 GiB device-to-device copy (bytes read + written) and an
8192^3 bf16 matmul, on random data. Every moecompile row also records its output error against the HF block on the
same input against the reference (reference.py: routing in fp32, experts in bf16), beside the HF block's own
error against it (normwise relative). `peak_mb` is the peak memory one call adds; `held_mb` is what an
implementation keeps allocated between calls (moecompile eager at <= 64 tokens: the pool of its decode graphs). The
HF block scores in bf16, so near-tied experts flip; the reference does not. Top-k shapes also get FP8 rows
(`moecompile_fp8`, `moecompile_fp8_cudagraph`): the same block with its experts in FP8 with 128 x 128 block scales
(moecompile/fp8.py), against its own floor (one byte a weight) and the reference on the same dequantized weights.

Run on the device: `python benchmarks/moe_layer.py --out benchmarks/results` (writes moe_layer.json and moe_layer.md).
`--shapes` / `--tokens` pick a subset; `--quick` times fewer repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
from pathlib import Path

import torch
import triton
import triton.testing

from moecompile import FusedMoE, MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec, fp8

TOKENS = (1, 16, 128, 1024, 4096, 16384)
SHAPES = {
    "mixtral_8x7b": dict(family="mixtral", H=4096, I=14336, E=8, k=2),
    "qwen3_30b_a3b": dict(family="qwen3_moe", H=2048, I=768, E=128, k=8),
    "olmoe": dict(family="olmoe", H=2048, I=1024, E=64, k=8),
    "deepseek_v3": dict(family="deepseek_v3", H=7168, I=2048, E=256, k=8),
    "qwen3_relu": dict(family="qwen3_moe", H=2048, I=768, E=128, k=8, relu=True),
}


# ---------------------------------------------------------------- ceilings


def measure_ceilings() -> dict:
    n = 1 << 30  # 1 Gi bf16 elements = 2 GiB
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return dict(copy_GBps=2 * 2 * n / t_copy / 1e6, bf16_TFLOPs=2 * 8192 ** 3 / t_mm / 1e9)


# ---------------------------------------------------------------- HF blocks and their moecompile twins


def hf_block(family: str, H: int, I: int, E: int, k: int):
    import transformers
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                            num_experts_per_tok=k)
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=k, norm_topk_prob=True)
    elif family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        config = transformers.OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
        config = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                               num_experts_per_tok=k, n_group=8, topk_group=4, n_shared_experts=1)
    config._experts_implementation = "grouped_mm"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            block = Block(config).eval()
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1] if "gate_up" not in name or p.shape[-1] == H else p.shape[-2]
            p.normal_(0, fan_in ** -0.5, generator=gen)
        for name, buf in block.named_buffers():
            if "correction_bias" in name:
                buf.normal_(0, 0.1, generator=gen)
    return block, config


def canonical(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[E, rows, cols] view of an expert weight stored [E, rows, cols] or [E, cols, rows] (no copy)."""
    return t if t.shape[1] == rows else t.transpose(1, 2)


def hf_moecompile_experts(block, config):
    """The same HF block (sharing its weights) with experts_implementation="moecompile": transformers' router, then
    moecompile's dispatch and expert kernels (hf_experts.py)."""
    import copy

    import moecompile
    moecompile.register_transformers()
    config = copy.deepcopy(config)
    config._experts_implementation = "moecompile"
    with torch.device("meta"):
        twin_block = type(block)(config).eval()
    twin_block.load_state_dict(block.state_dict(), assign=True)
    return twin_block


def twin(block, family: str, H: int, I: int, E: int, k: int, relu: bool) -> FusedMoE:
    """A FusedMoE on the HF block's own tensors (no weight copies except the small shared expert's gate/up)."""
    ex = block.experts
    w = MoEWeights(router_weight=block.gate.weight, w1=canonical(ex.gate_up_proj, 2 * I),
                   w2=canonical(ex.down_proj, H))
    shared = None
    if relu:
        router = RouterSpec(num_experts=E, top_k=None, scoring="relu", selection="all_positive", has_bias=True)
    elif family == "deepseek_v3":
        router = RouterSpec(num_experts=E, top_k=k, scoring="sigmoid", selection="grouped_topk", n_group=8,
                            topk_group=4, has_correction_bias=True, renormalize=True, renorm_min=1e-20,
                            scaling_factor=2.5)
        w.correction_bias = block.gate.e_score_correction_bias
        s = block.shared_experts
        w.shared_w1 = torch.cat([s.gate_proj.weight, s.up_proj.weight])
        w.shared_w2 = s.down_proj.weight
        shared = SharedExpertSpec(MLPSpec(hidden_size=H, intermediate_size=s.down_proj.weight.shape[1]))
    else:
        router = RouterSpec(num_experts=E, top_k=k, renormalize=family != "olmoe")
    spec = MoESpec(router=router, experts=MLPSpec(hidden_size=H, intermediate_size=I), shared=shared)
    if relu:  # ReLU gates with a bias placing 8 of 128 experts above zero per token on average
        x = torch.randn(4096, H, device="cuda", dtype=torch.bfloat16)
        logits = (x @ w.router_weight.T).float()
        w.router_bias = -logits.quantile(1 - k / E, dim=0).to(torch.bfloat16)
    return FusedMoE(spec, w, backend="triton")


# ---------------------------------------------------------------- measuring


def bench(fn, quick: bool) -> float:
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def graphed(fn, x_static):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x_static)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x_static)
    torch.cuda.synchronize()
    return graph, out, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def floor_ms(fused: FusedMoE, x: torch.Tensor, ceilings: dict) -> tuple[float, dict]:
    """Roofline floor of one call on x, from the routing moecompile computes on it."""
    from moecompile.reference import route
    spec, w = fused.spec, fused.weights()
    T, H, I, E = x.shape[0], spec.hidden_size, spec.experts.intermediate_size, spec.num_experts
    routing = route(spec.router, w, x)
    active_pairs = int(routing.expert_index.numel())
    distinct = int(torch.unique(routing.expert_index).numel())
    expert_bytes = 3 * H * I * w.w1.element_size()  # FP8 experts: one byte a weight (their scales are 1/16384)
    shared_I = spec.shared.mlp.intermediate_size if spec.shared else 0
    weight_bytes = distinct * expert_bytes + 3 * H * shared_I * 2 + E * H * 2
    io_bytes = 2 * T * H * 2
    flops = 2 * active_pairs * 3 * H * I + 2 * T * 3 * H * shared_I + 2 * T * H * E
    t_bytes = (weight_bytes + io_bytes) / (ceilings["copy_GBps"] * 1e6)
    t_flops = flops / (ceilings["bf16_TFLOPs"] * 1e9)
    return max(t_bytes, t_flops), dict(active_pairs=active_pairs, distinct_experts=distinct,
                                       bound="bytes" if t_bytes >= t_flops else "flops")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def run_shape(name: str, cfg: dict, tokens, ceilings: dict, quick: bool, rows: list) -> None:
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    block, config = hf_block(cfg["family"], H, I, E, k)
    fused = twin(block, cfg["family"], H, I, E, k, cfg.get("relu", False))
    compiled = torch.compile(block)  # the default: static first, then dynamic token counts
    hf_ours = torch.compile(hf_moecompile_experts(block, config))
    fused_fp8 = fp8_twin(fused) if not cfg.get("relu") else None
    for T in tokens:
        x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = block(x)
            want = want[0] if isinstance(want, tuple) else want
            got = fused(x)
            from moecompile.reference import reference_forward as reference
            ref, _ = reference(fused.spec, fused.weights(), x[0])  # routing in fp32, experts in bf16
            floor, info = floor_ms(fused, x[0], ceilings)
            common = dict(shape=name, tokens=T, floor_ms=floor, **info)
            impls = {"hf_grouped_mm": lambda: block(x), "hf_grouped_mm_compile": lambda: compiled(x),
                     "hf_moecompile_experts_compile": lambda: hf_ours(x), "moecompile": lambda: fused(x)}
            for impl, fn in impls.items():
                try:
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    fn()
                    ms = bench(fn, quick)
                    torch.cuda.synchronize()
                    # memory the implementation keeps between calls (moecompile: its decode graphs' pool)
                    held_mb = (torch.cuda.memory_allocated() - before) / 2 ** 20
                    row = dict(common, impl=impl, ms=ms, peak_mb=peak_extra_mb(fn), held_mb=held_mb)
                except Exception as exc:  # a baseline that fails at a size is recorded, not fatal
                    row = dict(common, impl=impl, ms=None, peak_mb=None, error=f"{type(exc).__name__}: {exc}"[:300])
                if impl == "moecompile":
                    row["rel_err_vs_reference"] = rel_err(got[0], ref)
                    row["hf_rel_err_vs_reference"] = None if cfg.get("relu") else rel_err(want[0], ref)
                rows.append(row)
                print(json.dumps(row), flush=True)
            graph, _, graph_mb = graphed(fused, x)
            ms = bench(graph.replay, quick)
            rows.append(dict(common, impl="moecompile_cudagraph", ms=ms, peak_mb=graph_mb))
            print(json.dumps(rows[-1]), flush=True)
            del graph
            if fused_fp8 is not None:
                rows.extend(fp8_rows(fused_fp8, x, name, T, ceilings, quick))
    del block, fused, compiled, hf_ours, fused_fp8
    torch.compiler.reset()
    torch.cuda.empty_cache()


def fp8_twin(fused: FusedMoE) -> FusedMoE:
    """The same block with its routed experts' weights in FP8 with 128 x 128 block scales (moecompile/fp8.py), as
    DeepSeek-V3's and Qwen3's FP8 checkpoints ship them."""
    w = fused.weights()
    (q1, s1), (q2, s2) = fp8.quantize(w.w1.detach()), fp8.quantize(w.w2.detach())
    weights = MoEWeights(**{n: None if t is None else t.detach() for n, t in w.items()})
    return FusedMoE(fused.spec, dataclasses.replace(weights, w1=q1, w2=q2, w1_scale=s1, w2_scale=s2))


def fp8_rows(fused_fp8: FusedMoE, x: torch.Tensor, name: str, T: int, ceilings: dict, quick: bool) -> list[dict]:
    """moecompile with FP8 experts, eager and in a CUDA graph, against its own floor (one byte a weight), and its
    error against the reference on the same (dequantized) weights."""
    from moecompile.reference import reference_forward as reference
    with torch.no_grad():
        floor, info = floor_ms(fused_fp8, x[0], ceilings)
        ref, _ = reference(fused_fp8.spec, fused_fp8.weights(), x[0])
        got = fused_fp8(x)
        common = dict(shape=name, tokens=T, floor_ms=floor, **info)
        rows = [dict(common, impl="moecompile_fp8", ms=bench(lambda: fused_fp8(x), quick),
                     peak_mb=peak_extra_mb(lambda: fused_fp8(x)), rel_err_vs_reference=rel_err(got[0], ref))]
        graph, _, graph_mb = graphed(fused_fp8, x)
        rows.append(dict(common, impl="moecompile_fp8_cudagraph", ms=bench(graph.replay, quick), peak_mb=graph_mb))
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def geomean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def markdown(result: dict) -> str:
    rows = result["rows"]
    by = {(r["shape"], r["tokens"], r["impl"]): r for r in rows}
    lines = [f"# MoE layer benchmark ({result['device']}, torch {result['torch']}, triton {result['triton']}, "
             f"transformers {result['transformers']}, {result['date']})", "",
             f"Ceilings measured in the same run: copy {result['ceilings']['copy_GBps']:.0f} GB/s, bf16 matmul "
             f"{result['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s. Times are medians in ms; `floor` is the roofline "
             "floor; `% floor` = floor / moecompile eager; `x compile` = HF grouped_mm compiled / moecompile eager.",
             "`HF + our experts` is the HF block with experts_implementation=\"moecompile\" (transformers' router, "
             "moecompile's expert kernels) under torch.compile.",
             "", "| shape | tokens | HF grouped_mm | HF compiled | HF + our experts | moecompile | moecompile graph "
             "| floor | % floor | x compile | peak MB HF / HF compiled / ours | err ours / HF |", "|---" * 12 + "|"]
    speedups = []
    seen = sorted({(r["shape"], r["tokens"]) for r in rows}, key=lambda st: (list(SHAPES).index(st[0]), st[1]))

    def f(v, fmt=".3f"):
        return "—" if v is None else format(v, fmt)
    for shape, T in seen:
        g = lambda impl: by.get((shape, T, impl), {})  # noqa: E731
        ours, comp = g("moecompile").get("ms"), g("hf_grouped_mm_compile").get("ms")
        sp = comp / ours if ours and comp else None
        if sp:
            speedups.append(sp)
        floor = g("moecompile").get("floor_ms")
        lines.append(
            f"| {shape} | {T} | {f(g('hf_grouped_mm').get('ms'))} | {f(comp)} | "
            f"{f(g('hf_moecompile_experts_compile').get('ms'))} | {f(ours)} | "
            f"{f(g('moecompile_cudagraph').get('ms'))} | {f(floor)} | {f(100 * floor / ours if ours else None, '.0f')} "
            f"| {f(sp, '.2f')} | {f(g('hf_grouped_mm').get('peak_mb'), '.0f')} / "
            f"{f(g('hf_grouped_mm_compile').get('peak_mb'), '.0f')} / {f(g('moecompile').get('peak_mb'), '.0f')} | "
            f"{f(g('moecompile').get('rel_err_vs_reference'), '.1e')} / "
            f"{f(g('moecompile').get('hf_rel_err_vs_reference'), '.1e')} |")
    lines += ["", f"Geometric-mean speedup of moecompile eager over HF grouped_mm under torch.compile: "
                  f"{geomean(speedups):.2f}x over {len(speedups)} rows."]
    fp8_seen = [st for st in seen if by.get((*st, "moecompile_fp8"))]
    if fp8_seen:
        lines += ["", "FP8 experts (float8_e4m3fn, 128 x 128 block scales; weight-only: activations in bf16), beside "
                  "the bf16 weights, both in a CUDA graph; the FP8 floor counts one byte a weight.", "",
                  "| shape | tokens | bf16 graph ms | FP8 graph ms | FP8 eager ms | FP8 floor | FP8 % floor "
                  "| FP8 err vs reference |", "|---" * 8 + "|"]
        for shape, T in fp8_seen:
            g = lambda impl: by.get((shape, T, impl), {})  # noqa: E731
            q, qg = g("moecompile_fp8"), g("moecompile_fp8_cudagraph").get("ms")
            lines.append(f"| {shape} | {T} | {f(g('moecompile_cudagraph').get('ms'))} | {f(qg)} | {f(q.get('ms'))} "
                         f"| {f(q.get('floor_ms'))} | {f(100 * q['floor_ms'] / qg if qg else None, '.0f')} "
                         f"| {f(q.get('rel_err_vs_reference'), '.1e')} |")
    return "\n".join(lines) + "\n"


def run_benchmark(description: str, name: str, shapes: dict, tokens, run_shape, markdown) -> None:
    """The command line both layer benchmarks share: measure the ceilings, run each chosen shape with
    run_shape(name, cfg, tokens, ceilings, quick, rows), and write <name>.json and <name>.md after each shape."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", nargs="*", default=list(shapes))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(tokens))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import transformers
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                  transformers=transformers.__version__, date=datetime.date.today().isoformat(),
                  ceilings=measure_ceilings(), rows=[])
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        run_shape(shape, shapes[shape], args.tokens, result["ceilings"], args.quick, result["rows"])
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


def main():
    run_benchmark(__doc__.split("\n\n")[0], "moe_layer", SHAPES, TOKENS, run_shape, markdown)


if __name__ == "__main__":
    main()
