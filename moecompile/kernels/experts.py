"""Expert GEMM kernels: grouped gate/up GEMM with gathered input rows and the activation in its epilogue, and the
grouped down GEMM that applies each pair's routing weight and adds into its token's output row.

Place in the pipeline: the last two launches of the Triton FusedMoE path (kernels/launch.py), walking the block table
dispatch.py wrote. Both are persistent: NUM_PROGS programs loop over (block, column tile[, K split]) tiles, so the
grid does not depend on how many blocks the routing produced and nothing waits on the host. A launch covers the
row blocks [block_lo, block_lo + round_blocks); ReLU routing, whose number of pairs is only bounded by T*E, runs a
fixed number of such rounds through one bounded intermediate buffer (rounds past the last block do nothing).

The backward (kernels/backward.py) runs the down kernel once more, as the input-gradient GEMM (dpre @ W1_e), with
PAIR_ROWS for its deterministic mode.

In DENSE mode the rows are the tokens themselves and there is one expert (the shared experts take this path, with
the same kernels). The down kernel adds with fp32 atomics into a [T, H] fp32 accumulator, so a token's k expert
outputs are summed without a [T*k, H] buffer or a combine pass; a K split (decode) adds its partial sums the same way.

With FP8_BLOCK (routed experts in float8_e4m3fn with one scale per FP8_BLOCK x FP8_BLOCK block, moecompile/fp8.py)
each weight tile is loaded in FP8 (half the bytes of bf16), multiplied by its elements' block scales in fp32 and
rounded to the activations' dtype before the dot: weight-only FP8, the same products as the reference computes
with fp8.dequantize'd weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4, "clamped_swiglu": 5, "clamped_silu": 6}
# arguments that change from call to call with the token count: not specialised (Triton would otherwise compile a
# variant for 1, for multiples of 16 and for the rest), so prefill, decode and the backend's confirmation share one
# compiled kernel per tile config
_PER_CALL = ("T", "block_lo", "round_blocks", "NUM_PROGS")


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b: on the tensor cores in the operands' dtype, or with fp32 operands and exact fp32 products."""
    # if/else, not an early return: Triton 3.6 also compiles the statement after a static if's return, and that
    # dot of mixed dtypes (a 16-bit input beside an fp32 router under autocast) fails to compile
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _activation(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(z) = 2 sigmoid(2z)
    elif ACT == 3:  # NaN kept, as torch's relu keeps it (tl.maximum would return 0: a NaN token made finite)
        return tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        r = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
        return r * r


@triton.jit
def mlp_activation(g, u, alpha, limit, GATED: tl.constexpr, ACT: tl.constexpr):
    """The expert's hidden activation from fp32 gate g and up u (a plain MLP: act(g), u unused)."""
    if GATED:
        if ACT == 5:  # gpt-oss clamped swiglu
            g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)  # torch's clamp keeps NaN
            u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                           propagate_nan=tl.PropagateNan.ALL)
            return (u + 1.0) * (g * tl.sigmoid(g * alpha))
        elif ACT == 6:  # DeepSeek-V4 clamped silu
            g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
            u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                           propagate_nan=tl.PropagateNan.ALL)
            return (g * tl.sigmoid(g)) * u
        else:
            return _activation(g, ACT) * u
    else:
        return _activation(g, ACT)


