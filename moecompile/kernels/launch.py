"""The kernels' launch path: one MoE block's forward as a sequence of Triton launches on CUDA tensors (or on the
CPU under TRITON_INTERPRET=1), without a host sync.

Place in the pipeline: below the op (kernels/op.py) and the eager shortcut (kernels/moe.py's `run`), which both call
`launch`. In order: gating (router GEMM, scoring, selection, counts), dispatch (rows grouped by expert), the shared
experts' up and down GEMMs (dense rows, on a side stream), then the routed experts' up and down GEMMs, which add into
one fp32 [T, H] accumulator; the result is cast to the input's dtype. With hundreds of rows an expert (bf16 on
Hopper) the routed experts' GEMMs are CUTLASS's grouped GEMM instead (kernels/grouped.py). Every allocation's size
depends on shapes only. Router forms the gating kernel does not cover (sparsemixer, expert capacity,
non-power-of-two expert groups) route with the PyTorch reference and share everything after it. Few tokens replay
the launches from a CUDA graph (kernels/graphs.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import triton

from .. import fp8
from ..reference import reference_forward, route
from ..spec import MoESpec, MoEWeights
from ..state import kept
from . import configs, graphs, grouped
from .dispatch import _dispatch_kernel
from .experts import ACTIVATION_CODES, _expert_down_kernel, _expert_up_kernel
from .gating import SCORING_CODES, _gating_kernel
from .keep import Kept
from .settings import settings

INTERPRETED = type(_gating_kernel).__name__ == "InterpretedFunction"
# The interpreter (triton 3.9) miscomputes 16-bit tl.dot with masked loads; there every dot upcasts its operands to
# fp32, which computes the same products (exact in fp32) with the same fp32 accumulation as the tensor cores.
DOTS_IN_FP32 = INTERPRETED
MAX_KERNEL_EXPERTS = 1024
RELU_ROUND_SLOTS = 16  # ReLU routing: one round's intermediate buffer has room for this many experts per token


def _empty(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(*shape, device=device, dtype=dtype)
    if settings.poison_buffers:
        out.fill_(float("nan") if dtype.is_floating_point else 2**30)
    return out


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gating_fallback_reason(spec: MoESpec) -> str | None:
    """Why the gating kernel does not take this router (it then routes with PyTorch), or None."""
    r = spec.router
    if r.selection == "sparsemixer":
        return "sparsemixer selection"
    if r.has_capacity:
        return "expert capacity"
    if r.num_experts > MAX_KERNEL_EXPERTS:
        return f"more than {MAX_KERNEL_EXPERTS} experts"
    if r.selection == "grouped_topk" and (r.num_experts != _pow2(r.num_experts) or r.n_group != _pow2(r.n_group)):
        return "expert groups that are not powers of two"
    return None


def unsupported_reason(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> str | None:
    """Why this call cannot run on the Triton kernels at all (FusedMoE then uses the reference), or None."""
    if x.device.type != "cuda" and not INTERPRETED:
        return "input is not on a CUDA device (on the CPU the kernels run only with TRITON_INTERPRET=1 set)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"input dtype {x.dtype}"
    for name in ("w1", "w2", "shared_w1", "shared_w2"):
        w = getattr(weights, name)
        if w is not None and w.dtype != x.dtype and not fp8.is_fp8(w):
            return f"{name} is {w.dtype}, input is {x.dtype}"
    if fp8.has_fp8(weights):
        return _fp8_reason(weights, x)
    return None


def _fp8_reason(weights: MoEWeights, x: torch.Tensor) -> str | None:
    """Why FP8 expert weights cannot run on the kernels here, or None."""
    for up, down in (("w1", "w2"), ("shared_w1", "shared_w2")):
        if fp8.is_fp8(getattr(weights, up)) != fp8.is_fp8(getattr(weights, down)):
            return f"FP8 for one of {up} and {down} only (the kernels take both or neither)"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        return "FP8 weights need a GPU of compute capability 8.9 or later (Ada, Hopper)"
    return None


def slots_of(spec: MoESpec) -> int:
    """Slots per token in the routing the op returns: k, or every expert for ReLU routing."""
    return spec.num_experts if spec.router.is_variable_k else spec.router.top_k


# ---------------------------------------------------------------- launches

# Set while a compiled graph traces the launches themselves (run(): static shapes, no gradient): each kernel goes
# through torch.library.wrap_triton, so Inductor sees the allocations and launches and calls the kernels from its
# own generated code, with no custom-op dispatch or Python launcher per call. Everything then runs on one stream.
TRACED_LAUNCHES: ContextVar[bool] = ContextVar("moecompile_traced_launches", default=False)


def _kernel(kernel):
    return torch.library.wrap_triton(kernel) if TRACED_LAUNCHES.get() else kernel


def _experts_pad(num_experts: int) -> int:
    """The expert axis as gating and dispatch lay it out in registers (the same in both: gating may dispatch)."""
    return max(16, _pow2(num_experts))


def gating_block_tokens(num_experts: int) -> int:
    """Tokens one gating program routes (its [BLOCK_T, E] logits tile stays in registers)."""
    E_PAD = _experts_pad(num_experts)
    return 64 if E_PAD <= 64 else (32 if E_PAD <= 256 else 16)


def gate(spec: MoESpec, x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
         correction_bias: torch.Tensor | None, shared_gate: torch.Tensor | None, BM: int, acc: torch.Tensor | None
         ) -> tuple:
    """The gating launch. When one program holds every token it also dispatches (rows in BM blocks) and zeroes
    `acc`: the table is returned; otherwise it is None, and acc and dispatch are the caller's. Without an `acc`
    (None) gating never dispatches."""
    r = spec.router
    T, H = x.shape
    E, S = r.num_experts, slots_of(spec)
    E_PAD = _experts_pad(E)
    BLOCK_T = gating_block_tokens(E)
    fused = T <= BLOCK_T and acc is not None
    logits = _empty(T, E, device=x.device, dtype=torch.float32)
    weight = _empty(T, S, device=x.device, dtype=torch.float32)
    ids = _empty(1 if r.is_variable_k else T * S, device=x.device, dtype=torch.int32)  # ReLU: slot = expert
    if fused:
        counts_cursor = _empty(2 * E, device=x.device, dtype=torch.int32)  # the kernel zeroes the counts
        table, _ = _dispatch_buffers(T, S, E, BM, r.is_variable_k, x.device)
    else:
        counts_cursor = torch.zeros(2 * E, device=x.device, dtype=torch.int32)
        table = None
    sg = _empty(T, device=x.device, dtype=torch.float32) if shared_gate is not None else None
    router_weight = router_weight.contiguous()
    if shared_gate is not None:
        shared_gate = shared_gate.reshape(-1).contiguous()
    dummy = logits
    sorted_pair, block_expert, block_end, num_blocks = table if fused else (ids, ids, ids, ids)
    _kernel(_gating_kernel)[(triton.cdiv(T, BLOCK_T),)](
        x, router_weight, router_bias if router_bias is not None else dummy,
        correction_bias if correction_bias is not None else dummy,
        shared_gate if shared_gate is not None else x,
        logits, weight, ids, counts_cursor, sg if sg is not None else dummy,
        sorted_pair, block_expert, block_end, num_blocks, acc if acc is not None else dummy,
        T, H, E, x.stride(0), router_weight.stride(0),
        float(r.renorm_min), float(r.scaling_factor),
        K=S if not r.is_variable_k else 1, K_PAD=max(2, _pow2(S)), E_PAD=E_PAD, BLOCK_T=BLOCK_T, BLOCK_H=64,
        SCORING=SCORING_CODES[r.scoring], SELECT_FIRST=r.score_order == "select_then_score",
        ALL_POSITIVE=r.is_variable_k, RENORM=r.renormalize, HAS_BIAS=router_bias is not None,
        HAS_CORR=correction_bias is not None, GROUPED=r.selection == "grouped_topk", N_GROUP=r.n_group,
        TOPK_GROUP=r.topk_group, GROUP_SIZE=max(1, E // r.n_group), GROUP_TOP2=r.group_score == "top2_sum",
        GROUP_FILL_ZERO=r.group_fill == "zero", HAS_SHARED_GATE=sg is not None,
        DOT_FP32=x.dtype == torch.float32 or router_weight.dtype == torch.float32 or DOTS_IN_FP32,
        FUSED_DISPATCH=fused, BM=BM,
        num_warps=4,
    )
    return logits, weight, ids, counts_cursor, sg, table


def gate_with_torch(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int) -> tuple:
    """Routing by the reference for router forms the gating kernel lacks; counts without bincount (no host sync)."""
    routing = route(spec.router, weights, x, seq_len)
    T, E, k = x.shape[0], spec.num_experts, spec.router.top_k
    ids = routing.expert_index.view(T, k).to(torch.int32)
    counts_cursor = _counts_cursor(ids, E)
    sg = None
    if weights.shared_gate is not None:
        sg = torch.sigmoid(torch.nn.functional.linear(x, weights.shared_gate).float().view(-1))
    return routing.logits.float(), routing.weight.view(T, k).float(), ids, counts_cursor, sg


def pairs_per_expert(expert_of_pair: torch.Tensor, bins: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[bins]: how many pairs name each expert (ids in [0, bins)), added into `out` (zeros of that length) or into
    new int64 zeros. torch.bincount reads its input's maximum on the host on CUDA (a sync in the middle of a
    forward or backward, and a data-dependent length when traced); a scatter-add does neither."""
    counts = torch.zeros(bins, device=expert_of_pair.device, dtype=torch.int64) if out is None else out
    ids = expert_of_pair.reshape(-1).long()
    return counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))


