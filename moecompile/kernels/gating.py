"""Gating kernel: router GEMM, scoring, selection and combine weights in one launch, plus per-expert counts.

Place in the pipeline: the first launch of the Triton FusedMoE path (kernels/launch.py); dispatch.py reads the counts it
leaves. With few tokens (one program holds them all) it also dispatches (FUSED_DISPATCH: dispatch.py's
_dispatch_in_program) and zeroes the counts and the output accumulator, so a decode step launches three kernels
fewer. Specialised by constexprs on the block's RouterSpec. Every program owns BLOCK_T tokens: it computes their
[BLOCK_T, E] logits with tl.dot over H, scores them, picks the experts, and adds its picks to counts[E] with atomics.
For ReLU routing (all_positive) the "slots" of a token are all E experts: the gates are written densely, and only
positive ones are counted (dispatch skips the rest), so later work scales with the positive (token, expert) pairs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dispatch import _dispatch_in_program
from .experts import mma

SCORING_CODES = {"none": 0, "softmax": 1, "sigmoid": 2, "sqrtsoftplus": 3, "relu": 4}


@triton.jit
def _score(v, SCORING: tl.constexpr, valid):
    """Elementwise scoring; softmax over axis 1 among `valid` entries."""
    if SCORING == 1:
        v = tl.where(valid, v, float("-inf"))
        m = tl.max(v, axis=1)
        p = tl.where(valid, tl.exp(v - m[:, None]), 0.0)
        return p / tl.sum(p, axis=1)[:, None]
    elif SCORING == 2:
        return tl.sigmoid(v)
    elif SCORING == 3:
        # softplus as torch computes it (linear above 20), then sqrt
        return tl.sqrt(tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0,
                                                                             propagate_nan=tl.PropagateNan.ALL)))))
    elif SCORING == 4:  # NaN kept, as torch keeps it
        return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        return v


@triton.jit
def _first_argmax(v, index, SIZE: tl.constexpr):
    """Index (along axis 1) of the first maximum, NaN counting as the largest value (torch.topk's order). NaN needs
    its own case: tl.max skips it, so a row of NaN real columns beside -inf padding had the padding as its maximum
    and picked expert E, out of range (found by benchmarks/fuzz_moe.py: a NaN token corrupted the counts)."""
    nan = v != v
    m = tl.max(tl.where(nan, float("-inf"), v), axis=1)
    has_nan = tl.max(nan.to(tl.int32), axis=1) > 0
    hit = tl.where(has_nan[:, None], nan, v == m[:, None])
    idx = tl.min(tl.where(hit, index, SIZE), axis=1)
    return tl.where(idx < SIZE, idx, 0)


@triton.jit
def _zero_counts_and_acc(counts_ptr, acc_ptr, T, H, E, E_PAD: tl.constexpr):
    """The one program of a fused-dispatch launch zeroes the counts and the output accumulator itself."""
    experts = tl.arange(0, E_PAD)
    tl.store(counts_ptr + experts, 0, mask=experts < E)
    for i in range(0, T * H, 1024):
        zs = i + tl.arange(0, 1024)
        tl.store(acc_ptr + zs, 0.0, mask=zs < T * H)
    tl.debug_barrier()


@triton.jit
def _router_logits(x_ptr, wr_ptr, sg_ptr, rows64, row_ok, cols, col_ok, H, stride_xt, stride_we,
                   BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                   HAS_SHARED_GATE: tl.constexpr, DOT_FP32: tl.constexpr):
    """The router GEMM over H for BLOCK_T tokens: (logits [BLOCK_T, E_PAD] fp32, the shared gate's pre-sigmoid
    [BLOCK_T] fp32, zeros without one)."""
    hs = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    sg_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_ok = h0 + hs < H
        xa = tl.load(x_ptr + rows64[:, None] * stride_xt + (h0 + hs)[None, :],
                     mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        wb = tl.load(wr_ptr + cols[None, :].to(tl.int64) * stride_we + (h0 + hs)[:, None],
                     mask=col_ok[None, :] & h_ok[:, None], other=0.0)
        if not DOT_FP32:
            wb = wb.to(xa.dtype)  # an fp32 router beside 16-bit inputs takes the fp32 path (no rounding)
        acc = mma(xa, wb, acc, DOT_FP32)
        if HAS_SHARED_GATE:
            g = tl.load(sg_ptr + h0 + hs, mask=h_ok, other=0.0)
            sg_acc += tl.sum(xa.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
    return acc, sg_acc


@triton.jit
def _keep_top_groups(choice, col_ok, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
                     GROUP_FILL_ZERO: tl.constexpr):
    """Grouped top-k's group step: the TOPK_GROUP best groups (by their best score, or the sum of their best two)
    keep their experts' choice scores; the others' experts get -inf, or 0.0 with GROUP_FILL_ZERO."""
    # groups of the real size E / N_GROUP; padding columns (E < E_PAD) form extra groups of -inf scores that are
    # never kept (an earlier version split E_PAD, not E, into N_GROUP groups: wrong for E < 16)
    GS: tl.constexpr = GROUP_SIZE
    NG: tl.constexpr = E_PAD // GROUP_SIZE
    grouped = tl.reshape(choice, (BLOCK_T, NG, GS))
    best = tl.max(grouped, axis=2)
    if GROUP_TOP2 and GS > 1:
        gidx = tl.broadcast_to(tl.arange(0, GS)[None, None, :], (BLOCK_T, NG, GS))
        first = tl.min(tl.where(grouped == best[:, :, None], gidx, GS), axis=2)
        second = tl.max(tl.where(gidx == first[:, :, None], float("-inf"), grouped), axis=2)
        gscore = best + second
    else:
        gscore = best
    gindex = tl.broadcast_to(tl.arange(0, NG)[None, :], (BLOCK_T, NG))
    gscore = tl.where(gindex < N_GROUP, gscore, float("-inf"))
    keep = tl.zeros((BLOCK_T, NG), dtype=tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        g = _first_argmax(gscore, gindex, NG)
        hit = gindex == g[:, None]
        keep = tl.where(hit, 1, keep)
        gscore = tl.where(hit, float("-inf"), gscore)
    keep_e = tl.reshape(tl.broadcast_to(keep[:, :, None], (BLOCK_T, NG, GS)), (BLOCK_T, E_PAD))
    if GROUP_FILL_ZERO:  # unchosen groups' experts compete at 0.0 (padding columns stay out)
        kept = tl.where(keep_e != 0, choice, tl.where(col_ok[None, :], 0.0, float("-inf")))
    else:
        kept = tl.where(keep_e != 0, choice, float("-inf"))
    return kept


@triton.jit
def _pick_k(choice, values, index, kcol, K: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr,
            E_PAD: tl.constexpr):
    """K rounds of first-argmax over `choice`: (the picked experts' `values` [BLOCK_T, K_PAD] fp32, their ids)."""
    picked = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    picked_id = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in tl.static_range(K):
        e = _first_argmax(choice, index, E_PAD)
        hit = index == e[:, None]
        v = tl.sum(tl.where(hit, values, 0.0), axis=1)
        picked = tl.where(kcol == j, v[:, None], picked)
        picked_id = tl.where(kcol == j, e[:, None], picked_id)
        choice = tl.where(hit, float("-inf"), choice)
    return picked, picked_id


@triton.jit(do_not_specialize=["T"])  # one compiled variant for every token count
def _gating_kernel(
    x_ptr, wr_ptr, br_ptr, corr_ptr, sg_ptr,
    logits_ptr, weight_ptr, ids_ptr, counts_ptr, sg_out_ptr,
    sorted_pair_ptr, block_expert_ptr, block_end_ptr, num_blocks_ptr, acc_ptr,
    T, H, E, stride_xt, stride_we,
    renorm_min, scaling,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    SCORING: tl.constexpr, SELECT_FIRST: tl.constexpr, ALL_POSITIVE: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CORR: tl.constexpr, GROUPED: tl.constexpr, N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_TOP2: tl.constexpr, GROUP_FILL_ZERO: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    DOT_FP32: tl.constexpr, FUSED_DISPATCH: tl.constexpr, BM: tl.constexpr,
):
    pid = tl.program_id(0)
    if FUSED_DISPATCH:
        _zero_counts_and_acc(counts_ptr, acc_ptr, T, H, E, E_PAD)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E

    logits, sg_acc = _router_logits(x_ptr, wr_ptr, sg_ptr, rows64, row_ok, cols, col_ok, H, stride_xt, stride_we,
                                    BLOCK_T, E_PAD, BLOCK_H, HAS_SHARED_GATE, DOT_FP32)
    if HAS_SHARED_GATE:
        tl.store(sg_out_ptr + rows, tl.sigmoid(sg_acc), mask=row_ok)
    if HAS_BIAS:
        logits += tl.load(br_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    tl.store(logits_ptr + rows64[:, None] * E + cols[None, :], logits, mask=valid)

    if ALL_POSITIVE:
        # NaN stays NaN (tl.maximum would drop it) and runs its expert, as in the reference
        gates = tl.where(logits != logits, logits, tl.maximum(logits, 0.0)) * scaling
        tl.store(weight_ptr + rows64[:, None] * E + cols[None, :], gates, mask=valid)
        taken = valid & ((gates > 0) | (gates != gates))
        active = tl.sum(taken.to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + cols, active, mask=col_ok, sem="relaxed")
        if FUSED_DISPATCH:  # slot = expert: pair t*E + e
            _dispatch_in_program(tl.broadcast_to(cols[None, :], (BLOCK_T, E_PAD)), rows[:, None] * E + cols[None, :],
                                 taken, counts_ptr, cols, E, sorted_pair_ptr, block_expert_ptr,
                                 block_end_ptr, num_blocks_ptr, BM, 64)
    else:
        # select-then-score picks on the logits and scores the k picked; score-then-select picks on the scores
        if SELECT_FIRST:
            values = logits
        else:
            values = _score(logits, SCORING, row_ok[:, None] & tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD)))
        choice = values
        if HAS_CORR:
            choice += tl.load(corr_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        choice = tl.where(col_ok[None, :], choice, float("-inf"))
        if GROUPED:
            choice = _keep_top_groups(choice, col_ok, BLOCK_T, E_PAD, GROUP_SIZE, N_GROUP, TOPK_GROUP, GROUP_TOP2,
                                      GROUP_FILL_ZERO)
        kcol = tl.broadcast_to(tl.arange(0, K_PAD)[None, :], (BLOCK_T, K_PAD))
        index = tl.broadcast_to(cols[None, :], (BLOCK_T, E_PAD))
        picked, picked_id = _pick_k(choice, values, index, kcol, K, BLOCK_T, K_PAD, E_PAD)
        k_ok = kcol < K
        if SELECT_FIRST:
            picked = _score(picked, SCORING, k_ok)
        picked = tl.where(k_ok, picked, 0.0)
        if RENORM:
            picked = picked / tl.maximum(tl.sum(picked, axis=1), renorm_min)[:, None]
        picked = picked * scaling
        out_ok = row_ok[:, None] & k_ok
        tl.store(weight_ptr + rows64[:, None] * K + kcol, picked, mask=out_ok)
        tl.store(ids_ptr + rows64[:, None] * K + kcol, picked_id, mask=out_ok)
        tl.atomic_add(counts_ptr + picked_id, tl.full((BLOCK_T, K_PAD), 1, tl.int32), mask=out_ok, sem="relaxed")
        if FUSED_DISPATCH:
            _dispatch_in_program(picked_id, rows[:, None] * K + kcol, out_ok, counts_ptr, cols, E, sorted_pair_ptr,
                                 block_expert_ptr, block_end_ptr, num_blocks_ptr, BM, 64)
