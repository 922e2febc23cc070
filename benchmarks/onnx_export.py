"""ONNX export of a 4-layer Qwen3-MoE-shaped model (issue 6): file size, export time, and onnxruntime CPU latency of
each MoE lowering against PyTorch eager on the same CPU, measured in one run (each lowering beside its own eager
run, `--append`, where one device call is too short for both).

Model: Qwen3MoeForCausalLM from its config, random weights, H 2048, I 768, E 128, k 8, 32 heads / 4 KV heads of
128, vocabulary 32000, fp16 weights (onnxruntime's MoE kernels take fp32 and fp16; fp32 would need 10 GB per copy).
Inputs: batch 1 x `--tokens` tokens (a prompt) and 1 x 1 (decode-sized; the standard form's If then gathers the
used experts' weights), no cache. Latency: median of `--reps` calls after one warm-up call, 2 threads.
Error: max |onnxruntime - PyTorch| over max |PyTorch| on the logits (PyTorch runs the same fp16 weights in fp32),
the worse of the two inputs.

Run: `python benchmarks/onnx_export.py` (writes results/onnx.json and results/onnx.md). `--small` for a check of
the script. On the device (over 10 minutes for both): `--moe-ops ort`, then `--moe-ops standard --append`. The
GPU provider (onnxruntime-gpu) cannot be installed on the device machine, so no GPU figure is given.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import e2e  # benchmarks/ is the script's directory: the same HF model builder
import torch

import moecompile

RESULTS = Path(__file__).parent / "results"
FULL = dict(layers=4, H=2048, I=768, E=128, k=8, heads=32, kv=4, head_dim=128, vocab=32000)
SMALL = dict(FULL, H=128, I=64, E=16, heads=4, kv=2, head_dim=32, vocab=512)


def build(cfg: dict) -> torch.nn.Module:
    return e2e.build("qwen3_moe", cfg, torch.float16, "cpu", cfg["vocab"])


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    return e2e.timed(fn, "cpu", reps)


def op_profile(path: Path, feeds: dict, top: int = 8) -> list[list]:
    """onnxruntime's own profile of one call (after a warm-up): [op type, ms, share of the kernels' time] for the
    `top` op types that took longest. If/Loop/Scan are left out: the nodes of their subgraphs are profiled on
    their own, so counting both would count that time twice."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    last_run_start = runs[-1]["ts"] if runs else 0  # the second call only
    per_op: dict[str, float] = {}
    for event in trace:
        op = event.get("args", {}).get("op_name", "?")
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= last_run_start
                and op not in ("If", "Loop", "Scan")):
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1e3
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return [[op, ms, ms / total] for op, ms in ranked]


