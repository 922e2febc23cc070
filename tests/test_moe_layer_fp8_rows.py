"""benchmarks/moe_layer.py's FP8 rows, checked on the CPU before a GPU run spends time on them: the FP8 twin holds
FP8 experts with their scales, its floor counts one byte a weight (half the bf16 floor's expert bytes at decode,
where the floor is bandwidth-bound), its rows carry the fields the markdown reads, and the markdown's FP8 table
renders them. The CUDA-only helpers (do_bench, CUDA graphs, memory counters) are replaced by calls of the function
itself."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import moe_layer  # noqa: E402

from moecompile import FusedMoE, MLPSpec, MoESpec, MoEWeights, RouterSpec, fp8  # noqa: E402


def test_fp8_rows_and_table(monkeypatch):
    monkeypatch.setattr(moe_layer, "bench", lambda fn, quick: (fn(), 0.5)[1])
    monkeypatch.setattr(moe_layer, "peak_extra_mb", lambda fn: (fn(), 0.0)[1])
    monkeypatch.setattr(moe_layer, "graphed", lambda fn, x: (SimpleNamespace(replay=lambda: fn(x)), None, 0.0))
    H, I, E, k = 256, 128, 8, 2
    gen = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    weights = MoEWeights(router_weight=torch.randn(E, H, generator=gen).to(bf16),
                         w1=torch.randn(E, 2 * I, H, generator=gen).to(bf16),
                         w2=torch.randn(E, H, I, generator=gen).to(bf16))
    spec = MoESpec(router=RouterSpec(num_experts=E, top_k=k), experts=MLPSpec(hidden_size=H, intermediate_size=I))
    fused = FusedMoE(spec, weights, backend="reference")
    twin = moe_layer.fp8_twin(fused)
    assert fp8.is_fp8(twin.weights().w1) and twin.weights().w2_scale is not None
    x = torch.randn(1, 1, H, generator=gen).to(bf16)
    ceilings = {"copy_GBps": 1000.0, "bf16_TFLOPs": 1000.0}  # bandwidth-bound at one token
    bf16_floor, _ = moe_layer.floor_ms(fused, x[0], ceilings)
    rows = moe_layer.fp8_rows(twin, x, "tiny", 1, ceilings, quick=True)
    assert [r["impl"] for r in rows] == ["moecompile_fp8", "moecompile_fp8_cudagraph"]
    expert_share = 2 * 3 * H * I * 2 / (1000.0 * 1e6)  # two experts' bf16 bytes, ms
    assert abs((bf16_floor - rows[0]["floor_ms"]) - expert_share / 2) < 1e-9
    assert rows[0]["rel_err_vs_reference"] < 1e-6  # the reference backend on both sides here
    result = dict(rows=[dict(shape="qwen3_30b_a3b", tokens=1, impl="moecompile_cudagraph", ms=1.0),
                        *[dict(r, shape="qwen3_30b_a3b") for r in rows]],
                  device="cpu", torch="", triton="", transformers="", date="",
                  ceilings=ceilings)
    table = moe_layer.markdown(result)
    assert "FP8 experts" in table and "| qwen3_30b_a3b | 1 | 1.000 | 0.500 | 0.500 |" in table
