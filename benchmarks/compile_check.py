"""GPU check of the torch.compile backend: HF families in bf16 on CUDA, torch.compile(backend=moecompile) (Inductor
after the rewrite) against the eager model: logits and, in training mode, gradients. Not a speed benchmark.

Run on the device: `python benchmarks/compile_check.py` (writes results/compile_check.json and prints the rows).
"""
import datetime
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import moecompile
from moecompile import hf_zoo

CASES = [("qwen3_moe", "grouped_mm"), ("mixtral", "grouped_mm"), ("mixtral", "batched_mm"),
         ("deepseek_v3", "grouped_mm"), ("qwen2_moe", "grouped_mm"), ("olmoe", "grouped_mm")]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def main() -> None:
    import transformers

    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.date.today().isoformat(), rows=[])
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
    warnings.filterwarnings("ignore")
    for family, impl in CASES:
        torch._dynamo.reset()
        model = hf_zoo.build(family, impl, dtype=torch.bfloat16).cuda()
        inputs = {k: v.cuda() for k, v in hf_zoo.example_inputs(model, batch=2, seq=33).items()}
        with torch.no_grad():
            want = model(**inputs).logits
        compiled = torch.compile(model, backend=moecompile.backend())
        start = time.perf_counter()
        with torch.no_grad():
            got = compiled(**inputs).logits
        compile_s = time.perf_counter() - start
        rep = moecompile.report(compiled)
        model.train()
        model(**inputs).logits.float().square().mean().backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        compiled(**inputs).logits.float().square().mean().backward()
        grad_errs = {n: rel(p.grad, eager_grads[n]) for n, p in model.named_parameters() if p.grad is not None}
        row = dict(family=family, impl=impl, fused=len(rep.fused), blocks=len(rep.blocks),
                   logits_rel_err=rel(got, want), worst_grad_rel_err=max(grad_errs.values()),
                   worst_grad=max(grad_errs, key=grad_errs.get), first_call_s=round(compile_s, 1))
        info["rows"].append(row)
        print(json.dumps(row))
    out = Path(__file__).parent / "results" / "compile_check.json"
    out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
