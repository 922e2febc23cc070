"""Gradient errors of ReLU-routed FusedMoE on the GPU: the Triton forward and its backward (the reference recomputed
under autograd) against float64 autograd through the reference, per dtype, router form and token count.

Not a speed benchmark: the figures behind tests/passes/test_routing.py::test_relu_gradients_bf16_cuda (which
asserts 2e-2 in bf16). Run on the device: `python benchmarks/routing_grads.py` (writes results/routing_grads.json
and .md).
"""
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "kernels"))
import cases  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    import transformers

    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat(), rows=[])
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
    for dtype in DTYPES:
        for router in ("relu_bias", "relu_topk"):
            for E, k in ((8, 2), (60, 6), (128, 8)):
                for T in (1, 333, 2048):
                    errors, _, _ = cases.gradient_errors(router, E, k, T, 200, 136, DTYPES[dtype], "cuda",
                                                         seed=T + E)
                    info["rows"].append(dict(dtype=dtype, router=router, E=E, k=k, T=T, max_rel_error=max(
                        errors.values()), worst=max(errors, key=errors.get), errors=errors))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_grads.json").write_text(json.dumps(info, indent=1))
    lines = [f"# ReLU-routing gradients vs float64 autograd ({info['device']}, torch {info['torch']}, triton "
             f"{info['triton']}, {info['date']})", "",
             "Normwise relative error, worst over the input and every weight gradient, for sum(y * probe); "
             "H 200, I 136. Command: `python benchmarks/routing_grads.py`.", "",
             "| dtype | router | E | k | worst over T in 1, 333, 2048 | worst tensor |", "|---|---|---|---|---|---|"]
    for dtype in DTYPES:
        for router in ("relu_bias", "relu_topk"):
            for E, k in ((8, 2), (60, 6), (128, 8)):
                rows = [r for r in info["rows"] if (r["dtype"], r["router"], r["E"]) == (dtype, router, E)]
                worst = max(rows, key=lambda r: r["max_rel_error"])
                lines.append(f"| {dtype} | {router} | {E} | {k if router == 'relu_topk' else '-'} | "
                             f"{worst['max_rel_error']:.2e} | {worst['worst']} (T={worst['T']}) |")
    (RESULTS / "routing_grads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
