"""Coverage: for every MoE family of the installed transformers, build a tiny model, optimize it under each experts
implementation, and report blocks found, blocks fused and the error on the model's output (or why not).

Place in the pipeline: outside it; a measurement of detect/describe/confirm over real model classes.
Run: `python -m moecompile.coverage [--families a,b] [--json FILE] [--markdown FILE]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import warnings

import torch

from . import hf_zoo
from .pipeline import optimize, report

LOGITS_RTOL = 1e-4  # fp32: max abs error on the output over its max abs value
FAMILY_SECONDS = 180  # a family that takes longer (a hang in its modeling code) becomes an "error" row


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cover_family_isolated(family: str) -> list[dict]:
    """cover_family in a subprocess under a wall-clock limit: a family that hangs in C code cannot stop the run."""
    try:
        done = subprocess.run([sys.executable, "-m", "moecompile.coverage", "--one", family], capture_output=True,
                              text=True, timeout=FAMILY_SECONDS)
    except subprocess.TimeoutExpired:
        return [dict(family=family, impl="-", status="error", found=0, fused=0, rel_err=None,
                     note=f"took over {FAMILY_SECONDS}s (building or running the tiny model)")]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return [dict(family=family, impl="-", status="error", found=0, fused=0, rel_err=None,
                     note=_short(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"))]
    return [json.loads(line) for line in lines]


def cover_family(family: str) -> list[dict]:
    """One row per experts implementation (one row 'n/a' for families without the switch)."""
    rows = []
    try:
        impls = hf_zoo.experts_implementations(family)
    except Exception as exc:  # noqa: BLE001 - a family that does not build is a row, not a crash
        return [dict(family=family, impl="-", status="not built", found=0, fused=0, rel_err=None,
                     note=_short(f"{type(exc).__name__}: {exc}"))]
    for impl in impls:
        start = time.perf_counter()
        row = dict(family=family, impl=impl, found=0, fused=0, rel_err=None, note="")
        try:
            model = hf_zoo.build(family, None if impl == "n/a" else impl)
            inputs = hf_zoo.example_inputs(model)
            want = hf_zoo.model_output(model, inputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimized = optimize(model)
            rep = report(optimized)
            got = hf_zoo.model_output(optimized, inputs)
            row["found"], row["fused"] = len(rep.blocks), len(rep.fused)
            row["rel_err"] = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
            if not rep.blocks:
                row["status"], row["note"] = "no block found", "no router [E, H] beside E experts was found"
            elif rep.left:
                row["status"] = "partly fused" if rep.fused else "left"
                row["note"] = _short("; ".join(dict.fromkeys(b.reason for b in rep.left)))
            elif row["rel_err"] <= LOGITS_RTOL:
                row["status"] = "fused"
            else:
                row["status"] = "MISMATCH"
                row["note"] = f"logits rel err {row['rel_err']:.2e} > {LOGITS_RTOL}"
        except Exception as exc:  # noqa: BLE001
            row["status"], row["note"] = "error", _short(f"{type(exc).__name__}: {exc}")
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    return rows


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    ok = sorted({r["family"] for r in rows if r["status"] == "fused"}
                - {r["family"] for r in rows if r["status"] != "fused"})
    lines = [
        "# moecompile coverage of HF transformers MoE families",
        "",
        f"transformers {result['transformers']}, torch {result['torch']}, {result['device']}, {result['date']}. "
        f"Command: `python -m moecompile.coverage --markdown benchmarks/results/coverage.md`.",
        "",
        f"{len(ok)} of {len({r['family'] for r in rows})} families fully fused under every experts implementation "
        f"they have, logits within {LOGITS_RTOL:g} (max abs error over max |logit|, fp32).",
        "",
        "| family | experts impl | status | blocks found | fused | logits rel err | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        note = r["note"].replace("|", "/")
        lines.append(f"| {r['family']} | {r['impl']} | {r['status']} | {r['found']} | {r['fused']} | {err} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moecompile.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated model types (default: every MoE family found)")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--markdown", help="write the table as markdown to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one family, JSON rows on stdout
    args = parser.parse_args(argv)
    if args.one:
        for row in cover_family(args.one):
            print(json.dumps(row), flush=True)
        return 0
    import transformers

    families = args.families.split(",") if args.families else hf_zoo.moe_families()
    result = dict(transformers=transformers.__version__, torch=torch.__version__,
                  device=f"CPU ({platform.machine()})", date=datetime.date.today().isoformat(), rows=[])
    print(f"{'family':24s} {'impl':11s} {'status':15s} found fused rel_err  note", flush=True)
    for family in families:
        for row in cover_family_isolated(family):
            result["rows"].append(row)
            err = "-" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
            print(f"{row['family']:24s} {row['impl']:11s} {row['status']:15s} {row['found']:5d} {row['fused']:5d} "
                  f"{err:8s} {row['note'][:90]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
