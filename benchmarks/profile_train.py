"""Where a training step's time goes: moe_train.py's one-layer step (moecompile and HF grouped_mm compiled) split
into forward and backward, host time per step against device time, and the kernels that take the device time
(torch.profiler). A diagnostic beside the benchmark, not a benchmark: run it when a moe_train.py row needs
explaining.

Run on the device: `python benchmarks/profile_train.py --shape qwen3_30b_a3b --tokens 1024 4096`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from moe_layer import hf_block, twin  # noqa: E402
from moe_train import SHAPES, step_fn  # noqa: E402


def host_ms(fn, n: int = 20) -> float:
    """Host time of one call when the device never makes it wait: the CPU time a step costs."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e3
    torch.cuda.synchronize()
    return host


def split_ms(module, x, gy, settings: dict) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            module(x)
    total = triton.testing.do_bench(step_fn(module, x, gy, **settings), warmup=10, rep=50, return_mode="median")
    fwd = triton.testing.do_bench(forward, warmup=10, rep=50, return_mode="median")
    return fwd, total


def kernel_table(fn, rows: int) -> str:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # what makes the host wait for the device: each is a step's device queue drained before the host goes on
    syncs = {e.key: e.count // 5 for e in averages
             if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                          "aten::nonzero", "cudaMemcpyAsync")}
    return (averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)
            + f"\nper step, calls that can wait for the device: {syncs}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3_30b_a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=[1024, 4096])
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    cfg = SHAPES[args.shape]
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    block, _ = hf_block(cfg["family"], H, I, E, k)
    block.train()
    fused = twin(block, cfg["family"], H, I, E, k, cfg.get("relu", False))
    compiled = torch.compile(block)
    for T in args.tokens:
        x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
        for name, module, settings in (("moecompile", fused, {}),
                                       ("moecompile_triton_backward", fused, dict(grouped_backward="never")),
                                       ("hf_grouped_mm_compile", compiled, {})):
            step = step_fn(module, x, gy, **settings)
            step()
            fwd, total = split_ms(module, x, gy, settings)
            print(f"\n## {args.shape} T={T} {name}: step {total:.3f} ms (forward {fwd:.3f}, backward "
                  f"{total - fwd:.3f}); host {host_ms(step):.3f} ms per step", flush=True)
            if name != "moecompile_triton_backward":
                print(kernel_table(step, args.rows), flush=True)


if __name__ == "__main__":
    main()