@triton.jit
def _tile_scales(col_ptrs, k0, col_ok, stride_k, FP8_BLOCK: tl.constexpr):
    """The block scales of an FP8 weight tile whose K rows start at k0, as one [1, BN] row broadcast over K; col_ptrs
    [1, BN]: its columns' scale rows. The tile's K rows sit in one block: launch.py makes BK a power of two up to
    FP8_BLOCK (configs.for_scale_blocks), and k0 is a multiple of BK."""
    return tl.load(col_ptrs + (k0 // FP8_BLOCK) * stride_k, mask=col_ok[None, :], other=0.0)


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive row blocks sweep the column tiles together, so an expert's weight tile
    is read by its row blocks while it is still in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    within = tile % per_group
    return first_m + within % size, within // size


@triton.jit
def _round_blocks(num_blocks_ptr, block_lo, round_blocks, T, BM: tl.constexpr, DENSE: tl.constexpr):
    """Row blocks this launch covers: blocks [block_lo, block_lo + round_blocks) of those dispatch wrote."""
    if DENSE:
        count = tl.cdiv(T, BM)
    else:
        count = tl.maximum(tl.minimum(tl.load(num_blocks_ptr) - block_lo, round_blocks), 0)
    return count


@triton.jit
def _block_rows(m_blk, sorted_pair_ptr, block_expert_ptr, block_end_ptr, T, S, BM: tl.constexpr,
                DENSE: tl.constexpr):
    """(rows of the intermediate buffer, their pair index, their token, row valid, expert) for one row block."""
    rows = m_blk * BM + tl.arange(0, BM)
    if DENSE:
        ok = rows < T
        pair = rows
        token = rows
        expert = m_blk * 0
    else:
        expert = tl.load(block_expert_ptr + m_blk)
        ok = rows < tl.load(block_end_ptr + m_blk)
        pair = tl.load(sorted_pair_ptr + rows, mask=ok, other=0)
        token = pair // S
    return rows, pair, token, ok, expert


@triton.jit(do_not_specialize=_PER_CALL)
def _expert_up_kernel(
    x_ptr, w1_ptr, b1_ptr, h_ptr, pair_weight_ptr,
    sorted_pair_ptr, block_expert_ptr, block_end_ptr, num_blocks_ptr,
    T, H, I, S, block_lo, round_blocks,
    stride_xt, stride_w1e, stride_w1f, stride_w1h, stride_w1u, stride_b1e, stride_b1f, stride_b1u, stride_ht,
    alpha, limit, NUM_PROGS, s1_ptr, stride_s1e, stride_s1f, stride_s1h,
    DENSE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_B1: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FP8_BLOCK: tl.constexpr = 0,
):
    num_m = _round_blocks(num_blocks_ptr, block_lo, round_blocks, T, BM, DENSE)
    num_n = tl.cdiv(I, BN)
    ks = tl.arange(0, BK)
    for tile in range(tl.program_id(0), num_m * num_n, NUM_PROGS):
        m_blk, n_blk = _tile_coords(tile, num_m, num_n, GROUP_M)
        rows, pair, token, row_ok, expert = _block_rows(block_lo + m_blk, sorted_pair_ptr, block_expert_ptr,
                                                        block_end_ptr, T, S, BM, DENSE)
        cols = n_blk * BN + tl.arange(0, BN)
        col_ok = cols < I
        a_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xt + ks[None, :]
        w_base = w1_ptr + expert.to(tl.int64) * stride_w1e
        g_ptrs = w_base + cols.to(tl.int64)[None, :] * stride_w1f + ks[:, None] * stride_w1h
        u_ptrs = g_ptrs + stride_w1u  # up row j from gate row j: I rows on (concatenated), one on (interleaved)
        if WEIGHT_ON_INPUT:
            in_scale = tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        if FP8_BLOCK:  # each weight element's block scale: rows f (gate) and I + f (up) of w1, columns k
            s_base = s1_ptr + expert.to(tl.int64) * stride_s1e
            sg_ptrs = s_base + (cols // FP8_BLOCK)[None, :] * stride_s1f
            su_ptrs = s_base + ((cols + I) // FP8_BLOCK)[None, :] * stride_s1f
        for k0 in range(0, H, BK):
            k_ok = ks < H - k0
            w_ok = k_ok[:, None] & col_ok[None, :]
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if WEIGHT_ON_INPUT:
                a = (a.to(tl.float32) * in_scale[:, None]).to(x_ptr.dtype.element_ty)
            wg = tl.load(g_ptrs, mask=w_ok, other=0.0)
            if FP8_BLOCK:  # dequantized in registers, rounded to x's dtype as the reference's weights are
                sg = _tile_scales(sg_ptrs, k0, col_ok, stride_s1h, FP8_BLOCK)
                wg = (wg.to(tl.float32) * sg).to(x_ptr.dtype.element_ty)
            acc_g = mma(a, wg, acc_g, DOT_FP32)
            if GATED:
                wu = tl.load(u_ptrs, mask=w_ok, other=0.0)
                if FP8_BLOCK:
                    su = _tile_scales(su_ptrs, k0, col_ok, stride_s1h, FP8_BLOCK)
                    wu = (wu.to(tl.float32) * su).to(x_ptr.dtype.element_ty)
                acc_u = mma(a, wu, acc_u, DOT_FP32)
            a_ptrs += BK
            g_ptrs += BK * stride_w1h
            u_ptrs += BK * stride_w1h
        if HAS_B1:
            b_base = b1_ptr + expert.to(tl.int64) * stride_b1e
            acc_g += tl.load(b_base + cols * stride_b1f, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(b_base + stride_b1u + cols * stride_b1f, mask=col_ok,
                                 other=0.0).to(tl.float32)[None, :]
        out = mlp_activation(acc_g, acc_u, alpha, limit, GATED, ACT)
        h_ptrs = h_ptr + (rows - block_lo * BM).to(tl.int64)[:, None] * stride_ht + cols[None, :]
        tl.store(h_ptrs, out.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=_PER_CALL)
def _expert_down_kernel(
    h_ptr, w2_ptr, b2_ptr, out_ptr, pair_weight_ptr, row_scale_ptr,
    sorted_pair_ptr, block_expert_ptr, block_end_ptr, num_blocks_ptr,
    T, H, I, S, block_lo, round_blocks,
    stride_ht, stride_w2e, stride_w2h, stride_w2i, stride_b2e, stride_ot, NUM_PROGS,
    s2_ptr, stride_s2e, stride_s2h, stride_s2i,
    DENSE: tl.constexpr, HAS_B2: tl.constexpr, APPLY_WEIGHT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    PAIR_ROWS: tl.constexpr = False, FP8_BLOCK: tl.constexpr = 0,
):
    num_m = _round_blocks(num_blocks_ptr, block_lo, round_blocks, T, BM, DENSE)
    num_n = tl.cdiv(H, BN)
    k_tiles = tl.cdiv(tl.cdiv(I, BK), SPLIT_K)
    ks = tl.arange(0, BK)
    for tile in range(tl.program_id(0), num_m * num_n * SPLIT_K, NUM_PROGS):
        split = tile % SPLIT_K
        m_blk, n_blk = _tile_coords(tile // SPLIT_K, num_m, num_n, GROUP_M)
        rows, pair, token, row_ok, expert = _block_rows(block_lo + m_blk, sorted_pair_ptr, block_expert_ptr,
                                                        block_end_ptr, T, S, BM, DENSE)
        cols = n_blk * BN + tl.arange(0, BN)
        col_ok = cols < H
        k_begin = split * k_tiles * BK
        a_ptrs = h_ptr + (rows - block_lo * BM).to(tl.int64)[:, None] * stride_ht + (k_begin + ks)[None, :]
        w_ptrs = (w2_ptr + expert.to(tl.int64) * stride_w2e + cols.to(tl.int64)[None, :] * stride_w2h
                  + (k_begin + ks)[:, None] * stride_w2i)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if FP8_BLOCK:  # each weight element's block scale: rows (output columns) and k of w2
            s_ptrs = s2_ptr + expert.to(tl.int64) * stride_s2e + (cols // FP8_BLOCK)[None, :] * stride_s2h
        for kt in range(0, k_tiles):
            k_ok = ks < I - (k_begin + kt * BK)
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if FP8_BLOCK:
                scale = _tile_scales(s_ptrs, k_begin + kt * BK, col_ok, stride_s2i, FP8_BLOCK)
                w = (w.to(tl.float32) * scale).to(h_ptr.dtype.element_ty)
            acc = mma(a, w, acc, DOT_FP32)
            a_ptrs += BK
            w_ptrs += BK * stride_w2i
        if HAS_B2:
            if split == 0:
                acc += tl.load(b2_ptr + expert.to(tl.int64) * stride_b2e + cols, mask=col_ok,
                               other=0.0).to(tl.float32)[None, :]
        if APPLY_WEIGHT:
            acc = acc * tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
        if HAS_ROW_SCALE:
            acc = acc * tl.load(row_scale_ptr + token, mask=row_ok, other=0.0)[:, None]
        if PAIR_ROWS:  # one output row per pair, stored (the backward's deterministic mode sums them in order)
            o_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_ot + cols[None, :]
            tl.store(o_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
        else:
            o_ptrs = out_ptr + token.to(tl.int64)[:, None] * stride_ot + cols[None, :]
            tl.atomic_add(o_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")
