"""Where a compiled whole-model call spends its time: torch.profiler over prefill and one decode step of the
Qwen3-MoE-shaped model from benchmarks/e2e.py (2 layers), Inductor alone and backend="moecompile".
Run on the device: `python tools/profile_compiled.py [--phase decode] [--no-profile]` (prints the time per
call and the top ops by GPU and by host time)."""
import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' model builders

import torch
import triton.testing
from e2e import FULL, build, phases
from torch.profiler import ProfilerActivity, profile

import moecompile

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default="", help="only phases whose name contains this")
    parser.add_argument("--no-profile", action="store_true", help="times only")
    args = parser.parse_args()
    cfg = dict(FULL["qwen3_moe"], layers=2)
    model = build("qwen3_moe", cfg, torch.bfloat16, "cuda", 32000)
    calls = phases(model, 2048, (1,), "cuda", 32000)
    for backend in ("inductor", "moecompile"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend if backend == "inductor" else moecompile.backend())
        for phase, (call, ids, _) in calls.items():
            if args.phase not in phase:
                continue
            with torch.no_grad():
                call(compiled, ids)
                ms = triton.testing.do_bench(lambda: call(compiled, ids), warmup=5, rep=100, return_mode="median")
                print(f"=== {backend} {phase}: {ms:.3f} ms per call", flush=True)
                if args.no_profile:
                    continue
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        call(compiled, ids)
                    torch.cuda.synchronize()
            print("profile of 5 calls:")
            table = prof.key_averages()
            print(table.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
            print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
