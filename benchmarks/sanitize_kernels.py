"""A few kernel cases under compute-sanitizer (memcheck): out-of-bounds or misaligned accesses fail the run.

Run on the device: `compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_kernels.py`.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
import cases  # noqa: E402

from moecompile.kernels import moe as kernel_moe  # noqa: E402

CASES = [("softmax_topk_renorm", 8, 2, 3, "swiglu"), ("sigmoid_grouped_corr", 64, 8, 77, "shared_gated"),
         ("relu", 16, 0, 50, "gelu_bias"), ("capacity", 8, 2, 40, "weight_on_input"),
         ("softmax_topk", 256, 8, 1, "swiglu")]

for i, (router, E, k, T, mlp) in enumerate(CASES):
    spec = cases.make_spec(router, E, k, 200, 136, mlp)
    gen = torch.Generator().manual_seed(i)
    w = cases.make_weights(spec, torch.bfloat16, "cuda", gen)
    x = torch.randn(T, 200, generator=gen).to("cuda", torch.bfloat16)
    y, logits, sw = kernel_moe.kernels_forward(spec, w, x)
    cases.check_against_reference(spec, w, x, y, logits, sw)
    torch.cuda.synchronize()
    print("ok", router, E, k, T, mlp, flush=True)
