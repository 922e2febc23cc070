"""Fuzz campaign: random MoE descriptions through FusedMoE against an independent oracle, and random hand-written
blocks through optimize against themselves. The count that matters: silent mismatches (a wrong answer without an
error), which must be 0.

Two parts (fuzz_blocks.py holds the second's module generator):
- descriptions: a random MoESpec (every router form and option: E 1..256, k 1..8, odd H and I, tokens 0..4096,
  fp32/fp16/bf16), random weights in families aimed at rare branches (negative router and correction biases,
  exact ties from duplicated router rows and zero inputs, NaN/Inf inputs), through FusedMoE (on the CPU the
  PyTorch reference; with --device cuda the Triton kernels, the reference where the kernels cannot run it; with
  --kernels-on-cpu the kernels in the Triton interpreter on small shapes) against fuzz_oracle.py in float64.
  Torch's top-k runs with the lower index first among exact ties (the kernels' and the oracle's order); tokens the
  oracle calls ambiguous (a decision within rounding of flipping) are left out and counted. A token agrees if its
  max |error| <= TOL[dtype] x the block's largest |output| (or the token's magnitude, its sum over absolute
  values, where that is larger: terms that cancel), and every output position is finite where the oracle's
  is, and only there.
- blocks: random nn.Modules written the ways users write MoE (a loop over a ModuleList, dense einsum over stacked
  weights, gathered per-token weights) with random routers (softmax/sigmoid top-k, renormalised or not, top-k then
  softmax, DeepSeek-style groups with a correction bias and masked groups at 0.0 or -inf, ReLU) through
  moecompile.optimize; every fused block is then run against the original on BLOCK_TOKENS fresh tokens (fp32,
  <= 1e-4 of the largest |output| per token, plus NaN tokens by position). A block left alone is not a mismatch.

Run: `python benchmarks/fuzz_moe.py --descriptions 10000 --blocks 300` (CPU), on the device
`python benchmarks/fuzz_moe.py --device cuda --descriptions 10000 --blocks 0 --budget-s 400`; each writes
benchmarks/results/fuzz_<device>.json, and `--summarize` merges them into benchmarks/results/fuzz.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

if "--kernels-on-cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_oracle  # noqa: E402

from moecompile import MoECompileError  # noqa: E402
from moecompile.backends.topk_ties import onnx_topk_ties, topk_lower_index_first  # noqa: E402
from moecompile.fused import run_block  # noqa: E402
from moecompile.spec import MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 6e-3, torch.bfloat16: 4e-2}
RANGE = {dt: torch.finfo(dt).max / 8 for dt in (torch.float32, torch.float16, torch.bfloat16)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROUTER_FORMS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "sqrtsoftplus_topk", "none_topk", "grouped",
                "relu_all_positive", "relu_topk", "sparsemixer", "capacity")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu", "clamped_silu")
MAX_WORK = 6e7  # tokens x k x H x I bound per case (the float64 oracle's time)
RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------------------------------------- descriptions


def _log_int(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))))


def random_spec(rng: random.Random, small: bool) -> MoESpec:
    """A valid MoESpec of a random router form and options (small: shapes for the Triton interpreter)."""
    while True:
        form = rng.choice(ROUTER_FORMS)
        E = _log_int(rng, 1, 64 if small else 256)
        k = rng.randint(1, min(8, E))
        H = rng.randint(1, 48 if small else 160)
        I = rng.randint(1, 48 if small else 160)
        r = dict(num_experts=E, top_k=k, scaling_factor=rng.choice([1.0, 1.0, 2.5, 0.7]),
                 has_bias=rng.random() < 0.3, weight_on_input=rng.random() < 0.1)
        if rng.random() < 0.4:
            r.update(renormalize=True, renorm_min=rng.choice([0.0, 1e-20, 1e-6]))
        if form == "softmax_topk":
            pass
        elif form == "topk_softmax":
            r.update(score_order="select_then_score")
        elif form in ("sigmoid_topk", "sqrtsoftplus_topk", "none_topk"):
            r.update(scoring=form.split("_")[0], has_correction_bias=rng.random() < 0.5,
                     score_order=rng.choice(["score_then_select", "score_then_select", "select_then_score"]))
        elif form == "grouped":
            groups = [g for g in (1, 2, 4, 8) if E % g == 0 and g <= E]
            n_group = rng.choice(groups)
            topk_group = rng.randint(1, n_group)
            r.update(scoring=rng.choice(["sigmoid", "sigmoid", "softmax"]), selection="grouped_topk",
                     n_group=n_group, topk_group=topk_group, group_score=rng.choice(["max", "top2_sum"]),
                     group_fill=rng.choice(["-inf", "zero"]), has_correction_bias=rng.random() < 0.8,
                     top_k=min(k, topk_group * (E // n_group)))
        elif form == "relu_all_positive":
            r.update(scoring="relu", selection="all_positive", top_k=None, renormalize=False, renorm_min=0.0)
        elif form == "relu_topk":
            r.update(scoring="relu", has_bias=True)
        elif form == "sparsemixer":
            r.update(selection="sparsemixer", score_order="select_then_score", top_k=2, renormalize=False,
                     jitter_eps=rng.choice([0.01, 0.1, 0.5]))
        elif form == "capacity":
            r.update(expert_capacity=rng.randint(1, 4))
        gated = rng.random() < 0.7
        act = rng.choice([a for a in ACTIVATIONS if gated or not a.startswith("clamped")])
        experts = MLPSpec(hidden_size=H, intermediate_size=I, gated=gated, activation=act,
                          activation_alpha=rng.choice([1.702, 1.0]), activation_limit=rng.choice([7.0, 1.5]),
                          has_bias=rng.random() < 0.3)
        shared = None
        if rng.random() < 0.25:
            shared = SharedExpertSpec(MLPSpec(hidden_size=H, intermediate_size=rng.randint(1, 2 * I + 1),
                                              has_bias=rng.random() < 0.2), sigmoid_gate=rng.random() < 0.5)
        extra = rng.choice(["none"] * 6 + ["router_logits", "topk_weights"])
        try:
            router = RouterSpec(**r)
            if router.is_variable_k and extra == "topk_weights":
                extra = "none"
            return MoESpec(router=router, experts=experts, shared=shared, extra_output=extra,
                           has_output_bias=rng.random() < 0.1)
        except ValueError:
            continue  # an invalid combination (e.g. sparsemixer with one expert): draw again


@dataclasses.dataclass
class Case:
    spec: MoESpec
    weights: MoEWeights
    x: torch.Tensor  # [B, S, H] in the case's dtype
    dtype: str
    families: list[str]


def random_case(rng: random.Random, small: bool) -> Case:
    spec = random_spec(rng, small)
    r, e = spec.router, spec.experts
    E, H, I = r.num_experts, e.hidden_size, e.intermediate_size
    dtype_name = rng.choice(["fp32", "fp32", "bf16", "fp16"])
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    families = []

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean

    negative = rng.random() < 0.35
    if negative:
        families.append("negative biases")
    w = MoEWeights(router_weight=rnd(E, H, std=rng.choice([0.3, 1.0, 3.0]) / math.sqrt(H)),
                   w1=rnd(E, e.fc1_rows, H, std=1 / math.sqrt(H)), w2=rnd(E, H, I, std=1 / math.sqrt(I)))
    if r.has_bias:
        w.router_bias = rnd(E, std=1.0, mean=-1.5 if negative else 0.0)
    if r.has_correction_bias:
        w.correction_bias = rnd(E, std=0.3, mean=-0.5 if negative else 0.0)
    if e.has_bias:
        w.b1, w.b2 = rnd(E, e.fc1_rows, std=0.1), rnd(E, H, std=0.1)
    if spec.shared is not None:
        s = spec.shared.mlp
        w.shared_w1, w.shared_w2 = rnd(s.fc1_rows, H, std=1 / math.sqrt(H)), rnd(H, s.intermediate_size,
                                                                               std=1 / math.sqrt(s.intermediate_size))
        if s.has_bias:
            w.shared_b1, w.shared_b2 = rnd(s.fc1_rows, std=0.1), rnd(H, std=0.1)
        if spec.shared.sigmoid_gate:
            w.shared_gate = rnd(1, H, std=1 / math.sqrt(H))
    if spec.has_output_bias:
        w.output_bias = rnd(H, std=0.1)
    ties = E > 1 and rng.random() < 0.2
    if ties:  # duplicated router rows (and biases): exact ties between experts, decided by the lower index
        families.append("ties")
        for _ in range(rng.randint(1, max(1, E // 2))):
            a, b = rng.randrange(E), rng.randrange(E)
            w.router_weight[b] = w.router_weight[a]
            for name in ("router_bias", "correction_bias"):
                if getattr(w, name) is not None:
                    getattr(w, name)[b] = getattr(w, name)[a]
    # tokens: 0, 1, odd and large, within the oracle's work bound
    T = rng.choice([0, 1, 2, 3, 5, 7]) if rng.random() < 0.2 else _log_int(rng, 1, 64 if small else 4096)
    work = max(1, (r.top_k or max(1, E // 4)) + (1 if spec.shared else 0)) * H * I
    T = min(T, max(1, int(MAX_WORK / work)))
    S = rng.randint(1, max(1, T)) if r.expert_capacity is not None else max(1, T)
    B = T // S if T else 0
    x = rnd(B, S if T else 3, H, std=rng.choice([0.5, 1.0, 2.0]))
    if ties and T and rng.random() < 0.5:  # zero inputs: every logit is its bias, so duplicated biases tie
        flat = x.view(-1, H)
        flat[torch.randperm(flat.shape[0], generator=gen)[:max(1, flat.shape[0] // 8)]] = 0.0
    if T and rng.random() < 0.08:
        families.append("NaN/Inf inputs")
        flat = x.view(-1, H)
        for t in torch.randperm(flat.shape[0], generator=gen)[:max(1, flat.shape[0] // 50)].tolist():
            flat[t, rng.randrange(H)] = rng.choice([float("nan"), float("inf"), float("-inf")])
    weights = MoEWeights(**{n: None if t is None else t.to(dtype) for n, t in w.items()})
    if weights.correction_bias is not None:
        weights.correction_bias = weights.correction_bias.float()  # kept in float32, as the fuse pass keeps it
    return Case(spec, weights, x.to(dtype), dtype_name, families or ["random"])


# ---------------------------------------------------------------------------------------------- one check


class lower_index_ties(onnx_topk_ties):
    """torch.topk (as onnx_topk_ties) and also max over a dim break exact ties by the lower index, as the kernels
    and the oracle do (torch leaves the order among ties unspecified; the reference uses the ops the original blocks
    use, so it inherits theirs)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.max, torch.Tensor.max) and (len(args) > 1 or "dim" in kwargs):
            x, dim = args[0], args[1] if len(args) > 1 else kwargs["dim"]
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            values, indices = topk_lower_index_first(x, 1, dim=dim)
            if not keepdim:
                values, indices = values.squeeze(dim), indices.squeeze(dim)
            return torch.return_types.max((values, indices))
        return super().__torch_function__(func, types, args, kwargs)


