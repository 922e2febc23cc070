"""ReMoE on the CPU: train a small Mixtral on real text, convert it to ReLU routing, fine-tune it with ReMoE's
adaptive L1 penalty, and convert it back to top-k for fixed-cost deployment; report the held-out loss of each form.

    python examples/remoe_finetune.py            # about 3 minutes on 2 CPU cores
    python examples/remoe_finetune.py --help     # step counts, sizes, seed

The text is Python's own documentation (the pydoc_data package of the standard library), read as bytes: a
byte-level language model with a 256-entry vocabulary. The last topics (alphabetically) are held out.

1. A MixtralForCausalLM (transformers, from its config: 8 experts, top-2) trains for --pretrain-steps with its usual
   loss (cross-entropy plus Mixtral's load-balancing loss): the top-k model one starts from.
2. moecompile.optimize(model, routing="relu", calibration=...) rewrites every router to ReLU(x W^T + b), with a
   per-layer threshold calibrated so that 2 experts per token are active on average (target sparsity 1 - 2/8).
3. The ReLU model trains for --steps with moecompile.ReMoERegularizer (lambda_0 = 1e-8, alpha = 1.2, load-balancing
   weights): the progress bar shows loss, sparsity (share of zero gates) and load (most loaded expert's share
   times E; 1 is even). As a control, the top-2 model trains on for the same steps on the same batches.
4. moecompile.rewrite_routing(model, "topk", k=2) keeps each token's 2 largest ReLU gates (no renormalisation).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings

import torch
import transformers

import moecompile
from moecompile.progress import ProgressBar

E, K = 8, 2


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of Python's documentation topics: (train, held out)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = max(1, len(names) // 10)
    as_ids = lambda keys: torch.tensor(list("".join(topics[k] for k in keys).encode()), dtype=torch.long)  # noqa: E731
    return as_ids(names[:-held]), as_ids(names[-held:])


def build_model(args) -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
        num_local_experts=E, num_experts_per_tok=K, output_router_logits=True, router_aux_loss_coef=0.01,
        tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return transformers.MixtralForCausalLM(config)


def batches(ids: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    """Random windows of the text, forever."""
    while True:
        start = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + seq_len] for s in start.tolist()])


def held_out_loss(model, ids: torch.Tensor, seq_len: int) -> float:
    """Mean next-byte cross-entropy (nats) over the held-out text in consecutive windows."""
    model.eval()
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(16):
            out = model(input_ids=chunk, labels=chunk, output_router_logits=False)
            total += out.loss.item() * chunk.numel()
            count += chunk.numel()
    model.train()
    return total / count


def train(model, data, steps: int, lr: float, desc: str, reg: moecompile.ReMoERegularizer | None = None) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # a short warm-up, then cosine decay to a tenth: the usual schedule, and with the weights moving less at the
    # end, ReMoE's multiplicative controller settles instead of swinging the sparsity on the last steps
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    bar = ProgressBar(steps, desc)
    for _ in range(steps):
        ids = next(data)
        out = model(input_ids=ids, labels=ids, output_router_logits=reg is None)
        loss = out.loss + (reg() if reg is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if reg is None:
            bar.update(loss=out.loss.item())
        else:
            reg.step()
            load = sum(max(v) * len(v) for v in reg.expert_load.values()) / len(reg.expert_load)
            bar.update(loss=out.loss.item(), sparsity=reg.sparsity, load=load, lam=reg.coefficient)


def held_out_sparsity(model, ids: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """Share of zero gates and mean active experts per token, over layers, on held-out text."""
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    stats = moecompile.routing_stats(model, [{"input_ids": w[None]} for w in windows[:16]])
    active = sum(s.mean_active for s in stats) / len(stats)
    return 1 - active / E, active


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300, help="ReLU fine-tuning steps")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="moecompile")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()

    train_ids, test_ids = corpus()
    print(f"text: Python's documentation topics, {train_ids.numel()} bytes to train on, {test_ids.numel()} held out")
    data = lambda seed: batches(train_ids, args.seq_len, args.batch, torch.Generator().manual_seed(seed))  # noqa: E731

    topk = build_model(args)
    train(topk, data(args.seed), args.pretrain_steps, 2e-3, "1/4 top-2 training       ")
    losses = {f"top-2 after {args.pretrain_steps} steps": held_out_loss(topk, test_ids, args.seq_len)}

    calibration = [{"input_ids": ids} for ids, _ in zip(data(args.seed + 1), range(8))]
    relu = moecompile.optimize(copy.deepcopy(topk).eval(), routing="relu", calibration=calibration)
    print(moecompile.report(relu).table())
    losses["ReLU, as converted"] = held_out_loss(relu, test_ids, args.seq_len)
    sparsity_start, _ = held_out_sparsity(relu, test_ids, args.seq_len)

    # the control: the top-2 model trained on for the same steps and batches as the ReLU model
    train(topk, data(args.seed + 2), args.steps, 1e-3, "2/4 top-2, same steps    ")
    losses[f"top-2 after {args.pretrain_steps + args.steps} steps"] = held_out_loss(topk, test_ids, args.seq_len)

    reg = moecompile.ReMoERegularizer(relu, k=K)
    train(relu, data(args.seed + 2), args.steps, 1e-3, "3/4 ReLU fine-tuning     ", reg)
    reg.remove()
    relu.eval()
    losses[f"ReLU, fine-tuned {args.steps} steps"] = held_out_loss(relu, test_ids, args.seq_len)
    sparsity, active = held_out_sparsity(relu, test_ids, args.seq_len)

    back = copy.deepcopy(relu)
    back, changes = moecompile.rewrite_routing(back, "topk", k=K, calibration=calibration)
    print("4/4 back to top-2: " + "; ".join(f"{c.path}: {c.summary()}" for c in changes))
    losses["top-2 from the fine-tuned ReLU"] = held_out_loss(back, test_ids, args.seq_len)

    target = 1 - K / E
    print(f"\nsparsity on held-out text: {sparsity_start:.3f} as converted, {sparsity:.3f} after fine-tuning "
          f"({active:.2f} experts per token); target {target:.3f}, "
          f"{'within' if abs(sparsity - target) <= 0.02 else 'NOT within'} 2 points")
    print("held-out loss (nats per byte; bits per byte in brackets):")
    for name, loss in losses.items():
        print(f"  {name:<34} {loss:.4f}  ({loss / math.log(2):.3f})")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
