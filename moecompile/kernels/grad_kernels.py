"""Triton kernels of the MoE op's backward: the per-row expert gradients and the per-expert weight gradients.

Place in the pipeline: launched by kernels/backward.py, which rebuilds the forward's routing and a dispatch table
(the layout dispatch.py documents: rows grouped by expert in BM-padded segments) and then runs, per expert set:

    _expert_grad_rows_kernel   for each routed row r (pair p = token t, slot s, expert e) and a tile of I columns:
                               recomputes g, u = x_t W1_e^T (gate and up; the forward kept no activations), computes
                               d = dy_t W2_e, h = act(g, u), dh = w_p d, (dg, du) = act'(g, u) dh, the combine-weight
                               gradient dw_p += sum(d * h) over the tile, and stores dpre[r] = (dg, du) and h[r]
    experts._expert_down_kernel  dx_t += dpre[r] W1_e (the forward's down GEMM, reused with W1's strides)
    _expert_wgrad_kernel       dW[e] = sum over e's rows of A[r]^T B[r]: dW1 = dpre^T x, dW2 = (w dy)^T h, and the
                               bias gradients as column sums of A

With the routing weight on the input (Llama 4), the expert sees w_p x_t: g, u are scaled by w_p, dh is d, and
dw_p = sum(dg * g0 + du * u0) over the unscaled products g0, u0. In DENSE mode (the shared experts) the rows are
the tokens and the pair weight is the shared gate's sigmoid (or 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .experts import _block_rows, _round_blocks, _tile_coords, mlp_activation, mma


@triton.jit
def _activation_slope(g, ACT: tl.constexpr):
    """d act(g) / dg for the elementwise activations (experts.ACTIVATION_CODES 0-4), in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476)) + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    elif ACT == 2:
        c = 0.7978845608028654
        t = 2.0 * tl.sigmoid(2.0 * c * (g + 0.044715 * g * g * g)) - 1.0  # tanh
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == 3:
        return tl.where(g > 0, 1.0, 0.0)
    else:
        return 2.0 * tl.where(g > 0, g, 0.0)


@triton.jit
def mlp_activation_grad(g, u, dh, alpha, limit, GATED: tl.constexpr, ACT: tl.constexpr):
    """(d gate, d up) of h = mlp_activation(g, u) for the upstream gradient dh, as torch's autograd computes them
    (clamps pass the gradient where the value is within its bounds, bounds included)."""
    if GATED:
        if ACT == 5:
            gc = tl.minimum(g, limit)
            uc = tl.minimum(tl.maximum(u, -limit), limit)
            s = tl.sigmoid(gc * alpha)
            dg = tl.where(g <= limit, dh * (uc + 1.0) * (s + gc * alpha * s * (1.0 - s)), 0.0)
            du = tl.where((u >= -limit) & (u <= limit), dh * gc * s, 0.0)
            return dg, du
        elif ACT == 6:
            gc = tl.minimum(g, limit)
            uc = tl.minimum(tl.maximum(u, -limit), limit)
            dg = tl.where(g <= limit, dh * uc * _activation_slope(gc, 0), 0.0)
            du = tl.where((u >= -limit) & (u <= limit), dh * gc * tl.sigmoid(gc), 0.0)
            return dg, du
        else:
            dg = dh * u * _activation_slope(g, ACT)
            du = dh * mlp_activation(g, u, alpha, limit, False, ACT)
            return dg, du
    else:
        return dh * _activation_slope(g, ACT), dh


