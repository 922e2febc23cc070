"""Diagnosis of experts_implementation="moecompile" on the GPU: where its per-call time goes (torch.profiler) on a
Qwen3-30B-A3B-shaped block at 1 and 4096 tokens, and gpt-oss's bf16 experts error against fp32 with parts turned
off (biases, clamps). Run on the device: `python benchmarks/diag_hf_experts.py`."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
import moe_layer  # noqa: E402

import moecompile  # noqa: E402
from moecompile import hf_zoo  # noqa: E402


def timed(fn) -> float:
    return e2e.timed(fn, "cuda", 50)


def profile_block():
    block, config = moe_layer.hf_block("qwen3_moe", 2048, 768, 128, 8)
    ours = moe_layer.hf_moecompile_experts(block, config)
    compiled = torch.compile(ours)
    for T in (1, 4096):
        x = torch.randn(1, T, 2048, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            print(f"T={T}: HF block, our experts, eager {timed(lambda: ours(x)):.3f} ms; compiled "
                  f"{timed(lambda: compiled(x)):.3f} ms; HF grouped_mm eager {timed(lambda: block(x)):.3f} ms")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    compiled(x)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))


def gpt_oss_parts():
    exact = hf_zoo.build("gpt_oss", "grouped_mm").cuda()
    experts = exact.model.layers[0].mlp.experts
    H, E = exact.config.hidden_size, exact.config.num_local_experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, H, device="cuda", generator=gen)
    ids = torch.rand(256, E, device="cuda", generator=gen).topk(4, dim=-1).indices
    w = torch.rand(256, 4, device="cuda", generator=gen).softmax(-1)
    with torch.no_grad():
        for label, change in (("as built", None), ("biases 0", "bias"), ("limit 1e4", "limit")):
            if change == "bias":
                experts.gate_up_proj_bias.zero_()
                experts.down_proj_bias.zero_()
            if change == "limit":
                experts.limit = 1e4
            want = experts(x, ids, w).double()
            row = [label]
            for impl in ("grouped_mm", "moecompile"):
                experts.config._experts_implementation = impl
                twin = hf_zoo.build("gpt_oss", impl, dtype=torch.bfloat16).cuda().model.layers[0].mlp.experts
                twin.load_state_dict(experts.state_dict())
                twin.limit = experts.limit
                got = twin(x.bfloat16(), ids, w.bfloat16()).double()
                row.append(f"{impl} {((got - want).norm() / want.norm()).item():.2e}")
            experts.config._experts_implementation = "grouped_mm"
            print("gpt_oss experts bf16 vs fp32:", " | ".join(row))


if __name__ == "__main__":
    moecompile.register_transformers()
    gpt_oss_parts()
    profile_block()
