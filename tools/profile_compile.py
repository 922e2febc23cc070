"""Where compile time goes: the first calls of an e2e.py model (Qwen3-MoE-shaped by default) under one backend, in a
process of its own with empty Inductor and Triton caches, so neither backend reuses what the other compiled (in
e2e.py's timing loop both run in one process, the second on the first one's caches). e2e.py --cold-compile runs this
once per backend for its `cold first call` column.

Run on the device, one process a backend:
  python tools/profile_compile.py --backend inductor
  python tools/profile_compile.py --backend moecompile --profile "decode b1 past 2048"
Prints one JSON line per phase (first call s; the s spent in Inductor's Triton mutation analysis, which compiles
each traced kernel launch to TTIR; Triton compiles in this process, which for moecompile are the confirm pass's kernel
runs; moecompile's passes), and with --profile the top functions of that phase's first call
by cumulative time (cProfile; main thread only, so Inductor's compile workers show as waits).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

# before torch is imported: the caches of this process only
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_"))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' model builders

import torch  # noqa: E402
from e2e import FULL, build, passes_seconds, phases  # noqa: E402

import moecompile  # noqa: E402


def count_calls(*owners, name: str) -> dict:
    """Replace the function `name` of each owner (modules holding the same function) by one that counts its calls
    and their seconds; returns those counts, updated as it runs."""
    stats = {"calls": 0, "s": 0.0}
    original = getattr(owners[0], name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stats["calls"] += 1
            stats["s"] += time.perf_counter() - start

    for owner in owners:
        setattr(owner, name, timed)
    return stats


def count_ttir() -> dict:
    """The TTIR builds of torch's mutation analysis, one (or, with kernels/traced.py's memo, one per kernel
    specialisation) for each traced Triton launch."""
    from torch._higher_order_ops import triton_kernel_wrap

    return count_calls(triton_kernel_wrap, name="generate_ttir")


def count_triton_compiles() -> dict:
    """Triton compiles in this process (the confirm pass's kernel runs; Inductor compiles in its workers). Jit
    functions import `compile` from triton.compiler when they first launch."""
    import triton.compiler
    import triton.compiler.compiler

    return count_calls(triton.compiler.compiler, triton.compiler, name="compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["inductor", "moecompile"], required=True)
    parser.add_argument("--profile", default="", help="cProfile the first call of the phase with this name")
    parser.add_argument("--model", choices=list(FULL), default="qwen3_moe")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    model = build(args.model, FULL[args.model], torch.bfloat16, "cuda", 32000)
    calls = phases(model, 2048, (1, 32), "cuda", 32000)
    print(json.dumps(dict(model=args.model, backend=args.backend, setup_s=round(time.perf_counter() - start, 1))),
          flush=True)
    ttir, compiles = count_ttir(), count_triton_compiles()
    compiled = torch.compile(model, backend="inductor" if args.backend == "inductor" else moecompile.backend())
    for phase, (call, ids, _) in calls.items():
        before, compiles_before, passes_before = dict(ttir), dict(compiles), passes_seconds(compiled)
        profiler = cProfile.Profile() if args.profile and args.profile == phase else None
        with torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            call(compiled, ids)
            torch.cuda.synchronize()
            if profiler:
                profiler.disable()
            first_s = time.perf_counter() - start
        print(json.dumps(dict(model=args.model, backend=args.backend, phase=phase, first_call_s=round(first_s, 2),
                              ttir_calls=ttir["calls"] - before["calls"],
                              ttir_s=round(ttir["s"] - before["s"], 2),
                              triton_compiles=compiles["calls"] - compiles_before["calls"],
                              triton_compile_s=round(compiles["s"] - compiles_before["s"], 2),
                              passes_s=round(passes_seconds(compiled) - passes_before, 2))), flush=True)
        if profiler:
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(20)
            stats.sort_stats("cumulative").print_stats("moecompile", 40)  # the backend's own passes


if __name__ == "__main__":
    main()
