"""ReMoE (arXiv 2412.14711) at small scale on real text: a LLaMA-style MoE decoder trained from scratch with TopK +
softmax routing (load-balancing loss) and with ReLU routing (ReMoERegularizer, target sparsity 1 - k/E), same data
order, steps and active compute; and the conversion path people use (a trained TopK model converted to ReLU routing
with calibration, fine-tuned with the regulariser, converted back to top-k).

Model: transformers' Mixtral classes (a LLaMA-style decoder: RMSNorm, RoPE, SwiGLU experts) built from a config,
byte-level vocabulary (256), E = 8, k = 1 or 2; both arms are optimized by moecompile so that both run the same
fused kernels (the ReLU arm through `routing="relu"` at initialisation, ReMoE's own start: threshold 0).
Text: the library sources and documentation shipped with the installed packages (the GPU machine cannot download
data), files in sorted order; a file goes to the held-out split when a hash of its path says so (1 in 20), so the
split does not depend on which other files exist.

One run per command, appended to `remoe_repro.json` in --out (one record per run: routing, k, seed, steps,
tokens, val_loss, plus curves):
    python benchmarks/remoe_repro.py --routing topk --k 1 --seed 0 --out benchmarks/results
    python benchmarks/remoe_repro.py --routing relu --k 1 --seed 0 --out benchmarks/results
    python benchmarks/remoe_repro.py --conversion --k 1 --seed 0 --out benchmarks/results   (needs the topk run's
                                                                                           checkpoint in --out)
    python benchmarks/remoe_repro.py --report --out benchmarks/results   (remoe_repro.md and PNG plots; matplotlib)
--tiny runs a minute-long CPU version of the same code (a smoke test, not a result).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

SIZES = {  # about 44M parameters (6.5M active per token at k = 1)
    "small": dict(hidden=512, layers=6, heads=8, inter=512, seq=512, batch=16, lr=1e-3),
    "tiny": dict(hidden=64, layers=2, heads=4, inter=64, seq=64, batch=4, lr=3e-3),
}
EXPERTS = 8
VAL_EVERY = 100
TOKEN_TYPES = ("letter", "digit", "space", "punct", "other")


# ---------------------------------------------------------------- data


def corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, held-out bytes, provenance) from the installed packages' .py/.md/.rst/.txt files."""
    import importlib.util
    roots = []
    for package in ("transformers", "torch", "triton", "onnx"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            roots.append((package, Path(list(spec.submodule_search_locations)[0])))
    train, val, files = bytearray(), bytearray(), 0
    for package, root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".py", ".md", ".rst", ".txt") or not path.is_file():
                continue
            data = path.read_bytes()
            relative = f"{package}/{path.relative_to(root)}"
            held_out = hashlib.sha256(relative.encode()).digest()[0] % 20 == 0
            (val if held_out else train).extend(data + b"\n")
            files += 1
            if len(train) >= max_bytes:
                break
        if len(train) >= max_bytes:
            break
    provenance = dict(packages=[p for p, _ in roots], files=files, train_bytes=len(train), val_bytes=len(val))
    return (torch.frombuffer(bytes(train), dtype=torch.uint8).long(),
            torch.frombuffer(bytes(val), dtype=torch.uint8).long(), provenance)