@triton.jit
def pair_grads(g, u, g0, u0, h, d, w, alpha, limit, GATED: tl.constexpr, ACT: tl.constexpr,
               WEIGHT_ON_INPUT: tl.constexpr):
    """For a tile of routed rows: (d gate, d up) and each row's combine-weight gradient, from the activation's
    inputs g, u (scaled and biased as the forward computed them), the unscaled up products g0, u0, the activation
    h, d = dy W2_e and the pair weight w [rows]. Weight on the output: dh = w d and dw = sum(h d); on the input
    (the expert saw w x, so g = w g0): dh = d and dw = sum(dg g0 + du u0)."""
    if WEIGHT_ON_INPUT:
        dg, du = mlp_activation_grad(g, u, d, alpha, limit, GATED, ACT)
        if GATED:
            dw = tl.sum(dg * g0 + du * u0, axis=1)
        else:
            dw = tl.sum(dg * g0, axis=1)
    else:
        dg, du = mlp_activation_grad(g, u, d * w[:, None], alpha, limit, GATED, ACT)
        dw = tl.sum(d * h, axis=1)
    return dg, du, dw


@triton.jit(do_not_specialize=["T", "max_blocks", "NUM_PROGS"])
def _expert_grad_rows_kernel(
    x_ptr, gy_ptr, w1_ptr, w2_ptr, b1_ptr, pw_ptr, dpre_ptr, h_ptr, dw_ptr,
    sorted_pair_ptr, block_expert_ptr, block_end_ptr, num_blocks_ptr,
    T, H, I, S, max_blocks,
    stride_xt, stride_gt, stride_w1e, stride_w1f, stride_w1h, stride_w2e, stride_w2h, stride_w2i, stride_b1e,
    stride_dt, stride_ht, alpha, limit, NUM_PROGS,
    DENSE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_PW: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, DW_PARTIALS: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_m = _round_blocks(num_blocks_ptr, 0, max_blocks, T, BM, DENSE)
    num_n = tl.cdiv(I, BN)
    ks = tl.arange(0, BK)
    for tile in range(tl.program_id(0), num_m * num_n, NUM_PROGS):
        m_blk, n_blk = _tile_coords(tile, num_m, num_n, GROUP_M)
        rows, pair, token, row_ok, expert = _block_rows(m_blk, sorted_pair_ptr, block_expert_ptr, block_end_ptr,
                                                        T, S, BM, DENSE)
        cols = n_blk * BN + tl.arange(0, BN)
        col_ok = cols < I
        x_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xt + ks[None, :]
        gy_ptrs = gy_ptr + token.to(tl.int64)[:, None] * stride_gt + ks[None, :]
        wg_ptrs = w1_ptr + expert.to(tl.int64) * stride_w1e + cols.to(tl.int64)[None, :] * stride_w1f \
            + ks[:, None] * stride_w1h
        wu_ptrs = wg_ptrs + I * stride_w1f
        w2_ptrs = w2_ptr + expert.to(tl.int64) * stride_w2e + ks[:, None] * stride_w2h \
            + cols.to(tl.int64)[None, :] * stride_w2i
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        acc_d = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            k_ok = ks < H - k0
            a_mask = row_ok[:, None] & k_ok[None, :]
            w_mask = k_ok[:, None] & col_ok[None, :]
            a = tl.load(x_ptrs, mask=a_mask, other=0.0)
            acc_g = mma(a, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, DOT_FP32)
            if GATED:
                acc_u = mma(a, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u, DOT_FP32)
            acc_d = mma(tl.load(gy_ptrs, mask=a_mask, other=0.0), tl.load(w2_ptrs, mask=w_mask, other=0.0), acc_d,
                        DOT_FP32)
            x_ptrs += BK
            gy_ptrs += BK
            wg_ptrs += BK * stride_w1h
            wu_ptrs += BK * stride_w1h
            w2_ptrs += BK * stride_w2h
        if HAS_PW:
            pw = tl.load(pw_ptr + pair, mask=row_ok, other=0.0)
        else:
            pw = tl.full((BM,), 1.0, tl.float32)
        g = acc_g
        u = acc_u
        if WEIGHT_ON_INPUT:
            g = g * pw[:, None]
            u = u * pw[:, None]
        if HAS_B1:
            b_base = b1_ptr + expert.to(tl.int64) * stride_b1e
            g += tl.load(b_base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                u += tl.load(b_base + I + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = mlp_activation(g, u, alpha, limit, GATED, ACT)
        h = tl.where(col_ok[None, :], h, 0.0)
        dg, du, dw = pair_grads(g, u, acc_g, acc_u, h, acc_d, pw, alpha, limit, GATED, ACT, WEIGHT_ON_INPUT)
        if HAS_PW:
            if DW_PARTIALS:  # one partial per column tile, summed in order by the caller
                tl.store(dw_ptr + pair.to(tl.int64) * num_n + n_blk, dw, mask=row_ok)
            else:
                tl.atomic_add(dw_ptr + pair, dw, mask=row_ok, sem="relaxed")
        out_mask = row_ok[:, None] & col_ok[None, :]
        d_ptrs = dpre_ptr + rows.to(tl.int64)[:, None] * stride_dt + cols[None, :]
        tl.store(d_ptrs, dg.to(dpre_ptr.dtype.element_ty), mask=out_mask)
        if GATED:
            tl.store(d_ptrs + I, du.to(dpre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_ht + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def _expert_wgrad_kernel(
    a_ptr, b_ptr, out_ptr, db_ptr, pw_ptr, sorted_pair_ptr, row_start_ptr, counts_ptr,
    T, M, N, S, stride_a, stride_b, stride_oe, stride_om, stride_on, stride_dbe,
    DENSE: tl.constexpr, A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, SCALE_A: tl.constexpr,
    SCALE_B: tl.constexpr, HAS_DB: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[e] = sum over expert e's rows r of A[r]^T B[r] ([M, N]), one program per (expert, M tile, N tile); rows
    are taken in table order, so the sum's order is fixed. A and B rows are either the table's rows (dpre, h) or
    the rows' tokens (x, dy); SCALE_A/B multiply them by the pair weight first. HAS_DB: the programs of the first
    N tile also write db[e] = sum of A's rows."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    e = pid // (num_m * num_n)
    m_blk = (pid % (num_m * num_n)) // num_n
    n_blk = pid % num_n
    if DENSE:
        start = 0
        count = T
    else:
        start = tl.load(row_start_ptr + e)
        count = tl.load(counts_ptr + e)
    ms = m_blk * BM + tl.arange(0, BM)
    ns = n_blk * BN + tl.arange(0, BN)
    m_ok = ms < M
    n_ok = ns < N
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    db = tl.zeros((BM,), dtype=tl.float32)
    for r0 in range(0, count, BK):
        ok = r0 + ks < count
        r = start + r0 + ks
        if DENSE:
            pair = r
        else:
            pair = tl.load(sorted_pair_ptr + r, mask=ok, other=0)
        token = pair // S
        if A_BY_TOKEN:
            a_rows = token
        else:
            a_rows = r
        if B_BY_TOKEN:
            b_rows = token
        else:
            b_rows = r
        a = tl.load(a_ptr + a_rows.to(tl.int64)[None, :] * stride_a + ms[:, None], mask=ok[None, :] & m_ok[:, None],
                    other=0.0)  # [BM, BK]: A's rows as columns
        b = tl.load(b_ptr + b_rows.to(tl.int64)[:, None] * stride_b + ns[None, :], mask=ok[:, None] & n_ok[None, :],
                    other=0.0)
        if SCALE_A or SCALE_B:
            scale = tl.load(pw_ptr + pair, mask=ok, other=0.0)
            if SCALE_A:
                a = (a.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
            if SCALE_B:
                b = (b.to(tl.float32) * scale[:, None]).to(b_ptr.dtype.element_ty)
        acc = mma(a, b, acc, DOT_FP32)
        if HAS_DB:
            db += tl.sum(a.to(tl.float32), axis=1)
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if HAS_DB:
        if n_blk == 0:
            tl.store(db_ptr + e.to(tl.int64) * stride_dbe + ms, db.to(db_ptr.dtype.element_ty), mask=m_ok)