@dataclasses.dataclass
class Outcome:
    status: str  # "ok" | "mismatch" | "refused" | "crash"
    tokens: int = 0
    ambiguous: int = 0
    detail: str = ""
    kernels: bool = False


def check_case(case: Case, device: str, backend: str) -> Outcome:
    """FusedMoE (run_block) on the case against the oracle; see the module docstring for what agrees."""
    from moecompile.kernels import moe as kernel_moe

    spec, x = case.spec, case.x
    B, S, H = x.shape
    T = B * S
    weights = MoEWeights(**{n: None if t is None else t.to(device) for n, t in case.weights.items()})
    xd = x.to(device)
    kernels = device != "cpu" or backend == "triton"
    if kernels:
        kernels = kernel_moe.unsupported_reason(spec, weights, xd.reshape(-1, H)) is None
    try:
        with torch.no_grad(), lower_index_ties():
            out = run_block(spec, weights, xd, backend=backend if kernels else "auto")
    except MoECompileError as exc:
        return Outcome("refused", T, detail=str(exc)[:300], kernels=kernels)
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported with its traceback
        return Outcome("crash", T, detail=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}",
                       kernels=kernels)
    y, aux = (out if isinstance(out, tuple) else (out, None))
    y = y.reshape(T, H).double().cpu()
    want, logits, ambiguous, magnitude = fuzz_oracle.forward(spec, case.weights, x.reshape(T, H), max(S, 1))
    if device == "cpu" and x.dtype == torch.bfloat16 and not x.isfinite().all() and _cpu_bf16_gemm_spreads_nan():
        # torch's CPU bf16 GEMM on some CPUs (oneDNN's AMX kernels) turns a row next to a NaN row into NaN: the
        # user's own model computes the same there. Such tokens are left out with the ambiguous ones.
        ambiguous = ambiguous | (~y.isfinite().all(dim=1) & want.isfinite().all(dim=1))
    problems = _compare(y, want, x.reshape(T, H), ambiguous, TOL[x.dtype], magnitude)
    if aux is not None and spec.extra_output == "router_logits" and T:
        problems += _compare(aux.reshape(T, -1).double().cpu(), logits, x.reshape(T, H), ambiguous, TOL[x.dtype],
                             logits.abs(), what="router logits")
    if problems:
        return Outcome("mismatch", T, int(ambiguous.sum()), "; ".join(problems), kernels)
    return Outcome("ok", T, int(ambiguous.sum()), kernels=kernels)


