"""Coverage of MoE forms written by hand, as public codebases write them: each test block of
tests/passes/describe/test_forms_*.py (and tests/handwritten.py) through `moecompile.optimize` (eager) and through
`torch.compile(backend="moecompile")`, with the decision, the description or reason, and the block-level error on
4,096 fresh tokens (fp32, max abs error over max |output|). Writes the "Hand-written forms" section of
benchmarks/results/coverage.md (the HF families table above it is left as it is) and coverage_forms.json.

    python benchmarks/coverage_forms.py
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import platform
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import moecompile  # noqa: E402

H = 32
SECTION = "## Hand-written forms"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "passes" / "describe" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dynamo looks a compiled forward's module up by name
    spec.loader.exec_module(module)
    return module


def forms() -> list[tuple[str, str, object]]:
    """(form, where it comes from, builder)."""
    import handwritten as hw
    outputs, roles, containers = _load("test_forms_outputs"), _load("test_forms_roles"), _load("test_forms_containers")
    flat, capacity = _load("test_forms_flat"), _load("test_forms_capacity")
    selection, wrappers = _load("test_forms_selection"), _load("test_forms_wrappers")
    return [
        ("(out, aux_loss): Switch top-1", "Switch Transformer router", outputs.SwitchTop1),
        ("(out, l_aux): top2gating", "DeepSpeed / GShard", outputs.DeepSpeedTop2),
        ("(out, aux_loss) over all k choices", "transformers load_balancing_loss_func", outputs.AllChoicesLoss),
        ("(out, balance + router z-loss)", "ST-MoE (SwitchTransformers' losses)", outputs.STMoELosses),
        ("(out, (tokens_per_expert, loss))", "Megatron-style counts beside a load-balancing loss",
         outputs.NestedCountsAndLoss),
        ("(out, l_aux, exp_counts)", "DeepSpeed MOELayer", outputs.DeepSpeedTriple),
        ("(out, router_logits)", "blocks feeding an outside loss", outputs.WithRouterLogits),
        ("(out, output bias) with skip-bias-add experts", "Megatron-LM SwitchMLP", outputs.SwitchMLP),
        ("selection-only bias named gate.bias", "DeepSeek-V3 inference code", roles.DeepSeekV3MoE),
        ("expert list in a container", "DeepSpeed MOELayer / Experts", containers.DeepSpeedMOELayer),
        ("local experts in a container", "Megatron-LM SequentialMLP", containers.MegatronMoELayer),
        ("experts in an nn.ModuleDict", "Switch-style keyed experts", containers.DictExperts),
        ("forward(*inputs)", "DeepSpeed MOELayer.forward", containers.StarInputs),
        ("flat [E*H] router, [E*I, H] experts", "OLMo-core dropless MoE", flat.OLMoCoreMoE),
        ("[H, E] router used as x @ W, einsum experts", "Llama 4 reference", hw.HERouterEinsumMoE),
        ("top1gating with capacity factor, einsum dispatch", "DeepSpeed / GShard",
         lambda: capacity.MOELayer(k=1, eval_capacity_factor=0.75, min_capacity=2)),
        ("top2gating with capacity factor, einsum dispatch", "DeepSpeed / GShard",
         lambda: capacity.MOELayer(k=2, eval_capacity_factor=0.5, min_capacity=2)),
        ("norm inside, residual add, einsum on gathered weights", "gpt-oss reference MLPBlock", hw.GptOssMLPBlock),
        ("experts under torch.utils.checkpoint", "training code", wrappers.CheckpointedExperts),
        ("torch.compile-decorated forward", "training code", wrappers.CompiledForward),
        ("its own autocast region (bf16 inside)", "mixed-precision code", wrappers.OwnAutocast),
        ("weight-norm parametrized experts", "nn.utils.parametrizations", wrappers.weight_normed),
        ("expert-choice routing", "Zhou et al. 2022 research code", selection.ExpertChoice),
    ]


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _input(block, tokens: int) -> torch.Tensor:
    """[tokens, H], or [8, tokens / 8, H] for a block that takes 3-D input only (Megatron's [s, b, h])."""
    x = torch.randn(tokens, H)
    try:
        with torch.no_grad():
            block(x[:16])
        return x
    except (IndexError, RuntimeError, ValueError):
        return x.view(8, tokens // 8, H)


def measure(build) -> dict:
    torch.manual_seed(0)
    block = build().eval()
    row = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = moecompile.optimize(block)
        records = moecompile.report(optimized).blocks
        fused = [b for b in records if b.decision == "fused"]
        row["eager"] = "fused" if records and len(fused) == len(records) else "left"
        row["eager_note"] = fused[0].spec_summary if fused else (records[0].reason if records else "not proposed")
        x = _input(block, 4096)
        with torch.no_grad():
            want, got = _output(block(x)), _output(optimized(x))
        row["rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
        torch.manual_seed(0)
        fresh = build().eval()
        try:
            compiled = torch.compile(fresh, backend="moecompile", options={"inductor": False})
            with torch.no_grad():
                compiled(_input(fresh, 64))
            try:
                report = moecompile.report(compiled)
            except moecompile.MoECompileError as exc:  # dynamo handed the backend no graph of this module
                row["compile"], row["compile_note"] = "left", str(exc).removeprefix("report: ")
                torch.compiler.reset()
                return row
            decisions = [b.decision for b in report.blocks]
            row["compile"] = "fused" if decisions and all(d == "fused" for d in decisions) else "left"
            row["compile_note"] = "" if row["compile"] == "fused" else (
                report.blocks[0].reason if report.blocks else report.message.splitlines()[0] if report.message
                else "no block in the compiled graphs")
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            row["compile"], row["compile_note"] = "error", f"{type(exc).__name__}: {exc}"[:200]
        torch.compiler.reset()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [SECTION, "", f"torch {meta['torch']}, CPU, {meta['date']}. Command: `python "
                          f"benchmarks/coverage_forms.py`. "
             "The test blocks live in tests/passes/describe/test_forms_*.py; `err` is the eager optimized block's "
             "max abs error over max |output| on 4,096 fresh tokens (fp32).", "",
             f"{sum(r['eager'] == 'fused' for r in rows)} of {len(rows)} forms fused by `optimize`, "
             f"{sum(r['compile'] == 'fused' for r in rows)} under `torch.compile(backend=\"moecompile\")`.", "",
             "| form | as in | optimize | err | description or reason | torch.compile backend | its reason |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r["eager_note"].replace("|", "/")
        cnote = r["compile_note"].replace("|", "/")[:160]
        lines.append(f"| {r['form']} | {r['origin']} | {r['eager']} | {r['rel_err']:.1e} | {note[:160]} | "
                     f"{r['compile']} | {cnote} |")
    return "\n".join(lines) + "\n"


def main():
    meta = dict(torch=torch.__version__, date=datetime.date.today().isoformat(), machine=platform.machine())
    rows = []
    for form, origin, build in forms():
        row = dict(form=form, origin=origin, **measure(build))
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = ROOT / "benchmarks" / "results"
    (results / "coverage_forms.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    path = results / "coverage.md"
    text = path.read_text()
    text = text[:text.index(SECTION)].rstrip() + "\n" if SECTION in text else text.rstrip() + "\n"
    path.write_text(text + "\n" + markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
