"""The MoE op's backward on Triton kernels: gradients of the input, the expert weights and biases, the router, the
shared experts and the output bias, without recomputing the block under autograd.

Place in the pipeline: `moe_backward` (kernels/op.py) calls `backward(...)` here for every call the kernels can run
(`reason(spec)` is None); the rest keep the reference recomputed under autograd. Nothing of the forward is saved but
its inputs, so the memory a training step holds for a block is x and the weights, as with activation
checkpointing. The backward recomputes, in order:

1. routing: the gating kernel (or the reference for the forms it lacks) on the same inputs, so the same experts and
   combine weights as the forward; then a dispatch table built with a stable sort (`pair_table`), so rows keep a
   fixed order within each expert and the weight gradients sum in a fixed order;
2. per expert set (routed, then shared; the routed set through grouped_mm where kernels/grouped_backward.py
   applies): grad_kernels._expert_grad_rows_kernel (recomputes the up GEMM, multiplies
   dy by W2, the activation's derivative, the combine-weight gradient), the forward's down kernel as dx += dpre W1,
   and grad_kernels._expert_wgrad_kernel for dW1, dW2 and the bias gradients;
3. the router and the shared gate: autograd through the reference's routing restricted to the chosen experts
   (`route(..., chosen=ids)`), one [T, E] computation, with the combine-weight gradients from step 2 added to the
   incoming ones (ReMoE's L1 term arrives there when its regulariser reads the op's gates).

Deterministic mode (`torch.use_deterministic_algorithms(True)`): every sum is taken in a fixed order (per-pair
input-gradient rows and per-tile combine-weight partials summed by PyTorch) instead of with atomics. ReLU routing
reads its number of active pairs on the host once per backward (its bound, T * E rows, is too large to allocate).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton

from ..reference import route
from ..spec import MLPSpec, MoESpec, MoEWeights
from . import configs, grouped_backward, router_grad
from .experts import ACTIVATION_CODES, _expert_down_kernel
from .grad_kernels import _expert_grad_rows_kernel, _expert_wgrad_kernel
from .keep import Kept
from .launch import (
    DOTS_IN_FP32,
    gate,
    gate_with_torch,
    gating_fallback_reason,
    max_row_blocks,
    pairs_per_expert,
    slots_of,
)


@contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Autograd for code inside an op's implementation. The dispatcher runs an implementation with the autograd keys
    excluded (it is below autograd), so enable_grad alone records nothing; this lifts that exclusion."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def reason(spec: MoESpec) -> str | None:
    """Why the Triton backward does not take this block (the reference is then recomputed), or None."""
    if spec.router.selection == "sparsemixer":
        return "sparsemixer selection (its weights depend on both rounds' picks)"
    return None


@dataclass(frozen=True)
class Tiles:
    BM: int  # rows per block: the dispatch table's padding
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3


def tiles_for(x: torch.Tensor, dot_fp32: bool) -> Tiles:
    if x.device.type != "cuda":  # the interpreter: small tiles run fastest
        return Tiles(16, 32, 32)
    if dot_fp32:
        return Tiles(32, 32, 16)
    return Tiles(64, 64, 32)


def _persistent_programs(tiles: int, device: torch.device) -> int:
    """Programs for a persistent launch over `tiles` tiles: a few per SM on a GPU, one per tile in the interpreter."""
    return max(1, min(tiles, configs.sm_count_of(device) * 4) if device.type == "cuda" else tiles)


@dataclass
class PairTable:
    """Rows grouped by expert (dispatch.py's layout) plus each expert's first row and row count."""

    sorted_pair: torch.Tensor
    block_expert: torch.Tensor
    block_end: torch.Tensor
    num_blocks: torch.Tensor
    row_start: torch.Tensor
    counts: torch.Tensor
    max_blocks: int

    def launch_args(self) -> tuple:
        return self.sorted_pair, self.block_expert, self.block_end, self.num_blocks


def pair_table(expert_of_pair: torch.Tensor, num_experts: int, BM: int, max_blocks: int) -> PairTable:
    """The dispatch layout for pairs whose expert is expert_of_pair [P] (num_experts: the pair is not routed), built
    with a stable sort: within an expert, rows are in pair order. No host sync."""
    E, device = num_experts, expert_of_pair.device
    counts = pairs_per_expert(expert_of_pair, E + 1)[:E]
    blocks = (counts + BM - 1) // BM
    block_cum = blocks.cumsum(0)
    row_start = (block_cum - blocks) * BM
    order = torch.argsort(expert_of_pair, stable=True)
    expert_sorted = expert_of_pair[order]
    routed = expert_sorted < E
    owner = expert_sorted.clamp(max=E - 1)
    first_of_expert = counts.cumsum(0) - counts
    rank = torch.arange(order.numel(), device=device) - first_of_expert[owner]
    dummy = max_blocks * BM  # where unrouted pairs are written, past the rows the kernels read
    row = torch.where(routed, row_start[owner] + rank, dummy)
    sorted_pair = torch.zeros(dummy + 1, dtype=torch.int32, device=device)
    sorted_pair[row] = order.to(torch.int32)
    block_owner = torch.searchsorted(block_cum, torch.arange(max_blocks, device=device), right=True).clamp(max=E - 1)
    block_end = row_start[block_owner] + counts[block_owner]
    return PairTable(sorted_pair, block_owner.to(torch.int32), block_end.to(torch.int32),
                     block_cum[-1:].to(torch.int32), row_start.to(torch.int32), counts.to(torch.int32), max_blocks)


def _routing(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int):
    """The forward's routing again: (logits [T, E] fp32, slot weights [T, S] fp32, expert ids [T, k] int64 or None
    for ReLU routing)."""
    if gating_fallback_reason(spec) is None:
        logits, weight, ids, *_ = gate(spec, x, weights.router_weight, weights.router_bias, weights.correction_bias,
                                        None, 1, None)
    else:
        logits, weight, ids, *_ = gate_with_torch(spec, weights, x, seq_len)
    if spec.router.is_variable_k:
        return logits, weight, None
    return logits, weight, ids.view(x.shape[0], -1).long()


@dataclass
class ExpertSetGrads:
    dw: torch.Tensor | None  # [P] fp32: gradient of each pair's weight (combine weight or shared gate)
    w1: torch.Tensor | None
    w2: torch.Tensor | None
    b1: torch.Tensor | None
    b2: torch.Tensor | None


def _expert_set_backward(mlp: MLPSpec, x, gy, gx, w1, w2, b1, b2, pair_weight, table: PairTable | None, S: int,
                         weight_on_input: bool, want_weights: bool, want_x: bool, deterministic: bool,
                         tiles: Tiles, dot_fp32: bool) -> ExpertSetGrads:
    """One expert set's gradients; table None: dense (the shared experts, one expert, rows = tokens). Adds the
    input gradient into gx [T, H] fp32."""
    T, H = x.shape
    I, F = mlp.intermediate_size, mlp.fc1_rows
    dense = table is None
    E = 1 if dense else w1.shape[0]
    w1e = w1 if w1.dim() == 3 else w1.unsqueeze(0)
    w2e = w2 if w2.dim() == 3 else w2.unsqueeze(0)
    rows = T if dense else table.max_blocks * tiles.BM
    max_blocks = triton.cdiv(T, tiles.BM) if dense else table.max_blocks
    dpre = torch.empty(rows, F, device=x.device, dtype=x.dtype)
    h = torch.empty(rows, I, device=x.device, dtype=x.dtype)
    has_pw = pair_weight is not None
    num_n = triton.cdiv(I, tiles.BN)
    P = T * S
    dw = None
    if has_pw:
        dw = (torch.empty(P, num_n, device=x.device, dtype=torch.float32) if deterministic
              else torch.zeros(P, device=x.device, dtype=torch.float32))
    one = torch.empty(1, device=x.device, dtype=torch.int32)
    table_args = (one, one, one, one) if dense else table.launch_args()
    b1s = 0 if b1 is None else (b1.stride(0) if b1.dim() == 2 else 0)
    programs = _persistent_programs(max_blocks * num_n, x.device)
    _expert_grad_rows_kernel[(programs,)](
        x, gy, w1e, w2e, b1 if b1 is not None else x, pair_weight if has_pw else x, dpre, h,
        dw if dw is not None else x, *table_args,
        T, H, I, S, max_blocks,
        x.stride(0), gy.stride(0), *w1e.stride(), *w2e.stride(), b1s, dpre.stride(0), h.stride(0),
        float(mlp.activation_alpha), float(mlp.activation_limit), programs,
        DENSE=dense, GATED=mlp.gated, ACT=ACTIVATION_CODES[mlp.activation], HAS_B1=b1 is not None, HAS_PW=has_pw,
        WEIGHT_ON_INPUT=weight_on_input, DW_PARTIALS=deterministic, DOT_FP32=dot_fp32,
        BM=tiles.BM, BN=tiles.BN, BK=tiles.BK, GROUP_M=8, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if dw is not None and deterministic:
        dw = dw.sum(dim=1)
    if want_x:
        _input_grad(x, dpre, w1e, pair_weight, gx, table_args, T, H, F, S, max_blocks, dense,
                    weight_on_input, deterministic, tiles, dot_fp32)
    grads = ExpertSetGrads(dw, None, None, None, None)
    if want_weights:
        db1 = torch.empty(E, F, device=x.device, dtype=torch.float32) if b1 is not None else None
        db2 = torch.empty(E, H, device=x.device, dtype=torch.float32) if b2 is not None else None
        gw1 = _weight_grad(dpre, x, E, F, H, db1, pair_weight, table, S, T, a_by_token=False, scale_a=False,
                           scale_b=weight_on_input, out_dtype=w1.dtype, tiles=tiles, dot_fp32=dot_fp32)
        gw2 = _weight_grad(gy, h, E, H, I, db2, pair_weight, table, S, T, a_by_token=True,
                           scale_a=has_pw and not weight_on_input, scale_b=False, out_dtype=w2.dtype, tiles=tiles,
                           dot_fp32=dot_fp32)
        grads.w1, grads.w2 = gw1.view(w1.shape), gw2.view(w2.shape)
        grads.b1 = None if db1 is None else db1.view(b1.shape).to(b1.dtype)
        grads.b2 = None if db2 is None else db2.view(b2.shape).to(b2.dtype)
    return grads


def _input_grad(x, dpre, w1e, pair_weight, gx, table_args, T, H, F, S, max_blocks, dense, weight_on_input,
                deterministic, tiles: Tiles, dot_fp32: bool) -> None:
    """gx += dpre W1 per row (times the pair weight when it was on the input): the forward's down kernel."""
    out = gx
    if deterministic:  # one row per pair (or token), summed in order below
        out = torch.zeros(T * (1 if dense else S), H, device=x.device, dtype=torch.float32)
    num_n = triton.cdiv(H, tiles.BN)
    programs = _persistent_programs(max_blocks * num_n, x.device)
    apply_weight = weight_on_input and pair_weight is not None
    _expert_down_kernel[(programs,)](
        dpre, w1e, gx, out, pair_weight if apply_weight else gx, gx, *table_args,
        T, H, F, S, 0, max_blocks,
        dpre.stride(0), w1e.stride(0), w1e.stride(2), w1e.stride(1), 0, out.stride(0), programs, gx, 0, 0, 0,
        DENSE=dense, HAS_B2=False, APPLY_WEIGHT=apply_weight, HAS_ROW_SCALE=False, DOT_FP32=dot_fp32,
        BM=tiles.BM, BN=tiles.BN, BK=tiles.BK, SPLIT_K=1, GROUP_M=8, PAIR_ROWS=deterministic,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if deterministic:
        gx += out.view(T, -1, H).sum(dim=1)


def _weight_grad(a, b, E, M, N, db, pair_weight, table: PairTable | None, S, T, *, a_by_token: bool,
                 scale_a: bool, scale_b: bool, out_dtype, tiles: Tiles, dot_fp32: bool) -> torch.Tensor:
    """[E, M, N]: per expert, the sum over its rows of A[r]^T B[r] (db [E, M]: A's row sum, if not None)."""
    out = torch.empty(E, M, N, device=a.device, dtype=out_dtype)
    dense = table is None
    one = torch.empty(1, device=a.device, dtype=torch.int32)
    BMw, BNw, BKw = (tiles.BN, tiles.BN, tiles.BK)
    grid = (E * triton.cdiv(M, BMw) * triton.cdiv(N, BNw),)
    _expert_wgrad_kernel[grid](
        a, b, out, db if db is not None else out, pair_weight if pair_weight is not None else out,
        one if dense else table.sorted_pair, one if dense else table.row_start, one if dense else table.counts,
        T, M, N, S, a.stride(0), b.stride(0), *out.stride(), 0 if db is None else db.stride(0),
        DENSE=dense, A_BY_TOKEN=a_by_token and not dense, B_BY_TOKEN=not a_by_token and not dense,
        SCALE_A=scale_a, SCALE_B=scale_b, HAS_DB=db is not None, DOT_FP32=dot_fp32,
        BM=BMw, BN=BNw, BK=BKw, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def backward(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int, grad_y: torch.Tensor | None,
             grad_logits: torch.Tensor | None, grad_weight: torch.Tensor | None,
             wanted: dict[str, bool], kept: Kept | None = None) -> dict[str, torch.Tensor]:
    """The gradients named in `wanted` (the op's tensor arguments: "x" and MoEWeights' fields) of
    sum(y * grad_y) + sum(logits * grad_logits) + sum(slot_weights * grad_weight). kept: the forward's routing and
    up projection (kernels/keep.py), used instead of recomputing them; its up projection is overwritten."""
    T, H = x.shape
    E, S, r = spec.num_experts, slots_of(spec), spec.router
    grads: dict[str, torch.Tensor] = {}
    if T == 0:
        return {name: torch.zeros_like(x if name == "x" else getattr(weights, name)) for name, w in wanted.items()
                if w}
    x = x.contiguous()
    gy = (torch.zeros_like(x) if grad_y is None else grad_y).to(x.dtype).contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    dot_fp32 = x.dtype == torch.float32 or DOTS_IN_FP32
    tiles = tiles_for(x, dot_fp32)
    # row T: a spare that the grouped path's rows of zeros are added into (see grouped_backward.routed_grads)
    gx_spare = torch.zeros(T + 1, H, device=x.device, dtype=torch.float32)
    gx = gx_spare[:T]

    if kept is not None:
        logits, slot_weight, ids = kept.logits, kept.weight, kept.ids.view(T, -1).long()
    else:
        logits, slot_weight, ids = _routing(spec, weights, x, seq_len)
    pair_weight = slot_weight.reshape(-1).contiguous()
    if ids is None:  # ReLU routing: pair t*E + e runs when its gate is positive (or NaN, as the forward)
        active = (pair_weight > 0) | pair_weight.isnan()
        expert_of_pair = torch.where(active, torch.arange(T * E, device=x.device) % E, E)
        n_active = int(active.sum())  # the host sync the module docstring names
        max_blocks = triton.cdiv(n_active, tiles.BM) + min(E, n_active)
    else:
        expert_of_pair = ids.reshape(-1)
        max_blocks = max_row_blocks(T, S, E, tiles.BM, False)
    want_experts = any(wanted.get(n, False) for n in ("w1", "w2", "b1", "b2"))
    routed = None
    if grouped_backward.unsupported_reason(spec, weights, x) is None:
        try:
            dw_pairs, gw1, gw2, db1, db2 = grouped_backward.routed_grads(
                spec.experts, x, gy, weights.w1, weights.w2, weights.b1, weights.b2, pair_weight, expert_of_pair,
                E, S, T * S if ids is not None else n_active, want_experts,
                gx_spare if wanted.get("x", False) else None, r.weight_on_input,
                None if kept is None else (kept.layout, kept.gu))
        except RuntimeError as exc:  # nothing was changed yet: the Triton backward takes over, with a warning
            grouped_backward.refused(exc)
        else:
            routed = ExpertSetGrads(dw_pairs, gw1, gw2, db1, db2)
    if routed is None:
        table = pair_table(expert_of_pair, E, tiles.BM, max_blocks)
        routed = _expert_set_backward(spec.experts, x, gy, gx, weights.w1, weights.w2, weights.b1, weights.b2,
                                      pair_weight, table, S, r.weight_on_input, want_experts, wanted.get("x", False),
                                      deterministic, tiles, dot_fp32)
    for name in ("w1", "w2", "b1", "b2"):
        if wanted.get(name):
            grads[name] = getattr(routed, name)
    dw = routed.dw
    if weights.b2 is not None and not r.weight_on_input:  # the pair's output includes b2_e: dw += dy . b2_e
        dy_b2 = gy.float() @ weights.b2.float().t()  # [T, E]
        dw = dw + (dy_b2.reshape(-1) if ids is None else dy_b2.gather(1, ids).reshape(-1))

    d_shared_gate = None
    if spec.shared is not None:
        sg = None
        if weights.shared_gate is not None:
            sg = torch.sigmoid(torch.nn.functional.linear(x, weights.shared_gate).float().view(-1)).contiguous()
        want_shared = any(wanted.get(n, False) for n in ("shared_w1", "shared_w2", "shared_b1", "shared_b2"))
        shared = _expert_set_backward(spec.shared.mlp, x, gy, gx, weights.shared_w1, weights.shared_w2,
                                      weights.shared_b1, weights.shared_b2, sg, None, 1, False, want_shared,
                                      wanted.get("x", False), deterministic, tiles, dot_fp32)
        for name in ("w1", "w2", "b1", "b2"):
            if wanted.get("shared_" + name):
                grads["shared_" + name] = getattr(shared, name)
        d_shared_gate = shared.dw
        if d_shared_gate is not None and weights.shared_b2 is not None:
            d_shared_gate = d_shared_gate + gy.float() @ weights.shared_b2.float()

    _router_grads(spec, weights, x, seq_len, ids, logits, grad_logits, grad_weight, dw.view(T, S), d_shared_gate,
                  wanted, grads, gx)
    if wanted.get("output_bias"):
        grads["output_bias"] = gy.float().sum(dim=0).to(weights.output_bias.dtype)
    if wanted.get("correction_bias"):  # counts for choice only
        grads["correction_bias"] = torch.zeros_like(weights.correction_bias)
    if wanted.get("x"):
        grads["x"] = gx.to(x.dtype)
    return grads


def _router_grads(spec: MoESpec, weights: MoEWeights, x, seq_len, ids, logits, grad_logits, grad_weight, dw,
                  d_shared_gate, wanted, grads, gx) -> None:
    """Router weight and bias, shared gate, and the input's share through them (added into gx): in closed form
    (kernels/router_grad.py) for the common top-k forms without a shared gate, else autograd through the
    reference's routing of the chosen experts; a [T, E] computation either way."""
    names = [n for n in ("router_weight", "router_bias", "shared_gate") if wanted.get(n)]
    if not names and not wanted.get("x"):
        return
    grad_slots = dw if grad_weight is None else dw + grad_weight
    if ids is not None and d_shared_gate is None and router_grad.closed_form_reason(spec.router) is None:
        dz = router_grad.logits_grad(spec.router, logits, ids, grad_slots, grad_logits)
        wr = weights.router_weight
        if wanted.get("x"):
            gx.addmm_(dz, wr.float())  # in place: no [T, H] fp32 temporary
        if wanted.get("router_weight"):
            # in x's dtype (16-bit: one GEMM accumulating in fp32, as HF's bf16 router), not an fp32 copy of x and a
            # SIMT sgemm; dz rounded to x's dtype
            grads["router_weight"] = (dz.t().to(x.dtype) @ x).to(wr.dtype)
        if wanted.get("router_bias"):
            grads["router_bias"] = dz.sum(dim=0).to(weights.router_bias.dtype)
        return
    with autograd_inside_op(), torch.enable_grad():
        xl = x.detach().requires_grad_(bool(wanted.get("x")))
        leaves = {n: getattr(weights, n).detach().requires_grad_(n in names) if getattr(weights, n) is not None
                  else None for n in ("router_weight", "router_bias", "shared_gate")}
        routing = route(spec.router, MoEWeights(router_weight=leaves["router_weight"], w1=weights.w1, w2=weights.w2,
                                                router_bias=leaves["router_bias"],
                                                correction_bias=weights.correction_bias), xl, seq_len, chosen=ids)
        outputs = [routing.slot_weights(spec.router.scaling_factor)]
        incoming = [grad_slots]
        if grad_logits is not None:
            outputs.append(routing.logits)
            incoming.append(grad_logits)
        if d_shared_gate is not None:
            outputs.append(torch.sigmoid(torch.nn.functional.linear(xl, leaves["shared_gate"]).float().view(-1)))
            incoming.append(d_shared_gate)
        targets = ([xl] if wanted.get("x") else []) + [leaves[n] for n in names]
        found = torch.autograd.grad(outputs, targets, incoming, allow_unused=True)
    found = list(found)
    if wanted.get("x"):
        gx_router = found.pop(0)
        if gx_router is not None:
            gx += gx_router.float()
    for name, g in zip(names, found):
        grads[name] = torch.zeros_like(getattr(weights, name)) if g is None else g.to(getattr(weights, name).dtype)
