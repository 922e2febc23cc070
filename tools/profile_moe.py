"""Where the time of one FusedMoE call goes, on the device: host time per launch (eager calls are launch-bound at
decode sizes) and, under Nsight Compute, what each kernel is limited by.

    python tools/profile_moe.py host --out DIR
        Per shape and token count: eager wall time per call (back to back, host-bound when the GPU is idle),
        GPU time (the same call replayed in a CUDA graph), and the host time of each phase of the call.
    python tools/profile_moe.py op --out DIR
        Host time of each layer of the path a compiled graph's op call takes at decode size (op_layers).
    python tools/profile_moe.py paths --out DIR
        The routed experts on the Triton GEMMs against grouped_mm, per layer shape and token count (expert_paths).
    ncu --profile-from-start off --section SpeedOfLight --section Occupancy ... \
        python tools/profile_moe.py ncu --shape mixtral_8x7b --tokens 16384 [--impl hf_grouped_mm_compile]
        One call of the chosen implementation between cudaProfilerStart/Stop, after warm-up, so ncu sees only it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' model builders

import torch
import triton
import triton.language as tl
from moe_layer import SHAPES, hf_block, twin

from moecompile.kernels import launch, op


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, 0.0, mask=offs < n)


def _per_call_us(fn, iters: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def _graph_us(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=100, return_mode="median") * 1e3


class PhaseTimer:
    """Wraps kernels/launch.py's helpers and accumulates the host time spent in each (the GPU runs behind)."""

    PHASES = ("gate", "_dispatch", "_run_experts")

    def __init__(self):
        self.totals = {p: 0.0 for p in self.PHASES}
        self.originals = {p: getattr(launch, p) for p in self.PHASES}

    def __enter__(self):
        for phase, fn in self.originals.items():
            def timed(*a, _fn=fn, _phase=phase, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.totals[_phase] += time.perf_counter() - t0
            setattr(launch, phase, timed)
        return self

    def __exit__(self, *exc):
        for phase, fn in self.originals.items():
            setattr(launch, phase, fn)


def host_profile(cases, out: Path) -> None:
    rows = []
    buf = torch.empty(1024, device="cuda")
    rows.append(dict(case="empty Triton launch", us=_per_call_us(lambda: _empty_kernel[(1,)](buf, 1024, BLOCK=1024))))
    rows.append(dict(case="torch.zeros(256, int32)",
                     us=_per_call_us(lambda: torch.zeros(256, device="cuda", dtype=torch.int32))))
    for name, T in cases:
        cfg = SHAPES[name]
        block, _ = hf_block(cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"])
        fused = twin(block, cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"], cfg.get("relu", False))
        x = torch.randn(1, T, cfg["H"], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            eager = _per_call_us(lambda: fused(x))
            gpu = _graph_us(lambda: fused(x))
            iters = 200
            with PhaseTimer() as timer:
                _per_call_us(lambda: fused(x), iters)
            calls = iters + 20
            phases = {p: s / calls * 1e6 for p, s in timer.totals.items()}
        row = dict(case=f"{name} T={T}", eager_us=eager, graph_us=gpu, **{f"host{p}_us": v for p, v in phases.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
        del block, fused
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_profile.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows[:2]))


@torch.library.custom_op("moecompile_bench::same_schema", mutates_args=())
def _same_schema_op(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    router_bias: torch.Tensor | None, correction_bias: torch.Tensor | None,
    b1: torch.Tensor | None, b2: torch.Tensor | None,
    shared_w1: torch.Tensor | None, shared_w2: torch.Tensor | None,
    shared_b1: torch.Tensor | None, shared_b2: torch.Tensor | None,
    shared_gate: torch.Tensor | None, output_bias: torch.Tensor | None,
    spec_json: str, seq_len: int,
) -> torch.Tensor:
    """moe_forward_y's schema around a clone: what the dispatcher costs."""
    return x.clone()


def op_layers(out: Path) -> None:
    """Host time per decode call (T=1, Qwen3 shape) of each layer of the compiled-graph path, outermost first: the
    op through the dispatcher, its implementation, the graph-replay launch, and the replay's parts; beside them the
    same-schema op around a clone and HF's block under Inductor. Back-to-back calls; a cProfile of the op follows."""
    import cProfile
    import io
    import pstats

    from moecompile.kernels import graphs

    cfg = SHAPES["qwen3_30b_a3b"]
    block, _ = hf_block(cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"])
    fused = twin(block, cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"], False)
    spec, spec_json, weights = fused.spec, fused.spec_json, fused.weights()
    x = torch.randn(1, cfg["H"], device="cuda", dtype=torch.bfloat16)
    args = op.op_args(spec_json, weights, x, 1)
    rows = {}
    with torch.no_grad():
        rows["torch.ops.moecompile.moe_forward_y"] = _per_call_us(lambda: torch.ops.moecompile.moe_forward_y(*args))
        rows["torch.ops.moecompile.moe_forward (3 outputs)"] = _per_call_us(
            lambda: torch.ops.moecompile.moe_forward(*args))
        rows["op._op_impl"] = _per_call_us(lambda: op._op_impl(x, weights, spec_json, 1, 1))
        rows["launch.launch"] = _per_call_us(lambda: launch.launch(spec, spec_json, weights, x, 1, 1))
        entry = next(e for e in reversed(graphs._ENTRIES.values()) if e.graph is not None)

        def replay_parts():
            entry.static_x.copy_(x)
            entry.graph.replay()
            return entry.outputs[0].clone()
        rows["copy in + replay + clone out"] = _per_call_us(replay_parts)
        rows["graph.replay()"] = _per_call_us(entry.graph.replay)
        rows["same-schema custom op (a clone)"] = _per_call_us(lambda: torch.ops.moecompile_bench.same_schema(*args))
        rows["x.clone()"] = _per_call_us(x.clone)
        compiled = torch.compile(block)
        x3 = x.view(1, 1, -1)
        rows["HF block, Inductor (guards included)"] = _per_call_us(lambda: compiled(x3))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(500):
            torch.ops.moecompile.moe_forward_y(*args)
        profiler.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    for name, us in rows.items():
        print(f"{us:8.1f} us  {name}", flush=True)
    print(text.getvalue()[:6000])
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_layers.json").write_text(json.dumps(rows, indent=1))


def expert_paths(out: Path) -> None:
    """Per layer shape and token count: FusedMoE with its routed experts on the Triton GEMMs and on grouped_mm
    (kernels/grouped.py), eager calls, beside HF's block under Inductor (what the issue compares against). Where
    grouped_mm starts to win sets kernels/settings.py's grouped_mm_min_rows. Writes expert_paths.json."""
    from moe_layer import bench, rel_err

    from moecompile.kernels import configs, settings
    from moecompile.reference import reference_forward as reference

    cases = {"mixtral_8x7b": (256, 512, 1024, 2048, 4096), "qwen3_30b_a3b": (1024, 2048, 4096, 8192, 16384)}
    rows = []
    with settings.configured():  # the threshold set per row below, restored after
        for shape, tokens in cases.items():
            cfg = SHAPES[shape]
            block, _ = hf_block(cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"])
            fused = twin(block, cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"], False)
            compiled = torch.compile(block)
            for T in tokens:
                x = torch.randn(1, T, cfg["H"], device="cuda", dtype=torch.bfloat16)
                rows_each = configs.rows_per_expert(T, cfg["k"], cfg["E"])
                row = dict(shape=shape, tokens=T, rows_per_expert=rows_each,
                           expert_macs=rows_each * cfg["H"] * cfg["I"])
                with torch.no_grad():
                    ref, _ = reference(fused.spec, fused.weights(), x[0])
                    for path, threshold in (("triton", None), ("grouped_mm", 0.0)):
                        settings.settings.grouped_mm_min_rows = threshold
                        row[f"{path}_err"] = rel_err(fused(x)[0], ref)
                        row[f"{path}_ms"] = bench(lambda: fused(x), quick=False)
                    compiled(x)
                    row["hf_compiled_ms"] = bench(lambda: compiled(x), quick=False)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del block, fused, compiled
            torch.compiler.reset()
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_paths.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
        date=__import__("datetime").date.today().isoformat(), rows=rows), indent=1))


def ncu_target(shape: str, T: int, impl: str) -> None:
    cfg = SHAPES[shape]
    block, _ = hf_block(cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"])
    x = torch.randn(1, T, cfg["H"], device="cuda", dtype=torch.bfloat16)
    if impl == "moecompile":
        fn = twin(block, cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"], cfg.get("relu", False))
    else:
        fn = torch.compile(block)
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fn(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["host", "op", "paths", "ncu"])
    parser.add_argument("--shape", default="mixtral_8x7b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--impl", default="moecompile", choices=["moecompile", "hf_grouped_mm_compile"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.mode == "host":
        cases = [("qwen3_30b_a3b", 1), ("olmoe", 1), ("qwen3_relu", 1), ("qwen3_relu", 128), ("mixtral_8x7b", 1),
                 ("deepseek_v3", 1)]
        host_profile(cases, Path(args.out))
    elif args.mode == "op":
        op_layers(Path(args.out))
    elif args.mode == "paths":
        expert_paths(Path(args.out))
    else:
        ncu_target(args.shape, args.tokens, args.impl)


if __name__ == "__main__":
    main()
