"""remoe_repro.md and its plots from remoe_repro.json (benchmarks/remoe_repro.py --report; needs matplotlib, which
the GPU machine lacks: the runs write JSON there, the report is made where the results are committed)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _plots(runs: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    arms = [r for r in runs if r["routing"] in ("topk", "relu")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in arms:
        steps, _, val = zip(*r["curve"])
        ax.plot(steps, val, label=r["name"], linestyle="-" if r["routing"] == "relu" else "--")
    ax.set(xlabel="step", ylabel="held-out loss (nats/byte)", title="TopK vs ReLU routing")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "remoe_val_loss.png", dpi=120)
    written.append("remoe_val_loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in arms:
        if r.get("sparsity_curve"):
            steps, sparsity, _ = zip(*r["sparsity_curve"])
            ax.plot(steps, sparsity, label=r["name"])
            ax.axhline(1 - r["k"] / r["experts"], color="grey", linewidth=0.5)
    ax.set(xlabel="step", ylabel="sparsity (share of zero gates)", title="ReLU routing: sparsity over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "remoe_sparsity.png", dpi=120)
    written.append("remoe_sparsity.png")
    relu = [r for r in arms if r["routing"] == "relu" and r.get("expert_load_by_layer")]
    if relu:
        fig, ax = plt.subplots(figsize=(6, 4))
        load = relu[0]["expert_load_by_layer"]
        ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title=f"expert load, {relu[0]['name']}")
        fig.tight_layout()
        fig.savefig(out / "remoe_expert_load.png", dpi=120)
        written.append("remoe_expert_load.png")
    plt.close("all")
    return written


def write_report(out: Path) -> None:
    result = json.loads((out / "remoe_repro.json").read_text())
    runs = result["runs"]
    arms = [r for r in runs if r["routing"] in ("topk", "relu")]
    if not arms:
        raise SystemExit("no training runs in remoe_repro.json")
    first = arms[0]
    lines = [f"# ReMoE at small scale ({first['device']}, torch {first['torch']}, transformers "
             f"{first['transformers']}, {first['date']})", "",
             f"Mixtral-class decoder from its config, byte-level vocabulary, {first['parameters'] / 1e6:.1f}M "
             f"parameters, E = {first['experts']}; text: {first['data']['files']} files of "
             f"{', '.join(first['data']['packages'])} ({first['data']['train_bytes'] / 1e6:.0f} MB train, "
             f"{first['data']['val_bytes'] / 1e6:.1f} MB held out). Same data order and steps for both arms.", "",
             "| run | routing | k | seed | steps | tokens | held-out loss | tokens/s | active experts by layer |",
             "|---" * 9 + "|"]
    for r in sorted(arms, key=lambda r: (r["k"], r["routing"], r["seed"])):
        layers = " ".join(f"{a:.2f}" for a in r.get("active_by_layer", []))
        lines.append(f"| {r['name']} | {r['routing']} | {r['k']} | {r['seed']} | {r['steps']} | {r['tokens']} | "
                     f"{r['val_loss']:.4f} | {r.get('tokens_per_s', 0):.0f} | {layers} |")
    lines += ["", "Mean held-out loss over seeds:", ""]
    for k in sorted({r["k"] for r in arms}):
        for routing in ("topk", "relu"):
            vals = [r["val_loss"] for r in arms if r["k"] == k and r["routing"] == routing]
            if vals:
                spread = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
                lines.append(f"- k = {k}, {routing}: {statistics.fmean(vals):.4f}{spread} ({len(vals)} seeds)")
    types = [r for r in arms if r.get("active_by_token_type") and r["routing"] == "relu"]
    if types:
        lines += ["", "Active experts per token by byte type (ReLU arms):", "",
                  "| run | " + " | ".join(types[0]["active_by_token_type"]) + " |",
                  "|---" * (1 + len(types[0]["active_by_token_type"])) + "|"]
        for r in types:
            lines.append(f"| {r['name']} | " + " | ".join("—" if v is None else f"{v:.2f}"
                                                          for v in r["active_by_token_type"].values()) + " |")
    loads = [r for r in arms if r.get("expert_load_by_layer")]
    if loads:
        lines += ["", "Expert load: the busiest and the idlest expert's share of a layer's pairs (even: "
                  f"{1 / loads[0]['experts']:.3f}), per layer:", "", "| run | " + " | ".join(
                      f"layer {i}" for i in range(len(loads[0]["expert_load_by_layer"]))) + " |",
                  "|---" * (1 + len(loads[0]["expert_load_by_layer"])) + "|"]
        for r in sorted(loads, key=lambda r: (r["k"], r["routing"], r["seed"])):
            lines.append(f"| {r['name']} | " + " | ".join(f"{max(row):.3f} / {min(row):.3f}"
                                                          for row in r["expert_load_by_layer"]) + " |")
    stages = [r for r in arms if r.get("sparsity_curve")]
    if stages:
        lines += ["", "Sparsity over training (ReMoE's three stages): the step where it first reaches half the "
                  "target, the step from which it stays within 0.02 of the target, and where it ends.", "",
                  "| run | target | half-way at step | within 0.02 from step | final |", "|---|---|---|---|---|"]
        for r in stages:
            target = 1 - r["k"] / r["experts"]
            curve = r["sparsity_curve"]
            half = next((step for step, value, _ in curve if value >= target / 2), None)
            settled = None
            for step, value, _ in curve:
                if abs(value - target) > 0.02:
                    settled = None
                elif settled is None:
                    settled = step
            lines.append(f"| {r['name']} | {target:.3f} | {half} | {settled} | {curve[-1][1]:.3f} |")
    for r in [r for r in runs if r.get("path")]:
        lines += ["", f"Conversion path ({r['name']}): held-out loss at each stage", "", "| stage | step | loss |",
                  "|---|---|---|"]
        lines += [f"| {p['stage']} | {p['step']} | {p['val_loss']:.4f} |" for p in r["path"]]
    try:
        plots = _plots(runs, out)
        lines += [""] + [f"![{p}]({p})" for p in plots]
    except ImportError:
        lines += ["", "(plots not drawn: matplotlib is not installed here)"]
    (out / "remoe_repro.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