def _counts_cursor(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Dispatch's counts-and-cursor buffer [2E] int32 for int32 ids made outside the gating kernel: rows per expert,
    then E zeros for dispatch's cursors."""
    counts_cursor = torch.zeros(2 * E, device=ids.device, dtype=torch.int32)
    pairs_per_expert(ids, E, out=counts_cursor[:E])
    return counts_cursor


def max_row_blocks(T: int, S: int, E: int, BM: int, implicit: bool) -> int:
    """Most BM-row blocks the dispatch layout can need: every block but one per expert is full. With implicit ids
    (ReLU routing: slot s is expert s) no expert gets more than T rows, so also at most E * cdiv(T, BM). Top-k ids
    come from the router and are not trusted to be distinct (NaN scores), so they get only the first bound."""
    P = T * S
    bound = triton.cdiv(P, BM) + min(E, P)
    return min(bound, E * triton.cdiv(T, BM)) if implicit else bound


def _dispatch_buffers(T: int, S: int, E: int, BM: int, implicit: bool, device: torch.device):
    """Dispatch's outputs (sorted_pair, block_expert, block_end, num_blocks), unwritten, and their block bound."""
    max_blocks = max_row_blocks(T, S, E, BM, implicit)
    table = (_empty(max_blocks * BM, device=device, dtype=torch.int32),
             _empty(max_blocks, device=device, dtype=torch.int32),
             _empty(max_blocks, device=device, dtype=torch.int32),
             _empty(1, device=device, dtype=torch.int32))
    return table, max_blocks


def _dispatch(ids, weight, counts_cursor, E: int, BM: int, implicit: bool, skip_nonpositive: bool):
    T, S = weight.shape
    P = T * S
    table, max_blocks = _dispatch_buffers(T, S, E, BM, implicit, weight.device)
    BLOCK_P = 256
    _kernel(_dispatch_kernel)[(max(1, triton.cdiv(P, BLOCK_P)),)](
        ids, weight, counts_cursor, counts_cursor[E:], *table,
        P, S, E,
        BM=BM, E_PAD=_experts_pad(E), BLOCK_P=BLOCK_P, BLOCK_B=64,
        IMPLICIT_IDS=implicit, SKIP_NONPOSITIVE=skip_nonpositive, num_warps=4,
    )
    return table, max_blocks


def _programs(tiles: int, device: torch.device, cfg: configs.GemmConfig, b_tiles: int, elem_bytes: int) -> int:
    """One program per resident slot (persistent launch), never more than there are tiles."""
    per_sm = configs.programs_per_sm(cfg, b_tiles, elem_bytes)
    return max(1, min(tiles, configs.sm_count_of(device) * per_sm))


def _run_experts(mlp, x, w1, w2, b1, b2, acc, cfg: configs.MoEConfig, *, dense: bool, S: int = 1,
                 table=None, pair_weight=None, row_scale=None, weight_on_input=False, rounds=1, round_blocks=0,
                 w1_up: int | None = None, b1_up: int | None = None, pair_rows: bool = False,
                 w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None):
    """Up then down GEMM for one expert set; routed rows come from `table` (dispatch's output), dense rows are the
    tokens. Adds into acc [T, H] fp32, or with pair_rows stores each (token, slot) pair's row into acc [T*S, H]
    (deterministic mode; cfg.down must not split K). w1 and w2 may be strided views ([E, F, H] and [E, H, I]);
    w1_scale / w2_scale: their block scales when they are FP8 (fp8.py; the canonical [gate; up] layout only)."""
    T, H = x.shape
    I = mlp.intermediate_size
    dot_fp32 = x.dtype == torch.float32 or DOTS_IN_FP32
    up, down = (configs.for_fp32(cfg.up), configs.for_fp32(cfg.down)) if dot_fp32 else (cfg.up, cfg.down)
    if w1_scale is not None:  # an FP8 tile's K rows in one scale block (experts._tile_scales)
        up, down = configs.for_scale_blocks(up, fp8.BLOCK), configs.for_scale_blocks(down, fp8.BLOCK)
    if dense:
        m_blocks = triton.cdiv(T, up.BM)
        round_blocks = m_blocks
        sorted_pair = block_expert = block_end = num_blocks = _empty(1, device=x.device, dtype=torch.int32)  # unused
    else:
        sorted_pair, block_expert, block_end, num_blocks = table
        m_blocks = round_blocks
    h = _empty(m_blocks * up.BM, I, device=x.device, dtype=x.dtype)
    w1s = w1.stride() if w1.dim() == 3 else (0, *w1.stride())
    w2s = w2.stride() if w2.dim() == 3 else (0, *w2.stride())
    b1s = 0 if b1 is None else (b1.stride(0) if b1.dim() == 2 else 0)
    # gate row j to up row j, in elements (and the bias's): I rows on in the canonical [gate; up] layout; callers
    # with another layout (interleaved gate/up columns) pass w1 and b1 as views of the gate rows and these offsets
    b1_col = 1 if b1 is None else b1.stride(-1)
    w1_up = I * w1s[1] if w1_up is None else w1_up
    b1_up = I * b1_col if b1_up is None else b1_up
    b2s = 0 if b2 is None else (b2.stride(0) if b2.dim() == 2 else 0)
    pw = pair_weight if pair_weight is not None else acc
    rs = row_scale if row_scale is not None else acc
    elem = 4 if dot_fp32 else x.element_size()
    up_programs = _programs(m_blocks * triton.cdiv(I, up.BN), x.device, up, 2 if mlp.gated else 1, elem)
    down_programs = _programs(m_blocks * triton.cdiv(H, down.BN) * down.split_k, x.device, down, 1, elem)
    fp8_block = fp8.BLOCK if w1_scale is not None else 0
    s1, s2 = _scale_args(w1_scale, acc), _scale_args(w2_scale, acc)
    for r in range(rounds):
        block_lo = r * round_blocks
        _kernel(_expert_up_kernel)[(up_programs,)](
            x, w1, b1 if b1 is not None else acc, h, pw,
            sorted_pair, block_expert, block_end, num_blocks,
            T, H, I, S, block_lo, round_blocks,
            x.stride(0), w1s[0], w1s[1], w1s[2], w1_up, b1s, b1_col, b1_up, h.stride(0),
            float(mlp.activation_alpha), float(mlp.activation_limit), up_programs, *s1,
            DENSE=dense, GATED=mlp.gated, ACT=ACTIVATION_CODES[mlp.activation], HAS_B1=b1 is not None,
            WEIGHT_ON_INPUT=weight_on_input, DOT_FP32=dot_fp32,
            BM=up.BM, BN=up.BN, BK=up.BK, GROUP_M=up.GROUP_M, FP8_BLOCK=fp8_block,
            num_warps=up.num_warps, num_stages=up.num_stages,
        )
        _kernel(_expert_down_kernel)[(down_programs,)](
            h, w2, b2 if b2 is not None else acc, acc, pw, rs,
            sorted_pair, block_expert, block_end, num_blocks,
            T, H, I, S, block_lo, round_blocks,
            h.stride(0), w2s[0], w2s[1], w2s[2], b2s, acc.stride(0), down_programs, *s2,
            DENSE=dense, HAS_B2=b2 is not None, APPLY_WEIGHT=pair_weight is not None and not weight_on_input,
            HAS_ROW_SCALE=row_scale is not None, DOT_FP32=dot_fp32,
            BM=down.BM, BN=down.BN, BK=down.BK, SPLIT_K=down.split_k, GROUP_M=down.GROUP_M, PAIR_ROWS=pair_rows,
            FP8_BLOCK=fp8_block, num_warps=down.num_warps, num_stages=down.num_stages,
        )


def _scale_args(scale: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """A block-scale tensor and its (expert, row, column) strides for the expert kernels; the shared experts' 2-D
    scale gets expert stride 0, and no scale a dummy pointer (FP8_BLOCK 0: never read)."""
    if scale is None:
        return dummy, 0, 0, 0
    return (scale, *scale.stride()) if scale.dim() == 3 else (scale, 0, *scale.stride())


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The second stream the shared experts run on (one per device), or None off CUDA (the interpreter)."""
    if device.type != "cuda" or TRACED_LAUNCHES.get():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = kept("kernels.launch: side streams for shared experts", {})


@contextmanager
def _on_stream(side: torch.cuda.Stream | None):
    """Run the body on `side` after everything already queued on the current stream (a fork; the join is the
    current stream's wait_stream(side) before the result is read). Every tensor the body reads was allocated on the
    current stream and outlives the join, so none needs record_stream."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def reference_outputs(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's outputs from the PyTorch reference, for calls the kernels cannot run (the CPU without the
    interpreter, other dtypes): torch.compile graphs call the op on any device."""
    with torch.no_grad():
        y, routing = reference_forward(spec, weights, x, seq_len)
    return y.to(x.dtype), routing.logits.float(), routing.slot_weights(spec.router.scaling_factor).float()


def forward(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int, keep: list | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's launches on x [T, H]: (y [T, H] in x's dtype, logits [T, E] fp32, slot weights [T, S] fp32).
    keep: a list for a forward whose backward will want its up projection (the caller checked
    kernels/keep.keep_reason): the routed experts then run on grouped_mm in the backward's row layout, and a
    keep.Kept is appended to it."""
    T, H = x.shape
    E, S = spec.num_experts, slots_of(spec)
    if T == 0:
        return x.new_empty(0, H), x.new_empty(0, E, dtype=torch.float32), x.new_empty(0, S, dtype=torch.float32)
    x = x.contiguous()
    I = spec.experts.intermediate_size
    cfg = _deterministic(configs.choose(T, H, I, E, min(S, 8), x.device))
    # many rows an expert: CUTLASS's grouped GEMM
    on_grouped_mm = keep is not None or grouped.applies(spec, weights, x, cfg.grouped_mm)
    BM = 1 if on_grouped_mm else cfg.up.BM  # grouped_mm reads unpadded rows
    # grouped_mm's combine writes y from the expert rows: an accumulator only for the shared experts' sum
    acc = None if on_grouped_mm and spec.shared is None else _empty(T, H, device=x.device, dtype=torch.float32)
    table = None
    if gating_fallback_reason(spec) is None:
        logits, weight, ids, counts_cursor, sg, table = gate(spec, x, weights.router_weight, weights.router_bias,
                                                             weights.correction_bias, weights.shared_gate, BM, acc)
    else:
        logits, weight, ids, counts_cursor, sg = gate_with_torch(spec, weights, x, seq_len)
    if table is None and acc is not None:  # gating left the accumulator to us
        acc.zero_()
    side = None
    if spec.shared is not None:  # on a second stream, overlapped with dispatch and the routed experts
        shared_mlp = spec.shared.mlp
        shared_cfg = _deterministic(configs.choose(T, H, shared_mlp.intermediate_size, 1, 1, x.device))
        # deterministic mode: on this stream, before the routed experts add theirs (a fixed order of sums)
        side = None if torch.are_deterministic_algorithms_enabled() else _side_stream(x.device)
        with _on_stream(side):
            _run_experts(shared_mlp, x, weights.shared_w1, weights.shared_w2, weights.shared_b1, weights.shared_b2,
                         acc, shared_cfg, dense=True, row_scale=sg, w1_scale=weights.shared_w1_scale,
                         w2_scale=weights.shared_w2_scale)

    kept_rows = [] if keep is not None else None
    y = _routed(spec, weights, x, cfg, on_grouped_mm, acc, ids, weight, counts_cursor, table, side,
                kept_rows=kept_rows)
    if kept_rows:
        keep.append(Kept(logits, weight, ids, *kept_rows))
    return y, logits, weight


@dataclass(frozen=True)
class GateUpLayout:
    """Where w1's up rows (and b1's up columns) are, in elements from the gate's, when w1 and b1 are views of the gate
    rows only (interleaved gate/up columns, transformers' is_concatenated=False); None: the canonical [gate; up]."""

    w1_up: int | None = None
    b1_up: int | None = None


CANONICAL = GateUpLayout()


def _routed(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, cfg: configs.MoEConfig, on_grouped_mm: bool,
            acc: torch.Tensor | None, ids: torch.Tensor, weight: torch.Tensor, counts_cursor: torch.Tensor,
            table: tuple | None, side: torch.cuda.Stream | None,
            layout: GateUpLayout = CANONICAL, kept_rows: list | None = None) -> torch.Tensor:
    """Dispatch (unless gating built the table), the routed experts and the combine: y [T, H] in x's dtype.
    kept_rows (on grouped_mm only): the rows run in the backward's layout, and (layout, up projection) appended."""
    T, H = x.shape
    E, S = spec.num_experts, weight.shape[1]
    BM = 1 if on_grouped_mm else cfg.up.BM
    implicit = spec.router.is_variable_k
    if kept_rows is not None:  # the backward's row layout (a stable sort), not dispatch's table
        rows, row_of_pair, row_layout, gu = grouped.expert_rows_kept(spec, weights, x, weight, ids, _kernel)
        kept_rows.extend((row_layout, gu))
        _join(side, x.device)
        return grouped.combine(spec, rows, row_of_pair, weight, acc, weights.output_bias, _kernel)
    if table is None:
        table, max_blocks = _dispatch(ids, weight, counts_cursor, E, BM, implicit=implicit,
                                      skip_nonpositive=implicit)
    else:
        max_blocks = max_row_blocks(T, S, E, BM, implicit)
    if on_grouped_mm:  # acc holds the shared experts' sum only; the combine kernel writes y
        rows, row_of_pair = grouped.expert_rows(spec, weights, x, weight, counts_cursor[:E], table[0], _kernel)
        _join(side, x.device)
        return grouped.combine(spec, rows, row_of_pair, weight, acc, weights.output_bias, _kernel)
    if implicit:  # ReLU routing: a bounded buffer and a fixed number of rounds, however many gates are positive
        round_blocks = min(max_blocks, triton.cdiv(T * min(E, RELU_ROUND_SLOTS), BM) + min(E, T * E))
    else:
        round_blocks = max_blocks
    deterministic = torch.are_deterministic_algorithms_enabled()
    # deterministic mode: each pair's row stored, then summed in slot order (no fp32 atomics racing per token)
    out = torch.zeros(T * S, H, device=x.device, dtype=torch.float32) if deterministic else acc
    _run_experts(spec.experts, x, weights.w1, weights.w2, weights.b1, weights.b2, out, cfg, dense=False, S=S,
                 table=table, pair_weight=weight, weight_on_input=spec.router.weight_on_input,
                 rounds=triton.cdiv(max_blocks, round_blocks), round_blocks=round_blocks,
                 w1_up=layout.w1_up, b1_up=layout.b1_up, pair_rows=deterministic,
                 w1_scale=weights.w1_scale, w2_scale=weights.w2_scale)
    if deterministic:
        acc += out.view(T, S, H).sum(dim=1)
    return _finish(weights, x, acc, side)


def _deterministic(cfg: configs.MoEConfig) -> configs.MoEConfig:
    """The tiles, with the down GEMM's K split (partial sums added atomically) removed in deterministic mode."""
    if cfg.down.split_k == 1 or not torch.are_deterministic_algorithms_enabled():
        return cfg
    return configs.MoEConfig(cfg.up, configs.GemmConfig(**{**cfg.down.to_dict(), "split_k": 1}), cfg.grouped_mm)


def forward_routed(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                   layout: GateUpLayout = CANONICAL) -> torch.Tensor:
    """The routed experts alone, on a routing made elsewhere (transformers' own router in front of its experts
    module): ids [T, k] and weights [T, k] -> y [T, H] in x's dtype. Only spec.experts and the top-k count are
    read from spec; weights.w1 / w2 / b1 / b2 may be strided views (layout: where the up rows are)."""
    T, H = x.shape
    E, k = spec.num_experts, ids.shape[1]
    if T == 0:
        return x.new_empty(0, H)
    x = x.contiguous()
    cfg = _deterministic(configs.choose(T, H, spec.experts.intermediate_size, E, min(k, 8), x.device))
    on_grouped_mm = layout == CANONICAL and grouped.applies(spec, weights, x, cfg.grouped_mm)
    ids = ids.to(torch.int32).contiguous()
    weight = weight.to(torch.float32).contiguous()
    counts_cursor = _counts_cursor(ids, E)
    acc = None if on_grouped_mm else torch.zeros(T, H, device=x.device, dtype=torch.float32)
    return _routed(spec, weights, x, cfg, on_grouped_mm, acc, ids, weight, counts_cursor, None, None, layout)


def _join(side: torch.cuda.Stream | None, device: torch.device) -> None:
    """The current stream waits for the shared experts' side stream (_on_stream's fork), if there is one."""
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)


def _finish(weights: MoEWeights, x: torch.Tensor, acc: torch.Tensor, side: torch.cuda.Stream | None) -> torch.Tensor:
    """Joins the shared experts' stream, adds the output bias and casts the accumulator to the input's dtype."""
    _join(side, x.device)
    if weights.output_bias is not None:
        acc += weights.output_bias.float()
    return acc.to(x.dtype)


def launch(spec: MoESpec, spec_json: str, weights: MoEWeights, x: torch.Tensor, seq_len: int,
           copy_out: int, keep: list | None = None) -> tuple[torch.Tensor, ...]:
    """The block's launches (y, logits, slot weights); few tokens: replayed from a CUDA graph (kernels/graphs.py),
    since launching them from Python costs more than running them. Both the eager shortcut and the op (compiled
    graphs) come here. A replay copies out the first `copy_out` outputs only, and keeps nothing (`keep`: forward's)."""
    if not graphs.applies(x):
        return forward(spec, weights, x, seq_len, keep)
    key = (spec_json, seq_len, *[(t.data_ptr(), t.dtype, t.shape, t.stride()) for _, t in weights.items()
                                 if t is not None])
    return graphs.call(key, lambda static_x: forward(spec, weights, static_x, seq_len), x, copy_out=copy_out)