def batches(data: torch.Tensor, size: dict, seed: int):
    """Endless random windows, the same order for every run with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    seq, batch = size["seq"], size["batch"]
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


def token_type(ids: torch.Tensor) -> torch.Tensor:
    """Index into TOKEN_TYPES per byte."""
    letter = ((ids >= 65) & (ids <= 90)) | ((ids >= 97) & (ids <= 122))
    digit = (ids >= 48) & (ids <= 57)
    space = (ids == 32) | (ids == 9) | (ids == 10) | (ids == 13)
    punct = (ids >= 33) & (ids <= 126) & ~letter & ~digit
    kind = torch.full_like(ids, 4)
    for index, mask in enumerate((letter, digit, space, punct)):
        kind[mask] = index
    return kind


# ---------------------------------------------------------------- model


def build(size: dict, k: int, routing: str, seed: int, device: str):
    import transformers

    import moecompile
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=size["hidden"], intermediate_size=size["inter"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["heads"], num_local_experts=EXPERTS,
        num_experts_per_tok=k, max_position_embeddings=size["seq"], output_router_logits=routing == "topk",
        router_aux_loss_coef=0.01, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routing="relu" without calibration: ReMoE's own start, threshold 0
        model = moecompile.optimize(model, inplace=True, **({"routing": "relu"} if routing == "relu" else {}))
    fused = [m for m in model.modules() if isinstance(m, moecompile.FusedMoE)]
    if len(fused) != size["layers"]:
        raise SystemExit(f"expected {size['layers']} fused blocks, got {len(fused)}:\n{moecompile.report(model)}")
    return model


def fused_blocks(model):
    import moecompile
    return [m for m in model.modules() if isinstance(m, moecompile.FusedMoE)]


@torch.no_grad()
def evaluate(model, val: torch.Tensor, size: dict, device: str, batches_n: int = 8, usage: bool = False) -> dict:
    """Held-out loss on fixed windows; with usage, active experts per token by layer and by token type, and the
    expert load by layer."""
    model.eval()
    gen_batches = batches(val, size, seed=12345)
    losses, counts = [], []
    hooks, recorded = [], []
    if usage:
        for block in fused_blocks(model):
            hooks.append(block.register_logits_hook(lambda logits, b=block: recorded.append((b, logits))))
    by_layer, by_type, load = None, torch.zeros(len(TOKEN_TYPES)), None
    type_counts = torch.zeros(len(TOKEN_TYPES))
    for _ in range(batches_n):
        ids = next(gen_batches).to(device)
        recorded.clear()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, 256),
                                                        ids[:, 1:].reshape(-1)).item())
        if usage:
            kinds = token_type(ids[:, :-1].reshape(-1).cpu())
            active_layers = []
            loads = []
            for block, logits in recorded:
                if block.spec.router.is_variable_k:
                    chosen = logits > 0
                else:
                    top = logits.topk(block.spec.router.top_k, dim=-1).indices
                    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
                active_layers.append(chosen.sum(-1).float().cpu())
                loads.append(chosen.sum(0).float().cpu())
            active = torch.stack(active_layers)  # [L, T]
            by_layer = active.mean(1) if by_layer is None else by_layer + active.mean(1)
            load = torch.stack(loads) if load is None else load + torch.stack(loads)
            per_token = active.mean(0)
            by_type += torch.zeros(len(TOKEN_TYPES)).index_add_(0, kinds, per_token)
            type_counts += torch.bincount(kinds, minlength=len(TOKEN_TYPES)).float()
        counts.append(1)
    for h in hooks:
        h.remove()
    model.train()
    result = dict(val_loss=sum(losses) / len(losses))
    if usage:
        result["active_by_layer"] = (by_layer / len(counts)).tolist()
        result["active_by_token_type"] = {t: (by_type[i] / type_counts[i]).item() if type_counts[i] else None
                                          for i, t in enumerate(TOKEN_TYPES)}
        result["expert_load_by_layer"] = (load / load.sum(1, keepdim=True)).tolist()
    return result


# ---------------------------------------------------------------- training


def steps_for_budget(step_s: float, budget_s: float, steps: int) -> int:
    """How many steps fit budget_s at step_s each (evaluations included at about 5% of the time), at most steps and
    at least 20, rounded down to a multiple of 10."""
    return max(20, min(steps, int(0.95 * budget_s / step_s) // 10 * 10))


def train(model, routing: str, k: int, steps: int, data, val, size: dict, seed: int, device: str,
          lr: float | None = None, warmup: int = 100, record: dict | None = None, eval_every: int = VAL_EVERY,
          budget_s: float | None = None):
    """Trains for steps, or with budget_s for as many steps as the first 10 show fit in it (the learning-rate
    schedule is set to the count fixed then, so a budgeted run is a complete run of that many steps; the other arm
    is then run with that count)."""
    import moecompile
    record = record if record is not None else {}
    lr = lr or size["lr"]
    total = [steps]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total[0]) / total[0]))))
    reg = moecompile.ReMoERegularizer(model, k=k) if routing == "relu" else None
    stream = batches(data, size, seed)
    record.setdefault("curve", [])
    record.setdefault("sparsity_curve", [])
    train_time, tokens = 0.0, 0
    model.train()
    step = 0
    while step < total[0]:
        step += 1
        ids = next(stream).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
            loss = out.loss + (reg() if reg is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if reg is not None:
            reg.step()
        if device == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - start
        tokens += ids[:, :-1].numel()
        if step == 3:
            probe_start = train_time
        if budget_s is not None and step == 10:  # steps 4..10: past the first calls' compiles
            total[0] = steps_for_budget((train_time - probe_start) / 7, budget_s - train_time, steps)
            print(json.dumps(dict(budget_s=budget_s, step_s=(train_time - probe_start) / 7, steps=total[0])),
                  flush=True)
        if reg is not None and (step % 10 == 0 or step == 1):
            record["sparsity_curve"].append([step, reg.sparsity, reg.coefficient])
        if step % eval_every == 0 or step == total[0]:
            point = evaluate(model, val, size, device)
            record["curve"].append([step, out.loss.item(), point["val_loss"]])
            print(json.dumps(dict(step=step, train_loss=out.loss.item(), **point,
                                  sparsity=reg.sparsity if reg else None)), flush=True)
    record.update(steps=record.get("steps", 0) + step, tokens=record.get("tokens", 0) + tokens,
                  tokens_per_s=tokens / train_time)
    if reg is not None:
        reg.remove()
    return record


def append(out: Path, record: dict) -> None:
    path = out / "remoe_repro.json"
    result = json.loads(path.read_text()) if path.exists() else dict(runs=[])
    result["runs"] = [r for r in result["runs"] if r.get("name") != record["name"]] + [record]
    path.write_text(json.dumps(result, indent=1))


def environment(device: str) -> dict:
    import transformers
    import triton
    return dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, transformers=transformers.__version__,
                date=datetime.date.today().isoformat())


def run_one(args, size: dict, device: str, data, val, provenance: dict) -> None:
    name = f"{args.routing}_k{args.k}_s{args.seed}" + ("_tiny" if args.tiny else "")
    model = build(size, args.k, args.routing, args.seed, device)
    record = dict(name=name, routing=args.routing, k=args.k, seed=args.seed, experts=EXPERTS, size=size,
                  parameters=sum(p.numel() for p in model.parameters()), data=provenance, **environment(device))
    train(model, args.routing, args.k, args.steps, data, val, size, args.seed, device, record=record,
          budget_s=args.budget_s)
    record.update(evaluate(model, val, size, device, batches_n=16, usage=True))
    append(Path(args.out), record)
    if args.routing == "topk":  # the conversion path starts from this model
        torch.save(model.state_dict(), Path(args.out) / f"remoe_ckpt_{name}.pt")


def run_conversion(args, size: dict, device: str, data, val, provenance: dict) -> None:
    """TopK model -> routing="relu" with calibration -> fine-tune with the regulariser -> routing="topk"."""
    import moecompile
    source = f"topk_k{args.k}_s{args.seed}" + ("_tiny" if args.tiny else "")
    model = build(size, args.k, "topk", args.seed, device)
    model.load_state_dict(torch.load(Path(args.out) / f"remoe_ckpt_{source}.pt", map_location=device))
    path = [dict(stage="topk (trained)", step=0, **evaluate(model, val, size, device))]
    calibration = [next(batches(val, size, seed=777))[:, :-1].to(device) for _ in range(2)]
    relu = moecompile.optimize(model, routing="relu", calibration=calibration)
    path.append(dict(stage="relu (converted)", step=0, **evaluate(relu, val, size, device)))
    record = dict(name=f"conversion_{source}", routing="topk->relu->topk", k=args.k, seed=args.seed,
                  data=provenance, **environment(device))
    relu.config.output_router_logits = False
    fine = train(relu, "relu", args.k, args.finetune_steps, data, val, size, args.seed + 1, device,
                 lr=size["lr"] / 10, warmup=20, record={}, eval_every=max(1, args.finetune_steps // 6))
    for step, _, val_loss in fine["curve"]:
        path.append(dict(stage="relu (fine-tuning)", step=step, val_loss=val_loss))
    back = moecompile.optimize(relu, routing="topk", k=args.k)
    path.append(dict(stage=f"topk k={args.k} (converted back)", step=args.finetune_steps,
                     **evaluate(back, val, size, device)))
    for point in path:
        print(json.dumps(point), flush=True)
    record.update(steps=args.finetune_steps, tokens=fine["tokens"], val_loss=path[-1]["val_loss"], path=path,
                  sparsity_curve=fine["sparsity_curve"])
    append(Path(args.out), record)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routing", choices=("topk", "relu"), default="topk")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="train as many steps (at most --steps) as fit in this many seconds, judged on the first "
                             "10; the count is recorded for the other arm")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--conversion", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.report:
        from remoe_report import write_report
        write_report(Path(args.out))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES["tiny" if args.tiny else "small"]
    data, val, provenance = corpus(2_000_000 if args.tiny else 200_000_000)
    print(json.dumps(dict(provenance, device=device)), flush=True)
    if args.conversion:
        run_conversion(args, size, device, data, val, provenance)
    else:
        run_one(args, size, device, data, val, provenance)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