@functools.lru_cache(maxsize=1)
def _cpu_bf16_gemm_spreads_nan() -> bool:
    """Whether this CPU's bf16 GEMM gives NaN in a row whose inputs are finite when a neighbouring row is NaN."""
    x = torch.ones(179, 58, dtype=torch.bfloat16)  # a shape seen to do it (an odd K)
    x[5] = float("nan")
    y = torch.nn.functional.linear(x, torch.ones(148, 58, dtype=torch.bfloat16))
    return bool(y[torch.arange(179) != 5].isnan().any())


def _compare(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, ambiguous: torch.Tensor, tol: float,
             magnitude: torch.Tensor, what: str = "output") -> list[str]:
    """Per token: max |got - want| <= tol x max(the block's largest |want|, the token's largest magnitude) (where
    terms cancel, rounding scales with the terms, not with their sum)."""
    if got.shape != want.shape:
        return [f"{what} shape {tuple(got.shape)} != {tuple(want.shape)}"]
    if got.numel() == 0:
        return []
    # a token whose exact output is beyond the dtype's range (raw logits renormalised by a sum near 0 reach 1e18)
    # overflows in any implementation of that dtype: left out, with the ambiguous ones
    judged = ~ambiguous & ~(want.abs() > RANGE[x.dtype]).any(dim=1)
    finite_in = x.isfinite().all(dim=1) & judged
    problems = []
    pattern = (got.isfinite() != want.isfinite()).any(dim=1) & judged
    if pattern.any():
        t = int(pattern.nonzero()[0])
        problems.append(f"{what}: {int(pattern.sum())} tokens finite where the oracle's is not, or the reverse "
                        f"(token {t}: input finite {bool(x[t].isfinite().all())}, got {got[t, :4].tolist()}, "
                        f"want {want[t, :4].tolist()})")
    both = finite_in & want.isfinite().all(dim=1) & got.isfinite().all(dim=1)
    if both.any():
        scale = torch.clamp(magnitude[both].amax(dim=1), min=max(want[both].abs().max().item(), 1e-3))
        err = (got[both] - want[both]).abs().amax(dim=1) / scale
        bad = err > tol
        if bad.any():
            rows = both.nonzero().flatten()[bad]
            problems.append(f"{what}: {int(bad.sum())} of {int(both.sum())} tokens over {tol:g} (worst "
                            f"{err.max().item():.3g} at token {int(rows[err[bad].argmax()])})")
    return problems


