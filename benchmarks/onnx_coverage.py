"""ONNX export over the coverage list: every family that results/coverage.json reports fully fused is exported with
moe_op="auto" and verify=True (onnxruntime CPU against PyTorch at two sequence lengths, 1e-4 of max |logit|), and
the lowering each block got is counted. One subprocess per family, under a time limit.

Constant weight matrices (some families initialise their router to zeros) are redrawn first: with every expert
tied, PyTorch and onnxruntime pick different experts, a difference of tie-breaking, not of the export.
Run: `python benchmarks/onnx_coverage.py [--families a,b]` (CPU; writes results/onnx_coverage.json and .md;
with --families, those rows are rerun and the file's other rows kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FAMILY_SECONDS = 600  # the slowest family, Qwen3-Next, takes ~170 s beside other work on 2 cores


def untie_constant_weights(model):
    """Some families initialise their router to zeros: every expert ties, and runtimes break ties differently.
    hf_zoo.build redraws constant router weights; here every other constant matrix too (whole models: expert
    biases, attention position biases), so no tie anywhere in the model decides the comparison. Returns the model."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.std() == 0:
                p.normal_(std=0.02)
    return model


def export_one(family: str) -> dict:
    import warnings

    import torch

    import moecompile
    from moecompile import hf_zoo

    warnings.filterwarnings("ignore")
    impls = hf_zoo.experts_implementations(family)
    impl = "grouped_mm" if "grouped_mm" in impls else None
    model = untie_constant_weights(hf_zoo.build(family, impl))
    inputs = hf_zoo.example_inputs(model, batch=2, seq=9)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        status, fixed = "exported", ""
        try:
            try:
                path = moecompile.export_onnx(model, Path(tmp) / "m.onnx", inputs, verify=True)
            except moecompile.MoECompileError as exc:
                if "the axis was fixed" not in str(exc):
                    raise
                # the model's own code fixes an axis (Jamba's Mamba scan loops over the sequence): static axes
                status, fixed = "exported, static axes", str(exc).split("the axis was fixed")[1].split(". ")[0]
                path = moecompile.export_onnx(model, Path(tmp) / "m.onnx", inputs, verify=True, dynamic=False)
        except moecompile.MoECompileError as exc:
            note = " ".join(str(exc).split())[:300]
            status = "error"
            if "differs from PyTorch" in note and blocks_alone_verify(model, Path(tmp)):
                status = "error outside MoE"
                note = "each MoE block exported alone verifies; the whole model does not: " + note[:120]
            return dict(family=family, impl=impl or "n/a", status=status, note=note,
                        seconds=round(time.perf_counter() - start, 1))
        rep = moecompile.export_report(path)
    lowerings = [b.export.split(" (")[0] for b in rep.blocks if b.export]
    verify = next(p.note for p in rep.passes if p.name == "verify_onnxruntime")
    if fixed:
        verify += "; dynamic axes not possible: the axis was fixed" + re.sub(r"/\S*/site-packages/", "", fixed)
    return dict(family=family, impl=impl or "n/a", status=status, blocks=len(lowerings),
                ort_blocks=sum(x == "com.microsoft.MoE" for x in lowerings), verify=verify,
                seconds=round(time.perf_counter() - start, 1), torch=torch.__version__)


def blocks_alone_verify(model, tmp: Path) -> bool:
    """Whether every fused block of `model`, exported alone, matches PyTorch in onnxruntime."""
    import torch

    import moecompile

    fused = moecompile.optimize(model)
    paths = [b.path for b in moecompile.report(fused).blocks if b.decision == "fused"]
    H = model.config.hidden_size
    try:
        for i, path in enumerate(paths):
            moecompile.export_onnx(model.get_submodule(path), tmp / f"block{i}.onnx", torch.randn(2, 9, H),
                                   verify=True)
    except moecompile.MoECompileError:
        return False
    return bool(paths)


def isolated(family: str) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", family], capture_output=True, text=True,
                              timeout=FAMILY_SECONDS)
    except subprocess.TimeoutExpired:
        return dict(family=family, status="error", note=f"took over {FAMILY_SECONDS}s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(family=family, status="error", note=" ".join(done.stderr.split())[-300:])
    return json.loads(lines[-1])


def markdown(result: dict) -> str:
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "exported"]
    static = [r["family"] for r in rows if r["status"] == "exported, static axes"]
    lines = [f"# ONNX export over the coverage list ({result['date']}, CPU, transformers {result['transformers']}, "
             f"onnxruntime {result['onnxruntime']})", "",
             f"{len(ok)} of {len(rows)} fully fused families exported with dynamic batch and sequence axes and "
             "verified in onnxruntime (two sequence lengths, 1e-4 of max |logit|)"
             + (f"; {len(static)} ({', '.join(static)}) only with static axes, its own code fixing the sequence "
                "axis (one length verified)" if static else "")
             + ". Where the model's own top-k meets exact ties (the sparse-attention indexers), verify compares with "
             "PyTorch breaking them as ONNX TopK does, and the row gives both errors. Constant weight matrices of "
             "the tiny random models (zero-initialised "
             "routers, where every expert ties and PyTorch and onnxruntime break the tie differently) are redrawn at "
             "random first. Command: `python benchmarks/onnx_coverage.py`.", "",
             "| family | impl | status | blocks (com.microsoft.MoE / all) | verify or error |", "|---|---|---|---|---|"]
    for r in rows:
        blocks = f"{r['ort_blocks']} / {r['blocks']}" if r["status"].startswith("exported") else "-"
        text = (r.get("verify") or r.get("note", "")).replace("|", "\\|")  # a cell may quote |output|
        lines.append(f"| {r['family']} | {r.get('impl', '-')} | {r['status']} | {blocks} | {text} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated model types (default: the fully fused ones)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(export_one(args.one)))
        return
    import onnxruntime
    import transformers

    coverage = json.loads((RESULTS / "coverage.json").read_text())
    by_family: dict[str, list] = {}
    for row in coverage["rows"]:
        by_family.setdefault(row["family"], []).append(row["status"])
    families = args.families.split(",") if args.families else sorted(
        f for f, statuses in by_family.items() if all(s == "fused" for s in statuses))
    result = dict(date=datetime.date.today().isoformat(), transformers=transformers.__version__,
                  onnxruntime=onnxruntime.__version__, rows=[])
    if args.families and (RESULTS / "onnx_coverage.json").exists():
        kept = json.loads((RESULTS / "onnx_coverage.json").read_text())["rows"]
        result["rows"] = [r for r in kept if r["family"] not in families]
    for family in families:
        row = isolated(family)
        result["rows"] = sorted(result["rows"] + [row], key=lambda r: r["family"])
        print(json.dumps(row), flush=True)
        (RESULTS / "onnx_coverage.json").write_text(json.dumps(result, indent=1))
        (RESULTS / "onnx_coverage.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
