"""Host time of a fused block's training step, with the Triton kernels stubbed out: what the Python, the dispatcher
and the aten calls around the kernels cost the CPU per call, which on a GPU is paid again for every layer of every
step (and is exposed whenever the GPU's share is shorter). A diagnostic for the CPU machine, beside
benchmarks/profile_train.py's host column on the GPU; the times are not the GPU's.

Run: `TRITON_INTERPRET=1 python benchmarks/host_time.py` (prints one JSON line per path: the forward alone and a
forward + backward step, the minimum over rounds of calls, and the Triton launches a step makes). The kernels are
replaced by a stub that zeroes their integer arguments (so that index buffers stay in range); no output is
checked. Tiny shapes (H 64, E 16, k 4, 64 tokens, bf16) keep the aten calls' own work negligible.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1: the kernels are stubbed in Triton's interpreter")

from triton.runtime import interpreter  # noqa: E402

LAUNCHES = {"n": 0}


def _stub_run(self, *args, **kwargs):
    LAUNCHES["n"] += 1
    for t in args:
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            t.zero_()


def best_ms(fn, rounds: int = 15, calls: int = 20) -> tuple[float, float]:
    """(minimum ms per call over `rounds` rounds of `calls` calls, Triton launches per call)."""
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        LAUNCHES["n"] = 0
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best, LAUNCHES["n"] / calls


def main() -> None:
    interpreter.InterpretedFunction.run = _stub_run
    from moecompile.fused import FusedMoE
    from moecompile.kernels.settings import configured
    from moecompile.spec import MLPSpec, MoESpec, MoEWeights, RouterSpec

    torch.manual_seed(0)
    H, I, E, k, T, dt = 64, 32, 16, 4, 64, torch.bfloat16
    weights = MoEWeights(router_weight=torch.nn.Parameter(torch.randn(E, H, dtype=dt) * 0.1),
                         w1=torch.nn.Parameter(torch.randn(E, 2 * I, H, dtype=dt) * 0.1),
                         w2=torch.nn.Parameter(torch.randn(E, H, I, dtype=dt) * 0.1))
    spec = MoESpec(router=RouterSpec(num_experts=E, top_k=k, renormalize=True),
                   experts=MLPSpec(hidden_size=H, intermediate_size=I))
    block = FusedMoE(spec, weights, backend="triton")
    x = torch.randn(1, T, H, dtype=dt, requires_grad=True)
    gy = torch.randn(1, T, H, dtype=dt)
    for backward in ("always", "never"):  # the grouped_mm backward (torch's CPU grouped_mm), the Triton one
        def forward():
            with configured(grouped_backward=backward):
                return block(x)

        def step():
            with configured(grouped_backward=backward):
                block(x).backward(gy)
        fwd_ms, fwd_launches = best_ms(forward)
        step_ms, step_launches = best_ms(step)
        print(json.dumps({"grouped_backward": backward, "forward_host_ms": round(fwd_ms, 3),
                          "step_host_ms": round(step_ms, 3), "triton_launches_forward": fwd_launches,
                          "triton_launches_step": step_launches}), flush=True)


if __name__ == "__main__":
    main()