# ---------------------------------------------------------------------------------------------- campaign


def _bucket(n: int, edges=(0, 1, 16, 256, 4096)) -> str:
    for lo, hi in zip(edges, edges[1:]):
        if n <= lo:
            return str(lo)
        if n <= hi:
            return f"{lo + 1}-{hi}"
    return f">{edges[-1]}"


def run_descriptions(n: int, seed: int, device: str, backend: str, small: bool, budget_s: float,
                     progress: bool = False) -> dict:
    rng = random.Random(seed)
    start = time.perf_counter()
    tally: dict = {"cases": 0, "ok": 0, "mismatch": 0, "refused": 0, "crash": 0, "tokens": 0,
                   "ambiguous_tokens": 0, "kernel_cases": 0, "by_form": {}, "by_dtype": {}, "by_E": {},
                   "by_tokens": {}, "by_family": {}, "findings": []}
    for i in range(n):
        if time.perf_counter() - start > budget_s:
            tally["stopped"] = f"time budget of {budget_s:.0f} s reached after {i} cases"
            break
        case = random_case(rng, small)
        outcome = check_case(case, device, backend)
        r = case.spec.router
        form = ("relu_all_positive" if r.is_variable_k else "sparsemixer" if r.selection == "sparsemixer" else
                "capacity" if r.expert_capacity else "grouped fill 0" if r.group_fill == "zero" else
                "grouped" if r.selection == "grouped_topk" else f"{r.scoring} {r.score_order}")
        tally["cases"] += 1
        tally[outcome.status] += 1
        tally["tokens"] += outcome.tokens
        tally["ambiguous_tokens"] += outcome.ambiguous
        tally["kernel_cases"] += int(outcome.kernels)
        for key, value in (("by_form", form), ("by_dtype", case.dtype), ("by_E", _bucket(r.num_experts)),
                           ("by_tokens", _bucket(outcome.tokens)), *(("by_family", f) for f in case.families)):
            row = tally[key].setdefault(value, {"cases": 0, "bad": 0})
            row["cases"] += 1
            row["bad"] += int(outcome.status in ("mismatch", "crash"))
        if outcome.status != "ok" and len(tally["findings"]) < 50:
            tally["findings"].append({"case": i, "status": outcome.status, "detail": outcome.detail,
                                      "spec": case.spec.summary(), "dtype": case.dtype, "tokens": outcome.tokens,
                                      "families": case.families, "kernels": outcome.kernels})
        if progress and (i + 1) % 500 == 0:
            print(f"  {i + 1} cases, {tally['mismatch']} mismatches, {tally['crash']} crashes, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    tally["seconds"] = round(time.perf_counter() - start, 1)
    return tally


def environment(device: str) -> dict:
    import triton

    import moecompile
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "moecompile": moecompile.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'x86_64'}"
           f", {os.cpu_count()} cores)"}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--descriptions", type=int, default=10000)
    p.add_argument("--blocks", type=int, default=300)
    p.add_argument("--kernel-cases", type=int, default=200, help="cases through the kernels in the Triton "
                   "interpreter (with --kernels-on-cpu)")
    p.add_argument("--kernels-on-cpu", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=3600.0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--summarize", action="store_true", help="only merge the fuzz_*.json in --out into fuzz.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        write_markdown(out)
        return 0
    result = {"environment": environment(args.device), "command": " ".join(["python benchmarks/fuzz_moe.py",
                                                                             *(argv or sys.argv[1:])])}
    backend = "auto"
    print(f"descriptions on {args.device}: {args.descriptions}", flush=True)
    result["descriptions"] = run_descriptions(args.descriptions, args.seed, args.device, backend, small=False,
                                              budget_s=args.budget_s, progress=True)
    if args.kernels_on_cpu:
        print(f"descriptions through the kernels in the Triton interpreter: {args.kernel_cases}", flush=True)
        result["interpreter_kernels"] = run_descriptions(args.kernel_cases, args.seed + 1, "cpu", "triton",
                                                         small=True, budget_s=args.budget_s)
    if args.blocks:
        import fuzz_blocks

        print(f"hand-written blocks through optimize: {args.blocks}", flush=True)
        result["blocks"] = fuzz_blocks.run_blocks(args.blocks, args.seed + 2, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    name = f"fuzz_{args.device}.json" if args.seed == 0 else f"fuzz_{args.device}_seed{args.seed}.json"  # runs add up
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out)
    silent = sum(result[k]["mismatch"] for k in ("descriptions", "interpreter_kernels", "blocks") if k in result)
    crashes = sum(result[k].get("crash", 0) for k in ("descriptions", "interpreter_kernels", "blocks") if k in result)
    print(f"written {out / name}; silent mismatches: {silent}, crashes: {crashes}")
    return 1 if silent or crashes else 0


def write_markdown(out: Path) -> None:
    lines = ["# Fuzz campaign", "", "Random MoE descriptions through FusedMoE against an independent float64 oracle "
             "(benchmarks/fuzz_oracle.py), and random hand-written blocks through `moecompile.optimize` against "
             "themselves. *Silent mismatch*: a wrong answer without an error. Regenerate with the commands in "
             "benchmarks/fuzz_moe.py's docstring.", ""]
    for path in sorted(out.glob("fuzz_*.json")):
        data = json.loads(path.read_text())
        env = data["environment"]
        lines += [f"## {env['device']} ({env['date']})", "",
                  f"torch {env['torch']}, triton {env['triton']}, transformers {env.get('transformers', '-')}, "
                  f"moecompile {env['moecompile']}; `{data['command']}`", "",
                  "| part | cases | ok | silent mismatches | crashes | refused (clear error) | tokens | "
                  "ambiguous tokens left out | through kernels | seconds "
                  "|", "|---|---|---|---|---|---|---|---|---|---|"]
        for part in ("descriptions", "interpreter_kernels", "blocks"):
            if part not in data:
                continue
            t = data[part]
            lines.append(f"| {part} | {t['cases']} | {t['ok']} | {t['mismatch']} | {t.get('crash', 0)} | "
                         f"{t['refused']} | {t['tokens']} | {t.get('ambiguous_tokens', 0)} | "
                         f"{t.get('kernel_cases', '-')} | {t['seconds']} |")
        d = data.get("descriptions")
        if d:
            for key, title in (("by_form", "router form"), ("by_dtype", "dtype"), ("by_E", "experts"),
                               ("by_tokens", "tokens"), ("by_family", "input family")):
                cells = ", ".join(f"{k}: {v['cases']}" + (f" (**{v['bad']} bad**)" if v["bad"] else "")
                                  for k, v in sorted(d[key].items()))
                lines.append(f"\n{title}: {cells}")
            if d.get("stopped"):
                lines.append(f"\n{d['stopped']}")
        b = data.get("blocks")
        if b:
            lines.append("\nblocks by decision: " + ", ".join(f"{k}: {v}" for k, v in sorted(b["decisions"].items())))
            if b.get("left_reasons"):
                lines.append("\nleft, first reasons: " + "; ".join(b["left_reasons"][:5]))
        findings = [f for part in ("descriptions", "interpreter_kernels", "blocks") for f in
                    data.get(part, {}).get("findings", []) if f["status"] in ("mismatch", "crash")]
        if findings:
            lines += ["", "Findings:", ""] + [f"- {f['status']}: {f.get('spec', '')} {f.get('dtype', '')} "
                                              f"{f.get('tokens', '')} tokens: {f['detail'][:300]}" for f in findings]
        lines.append("")
    (out / "fuzz.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
