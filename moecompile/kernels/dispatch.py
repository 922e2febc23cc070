"""Dispatch kernel: the (token, slot) pairs the gating kernel chose, grouped by expert, in BLOCK_M-padded segments.

Place in the pipeline: the second launch of the Triton FusedMoE path, between gating.py and the expert GEMMs in
experts.py. Nothing here waits on the host: every program recomputes the segment offsets from counts[E] (E <= a few
hundred, so a prefix sum in registers), claims a row for each of its pairs with an atomic cursor per expert, and the
programs together write the block table the GEMMs walk (block -> expert, block -> end of its expert's rows) and the
number of blocks. Rows within an expert's segment come in no fixed order; each row's result does not depend on it.

When one gating program routes every token (few tokens), it runs the same steps itself after its count atomics
(_dispatch_in_program): no dispatch launch, and no zero-filled counts buffer launched before gating.

Layout written (for BLOCK_M = BM):
    expert e owns rows [start_e, start_e + counts[e]) with start_e = BM * sum_{e' < e} cdiv(counts[e'], BM)
    sorted_pair[row] = the pair index p (token p // S, slot p % S) placed at that row; padding rows are never read
    block_expert[b], block_end[b] for b < num_blocks[0]: the expert of rows [b*BM, b*BM + BM) and its segment's end
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segments(counts, BM: tl.constexpr):
    """(first block after each expert's segment, first row of each segment, blocks in all) for counts [E_PAD]."""
    blocks = (counts + BM - 1) // BM
    block_cum = tl.cumsum(blocks, axis=0)  # inclusive
    return block_cum, (block_cum - blocks) * BM, tl.sum(blocks, axis=0)


@triton.jit
def _write_block_table(pid, nprog, counts, block_cum, row_start, total_blocks, experts,
                       block_expert_ptr, block_end_ptr, num_blocks_ptr, BLOCK_B: tl.constexpr):
    """Programs pid of nprog write block -> expert and block -> end of its expert's rows, and (pid 0) the count."""
    if pid == 0:
        tl.store(num_blocks_ptr, total_blocks)
    for b0 in range(pid * BLOCK_B, total_blocks, nprog * BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        # the expert of block b: how many experts' segments end at or before it
        owner = tl.sum((block_cum[None, :] <= b[:, None]).to(tl.int32), axis=1)
        owner_hot = experts[None, :] == owner[:, None]
        end = tl.sum(tl.where(owner_hot, row_start[None, :] + counts[None, :], 0), axis=1)
        b_ok = b < total_blocks
        tl.store(block_expert_ptr + b, owner, mask=b_ok)
        tl.store(block_end_ptr + b, end, mask=b_ok)


@triton.jit(do_not_specialize=["P"])  # one compiled variant for every token count
def _dispatch_kernel(
    ids_ptr, weight_ptr, counts_ptr, cursor_ptr,
    sorted_pair_ptr, block_expert_ptr, block_end_ptr, num_blocks_ptr,
    P, S, E,
    BM: tl.constexpr, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
    IMPLICIT_IDS: tl.constexpr, SKIP_NONPOSITIVE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    block_cum, row_start, total_blocks = _segments(counts, BM)

    pairs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pairs < P
    if IMPLICIT_IDS:
        expert = pairs % S
    else:
        expert = tl.load(ids_ptr + pairs, mask=ok, other=0)
    if SKIP_NONPOSITIVE:  # ReLU gates: the positive ones and NaN (gating's rule)
        gate = tl.load(weight_ptr + pairs, mask=ok, other=0.0)
        ok = ok & ((gate > 0) | (gate != gate))
    slot = tl.atomic_add(cursor_ptr + expert, tl.full((BLOCK_P,), 1, tl.int32), mask=ok, sem="relaxed")
    onehot = experts[None, :] == expert[:, None]
    base = tl.sum(tl.where(onehot, row_start[None, :], 0), axis=1)
    tl.store(sorted_pair_ptr + base + slot, pairs, mask=ok)
    _write_block_table(pid, nprog, counts, block_cum, row_start, total_blocks, experts,
                       block_expert_ptr, block_end_ptr, num_blocks_ptr, BLOCK_B)


@triton.jit
def _dispatch_in_program(expert, pair, ok, counts_ptr, experts, E,
                         sorted_pair_ptr, block_expert_ptr, block_end_ptr, num_blocks_ptr,
                         BM: tl.constexpr, BLOCK_B: tl.constexpr):
    """Dispatch by the one program that routed every token (gating.py with FUSED_DISPATCH), after its count
    atomics: the same layout as _dispatch_kernel, with no launch of its own. counts_ptr holds counts[E] then E
    cursors; the cursors start at each segment's first row, so an atomic add hands out rows directly."""
    tl.debug_barrier()  # every thread's count atomics are done
    expert_ok = experts < E
    counts = tl.load(counts_ptr + experts, mask=expert_ok, other=0, volatile=True)
    block_cum, row_start, total_blocks = _segments(counts, BM)
    tl.store(counts_ptr + E + experts, row_start, mask=expert_ok)
    tl.debug_barrier()
    row = tl.atomic_add(counts_ptr + E + expert, tl.full(expert.shape, 1, tl.int32), mask=ok, sem="relaxed")
    tl.store(sorted_pair_ptr + row, pair, mask=ok)
    _write_block_table(0, 1, counts, block_cum, row_start, total_blocks, experts,
                       block_expert_ptr, block_end_ptr, num_blocks_ptr, BLOCK_B)