def main() -> None:
    import onnxruntime as ort
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--moe-ops", default="ort,standard", help="the lowerings to measure, comma-separated")
    parser.add_argument("--append", action="store_true", help="add this run's rows (PyTorch eager measured again "
                        "beside them) to the results file's, as a further run: for a device call too short for both")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = SMALL if args.small else FULL
    torch.set_num_threads(2)
    model = build(cfg)
    gen = torch.Generator().manual_seed(1)
    inputs = {n: torch.randint(0, cfg["vocab"], (1, n), generator=gen) for n in (args.tokens, 1)}
    result = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
                  transformers=transformers.__version__, onnxruntime=ort.__version__,
                  date=datetime.date.today().isoformat(), model=cfg, tokens=list(inputs), dtype="float16", rows=[])
    with torch.no_grad():
        exact = copy.deepcopy(model).float()
        want = {n: exact(input_ids=ids, use_cache=False).logits for n, ids in inputs.items()}
        eager_ms = {n: median_ms(lambda: exact(input_ids=ids, use_cache=False), args.reps) for n, ids in inputs.items()}
        eager16_ms = {n: median_ms(lambda: model(input_ids=ids, use_cache=False), args.reps)
                      for n, ids in inputs.items()}
    del exact
    gc.collect()
    result["rows"].append(dict(runtime="PyTorch eager (fp32 compute)", ms=eager_ms))
    result["rows"].append(dict(runtime="PyTorch eager (fp16 weights)", ms=eager16_ms))
    print(json.dumps(result["rows"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for moe_op in args.moe_ops.split(","):
            path = Path(tmp) / f"{moe_op}.onnx"
            start = time.perf_counter()
            moecompile.export_onnx(model, path, {"input_ids": inputs[args.tokens]}, moe_op=moe_op)
            export_s = time.perf_counter() - start
            gc.collect()
            size = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name.startswith(path.name))
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            ms, err = {}, 0.0
            for n, ids in inputs.items():
                feeds = {"input_ids": ids.numpy()}
                got = torch.from_numpy(session.run(None, feeds)[0]).float()
                ms[n] = median_ms(lambda: session.run(None, feeds), args.reps)
                err = max(err, ((got - want[n]).abs().max() / want[n].abs().max()).item())
            del session
            gc.collect()
            profile = {n: op_profile(path, {"input_ids": ids.numpy()}) for n, ids in inputs.items()}
            row = dict(runtime=f"onnxruntime CPU, moe_op={moe_op}", ms=ms, export_s=export_s, file_mb=size / 2 ** 20,
                       rel_err=err, profile=profile)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            for f in Path(tmp).iterdir():
                f.unlink()
            gc.collect()
    suffix = "_small" if args.small else ""
    RESULTS.mkdir(exist_ok=True)
    earlier = []
    if args.append and (RESULTS / f"onnx{suffix}.json").exists():
        earlier = json.loads((RESULTS / f"onnx{suffix}.json").read_text())["rows"]
    run = 1 + max((row.get("run", 1) for row in earlier), default=0)
    result["rows"] = earlier + [dict(row, run=run) for row in result["rows"]]
    result = json.loads(json.dumps(result))  # as the file holds it (token counts as string keys), for markdown
    (RESULTS / f"onnx{suffix}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"onnx{suffix}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["model"]
    lines = [f"# ONNX export, onnxruntime CPU vs PyTorch eager ({r['date']}; {r['cores']} CPU cores, 2 threads used; "
             f"torch {r['torch']}, transformers {r['transformers']}, onnxruntime {r['onnxruntime']})", "",
             f"Qwen3-MoE-shaped model, {m['layers']} layers, H {m['H']}, I {m['I']}, E {m['E']}, k {m['k']}, "
             f"vocabulary "
             f"{m['vocab']}, fp16 weights, no cache. Command: `python benchmarks/onnx_export.py`"
             + (" in runs of one lowering each (`--moe-ops ort`, then `--moe-ops standard --append`: both exceed one "
                "device call), each beside PyTorch eager measured in the same run." if any(
                 row.get("run", 1) > 1 for row in r["rows"]) else "."),
             "onnxruntime's CUDA provider (onnxruntime-gpu) cannot be installed on the GPU machine, so its speed is "
             "not measured here.", "",
             "| run | runtime | " + " | ".join(f"ms, 1 x {n} tokens" for n in r["tokens"])
             + " | export s | file MB | max err / max logit |", "|---|---|" + "---|" * (len(r["tokens"]) + 3)]
    for row in r["rows"]:
        cells = [str(row.get("run", 1)), row["runtime"]] + [f"{row['ms'][str(n)]:.1f}" for n in r["tokens"]]
        cells += [f"{row['export_s']:.1f}", f"{row['file_mb']:.0f}", f"{row['rel_err']:.1e}"] if "export_s" in row \
            else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    profiled = [row for row in r["rows"] if row.get("profile")]
    if profiled:
        lines += ["", "onnxruntime's profile of one call (kernel time by op type, the longest first; If's own time "
                      "left out, its subgraph's nodes counted):", ""]
        for row in profiled:
            for n, ranked in row["profile"].items():
                ops = ", ".join(f"{op} {ms:.1f} ms ({share:.0%})" for op, ms, share in ranked)
                lines.append(f"- {row['runtime']}, 1 x {n} tokens: {ops}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
