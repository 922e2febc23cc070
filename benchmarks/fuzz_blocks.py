"""Random hand-written MoE blocks for the fuzz campaign (benchmarks/fuzz_moe.py): through moecompile.optimize, then
every fused block against the original module on BLOCK_TOKENS fresh tokens.

A block is a recipe drawn at random and run by one generic module, written the ways MoE code is written in public
codebases: the experts as a ModuleList looped over with torch.where / index_add_, as stacked [E, ...] weights
computed densely with einsum and masked, or gathered per (token, slot) and batched with bmm; routers: softmax top-k
(renormalised or not, scaled), top-k then softmax, sigmoid top-k with a router bias, DeepSeek-style groups (sigmoid
scores, a correction bias for the choice, groups scored by max or top-2 sum, the masked groups at -inf or 0.0) and
ReLU gates; SwiGLU / GeGLU / plain GELU, ReLU, ReLU^2 experts, optionally biased, and a shared expert, gated or not.
Biases are drawn negative in half of the blocks (where a 0.0 fill and a -inf fill differ).

The check is independent of describe and confirm: the optimized module and the original on the same fresh tokens,
fp32 on the CPU, each token within 1e-4 of the largest |output|, and every position finite in one exactly where it is
finite in the other (a few tokens carry a NaN). A block optimize leaves alone is counted, with its reason; it is not
a mismatch.
"""
from __future__ import annotations

import random
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_TOKENS = 4096
RTOL = 1e-4
STYLES = ("loop", "dense", "gather")
ROUTERS = ("softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk_bias", "grouped", "relu")
MLPS = ("swiglu", "geglu", "gelu", "relu", "relu2")


def _act(name: str, h: torch.Tensor, inter: int) -> torch.Tensor:
    if name in ("swiglu", "geglu"):
        gate, up = h[..., :inter], h[..., inter:]
        return (F.silu(gate) if name == "swiglu" else F.gelu(gate)) * up
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    return F.relu(h) ** 2


class Expert(nn.Module):
    def __init__(self, H: int, inter: int, mlp: str, bias: bool):
        super().__init__()
        self.mlp, self.inter = mlp, inter
        gated = mlp in ("swiglu", "geglu")
        self.fc1 = nn.Linear(H, 2 * inter if gated else inter, bias=bias)
        self.fc2 = nn.Linear(inter, H, bias=bias)

    def forward(self, x):
        return self.fc2(_act(self.mlp, self.fc1(x), self.inter))


