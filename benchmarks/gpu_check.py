"""GPU check of the core on the device: optimize real HF families on CUDA in fp32 and bf16 and compare logits.

Not a speed benchmark (FusedMoE still computes with the reference; the kernels issue brings the benchmark).
Run: `python benchmarks/gpu_check.py --json OUT.json`; prints the device and versions first.
"""
import argparse
import datetime
import json
import platform
import warnings

import torch

import moecompile
from moecompile import hf_zoo

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4", "glm4_moe",
            "granitemoeshared", "qwen3_next", "phimoe", "dbrx", "jamba", "switch_transformers", "ernie4_5_moe",
            "jetmoe"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    import transformers
    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.date.today().isoformat(), rows=[])
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
    warnings.filterwarnings("ignore")
    for family in FAMILIES:
        for impl in hf_zoo.experts_implementations(family):
            for dtype in (torch.float32, torch.bfloat16):
                row = dict(family=family, impl=impl, dtype=str(dtype).split(".")[1])
                try:
                    model = hf_zoo.build(family, None if impl == "n/a" else impl).to("cuda", dtype)
                    inputs = {k: v.cuda() for k, v in hf_zoo.example_inputs(model, batch=3, seq=7).items()}
                    want = hf_zoo.model_output(model, inputs).float()
                    optimized = moecompile.optimize(model)
                    rep = moecompile.report(optimized)
                    got = hf_zoo.model_output(optimized, inputs).float()
                    rel = (got - want).abs().max().item() / want.abs().max().item()
                    mean_rel = (got - want).abs().mean().item() / want.abs().mean().item()
                    on_cuda = all(p.is_cuda for p in optimized.parameters())
                    row.update(found=len(rep.blocks), fused=len(rep.fused), rel_err=rel, mean_rel_err=mean_rel,
                               on_cuda=on_cuda, reasons=[b.reason for b in rep.left])
                except Exception as exc:  # noqa: BLE001
                    row.update(error=f"{type(exc).__name__}: {exc}"[:300])
                info["rows"].append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