class RandomMoE(nn.Module):
    """One block of a recipe (see the module docstring)."""

    def __init__(self, recipe: dict, gen: torch.Generator):
        super().__init__()
        self.recipe = r = recipe
        H, I, E = r["H"], r["I"], r["E"]
        self.router = nn.Linear(H, E, bias=r["router_bias"])
        self.top_k = r["k"]
        if r["router"] == "grouped":  # the group counts as attributes, as DeepSeek's code keeps them
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
            self.n_group, self.topk_group = r["n_group"], r["topk_group"]
        gated = r["mlp"] in ("swiglu", "geglu")
        F1 = 2 * I if gated else I
        if r["style"] == "loop":
            self.experts = nn.ModuleList(Expert(H, I, r["mlp"], r["expert_bias"]) for _ in range(E))
        else:
            self.w1 = nn.Parameter(torch.randn(E, F1, H, generator=gen) / H ** 0.5)
            self.w2 = nn.Parameter(torch.randn(E, H, I, generator=gen) / I ** 0.5)
        if r["shared"]:
            self.shared_expert = Expert(H, I + 3, "swiglu", False)
            if r["shared"] == "gated":
                self.shared_expert_gate = nn.Linear(H, 1, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    mean = -1.0 if r["negative"] and name in ("router.bias",) else 0.0
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if name == "router.bias" else 0.1) + mean)
                elif name == "e_score_correction_bias":
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (-0.3 if r["negative"] else 0.0))
                elif p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5 * r.get("router_scale", 1.0)
                            if name == "router.weight" else torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [T, E] combine weights (0 where not chosen)."""
        r = self.recipe
        logits = self.router(x)
        k, E = r["k"], r["E"]
        if r["router"] == "relu":
            return F.relu(logits)
        if r["router"] in ("softmax_topk", "softmax_topk_renorm"):
            probs = logits.softmax(-1)
            w, idx = probs.topk(k, dim=-1)
            if r["router"] == "softmax_topk_renorm":
                w = w / w.sum(-1, keepdim=True)
        elif r["router"] == "topk_softmax":
            top, idx = logits.topk(k, dim=-1)
            w = top.softmax(-1)
        elif r["router"] == "sigmoid_topk_bias":
            scores = logits.sigmoid()
            w, idx = scores.topk(k, dim=-1)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * r["scale"]
        else:  # grouped
            T = x.shape[0]
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            grouped = choice.view(T, r["n_group"], -1)
            gscore = grouped.max(-1).values if r["group_score"] == "max" else grouped.topk(2, dim=-1)[0].sum(-1)
            gidx = gscore.topk(r["topk_group"], dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(T, r["n_group"], E // r["n_group"]).reshape(T, -1)
            _, idx = choice.masked_fill(~smask.bool(), r["fill"]).topk(k, dim=-1, sorted=False)
            w = scores.gather(1, idx)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * r["scale"]
        return torch.zeros_like(logits).scatter(1, idx, w)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.recipe
        dense = self._route(x)
        out = torch.zeros_like(x)
        if r["style"] == "loop":
            for e, expert in enumerate(self.experts):
                token = (dense[:, e] != 0).nonzero().flatten()
                if token.numel():
                    out.index_add_(0, token, expert(x[token]) * dense[token, e, None])
        elif r["style"] == "dense":
            h = _act(r["mlp"], torch.einsum("th,efh->etf", x, self.w1), r["I"])
            y = torch.einsum("eti,ehi->eth", h, self.w2)
            out = torch.einsum("eth,te->th", y, dense)
        else:  # gather: each (token, slot) with its expert's weights
            k = r["E"] if r["router"] == "relu" else r["k"]
            w, idx = dense.topk(k, dim=-1) if r["router"] != "relu" else (dense, torch.arange(r["E"]).expand_as(dense))
            xs = x[:, None, :].expand(-1, idx.shape[1], -1).reshape(-1, x.shape[-1], 1)
            h = _act(r["mlp"], torch.bmm(self.w1[idx.reshape(-1)], xs).squeeze(-1), r["I"])
            y = torch.bmm(self.w2[idx.reshape(-1)], h.unsqueeze(-1)).squeeze(-1).view(x.shape[0], -1, x.shape[-1])
            out = (y * w.unsqueeze(-1)).sum(1)
        if r["shared"]:
            s = self.shared_expert(x)
            if r["shared"] == "gated":
                s = s * torch.sigmoid(self.shared_expert_gate(x))
            out = out + s
        return out.reshape(shape)


def random_recipe(rng: random.Random) -> dict:
    router = rng.choice(ROUTERS)
    style = rng.choice(STYLES)
    E = rng.choice([2, 3, 4, 6, 8, 12, 16, 32, 64])
    r = dict(router=router, style=style, E=E, k=rng.randint(1, min(4, E)), H=rng.randint(4, 48) | 1,
             I=rng.randint(4, 48), mlp=rng.choice(MLPS), expert_bias=style == "loop" and rng.random() < 0.3,
             router_bias=router in ("sigmoid_topk_bias", "relu") or rng.random() < 0.2,
             shared=rng.choice([None, None, "plain", "gated"]), negative=rng.random() < 0.5,
             scale=rng.choice([1.0, 2.5]), router_scale=rng.choice([1.0, 3.0]))
    if router == "grouped":
        n_group = rng.choice([g for g in (2, 4, 8) if E % g == 0 and E // g >= 2] or [1])
        if E // n_group < 2:
            r["router"] = "softmax_topk"
        else:
            r.update(n_group=n_group, topk_group=rng.randint(1, n_group), group_score=rng.choice(["max", "top2"]),
                     fill=rng.choice([0.0, float("-inf")]))
            r["k"] = min(r["k"], r["topk_group"] * (E // n_group))
    if style == "gather" and router == "relu" and E > 16:
        r["E"] = 16
    return r


def _compare(got: torch.Tensor, want: torch.Tensor) -> str:
    got, want = got.reshape(-1, got.shape[-1]).double(), want.reshape(-1, want.shape[-1]).double()
    pattern = (got.isfinite() != want.isfinite()).any(dim=1)
    if pattern.any():
        return f"{int(pattern.sum())} tokens finite in one output and not the other"
    ok = want.isfinite().all(dim=1)
    scale = max(want[ok].abs().max().item() if ok.any() else 0.0, 1e-6)
    err = (got[ok] - want[ok]).abs().amax(dim=1) / scale
    bad = int((err > RTOL).sum())
    return f"{bad} of {int(ok.sum())} tokens over {RTOL:g} (worst {err.max().item():.3g})" if bad else ""


def check_block(recipe: dict, seed: int) -> tuple[str, str]:
    """(decision, problem): optimize the block, then the independent check of a fused one ('' when it agrees)."""
    import moecompile

    gen = torch.Generator().manual_seed(seed)
    block = RandomMoE(recipe, gen).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = moecompile.optimize(block, seed=seed % 1000)
    record = moecompile.report(optimized).blocks[0]
    if record.decision != "fused":
        return record.decision, record.reason
    x = torch.randn(16, BLOCK_TOKENS // 16, recipe["H"], generator=gen)
    x[3, 5, 0] = float("nan")  # a NaN token: its output must be non-finite in both or in neither
    with torch.no_grad():
        return "fused", _compare(optimized(x), block(x))


def run_blocks(n: int, seed: int, progress: bool = False) -> dict:
    rng = random.Random(seed)
    start = time.perf_counter()
    tally: dict = {"cases": 0, "ok": 0, "mismatch": 0, "refused": 0, "crash": 0, "tokens": 0, "decisions": {},
                   "left_reasons": [], "findings": []}
    for i in range(n):
        recipe = random_recipe(rng)
        try:
            decision, problem = check_block(recipe, seed * 100003 + i)
        except Exception as exc:  # noqa: BLE001 - a crash is a finding
            decision, problem = "crash", f"{type(exc).__name__}: {exc}"
        tally["cases"] += 1
        tally["decisions"][decision] = tally["decisions"].get(decision, 0) + 1
        if decision == "fused":
            tally["tokens"] += BLOCK_TOKENS
            tally["ok" if not problem else "mismatch"] += 1
        elif decision == "crash":
            tally["crash"] += 1
        else:
            tally["refused"] += 1
            if len(tally["left_reasons"]) < 20:
                tally["left_reasons"].append(f"{recipe['router']}/{recipe['style']}: {problem[:200]}")
        if problem and decision in ("fused", "crash") and len(tally["findings"]) < 50:
            tally["findings"].append({"case": i, "status": "mismatch" if decision == "fused" else "crash",
                                      "detail": problem, "spec": str(recipe)})
        if progress and (i + 1) % 50 == 0:
            print(f"  {i + 1} blocks, {tally['mismatch']} mismatches, {time.perf_counter() - start:.0f} s",
                  flush=True)
    tally["seconds"] = round(time.perf_counter() - start, 1)
    return tally
