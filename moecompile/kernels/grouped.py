"""The routed experts' GEMMs through torch._grouped_mm (CUTLASS's grouped GEMM) for calls with many rows an expert.

Place in the pipeline: kernels/launch.py's forward takes this path instead of the Triton expert GEMMs (experts.py)
when `applies` says so; gating, dispatch and the shared experts stay on the Triton kernels. Dispatch runs with a row
block of 1, so each expert's rows are contiguous with no padding, which is the layout grouped_mm's offsets describe.
Then: gather the rows' tokens, grouped_mm (gate/up), `_glu_kernel` (the activation, one pass over the gate/up
output), grouped_mm (down), and `_combine_kernel` sums each token's rows times their routing weights in fp32 (with
the shared experts' sum and the output bias) and writes the block's output once.

Why a second path: with hundreds of rows an expert the expert GEMMs are compute-bound, and there CUTLASS's
warp-specialised TMA mainloop keeps the tensor cores busier than Triton's software-pipelined tl.dot with gathered
A rows (benchmarks/NOTES.md: 93-97% against 62-69% of tensor throughput, Mixtral at 16384 tokens). The rounding is
the reference's: each expert's output is rounded to the input dtype before its routing weight is applied.
The row count from which it pays, settings.grouped_mm_min_rows (kernels/settings.py), was measured on the H100
(tools/profile_moe.py paths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..spec import MoESpec, MoEWeights
from . import configs
from .experts import ACTIVATION_CODES, mlp_activation
from .settings import settings


@dataclass
class RowLayout:
    """Routed pairs grouped by expert in pair order (a stable sort), each expert's rows followed by one row of zeros:
    the layout of the training forward that keeps its up projection and of the backward (kernels/grouped_backward.py).
    The zero row gives every expert a row, so grouped_mm's weight-gradient GEMMs (offsets along K) write every
    expert's gradient, 0 for an expert with no pairs."""

    order: torch.Tensor  # [R] int64: the pair (t * slots + s) of each routed row, in expert order
    expert: torch.Tensor  # [R] int64: that pair's expert
    dest: torch.Tensor  # [R] int64: its row in the layout (the zero rows of the experts before it skipped)
    offs: torch.Tensor  # [E] int32: where each expert's rows end, its zero row included
    zero_rows: torch.Tensor  # [E] int64
    row_token: torch.Tensor  # [n] int64: each row's token (0 for the zero rows)
    row_of_pair: torch.Tensor | None  # [P] int32: each pair's row, when every pair is routed (top-k), else None
    rows: int  # n = R + E

    def gathered(self, t: torch.Tensor) -> torch.Tensor:
        """t's rows [T, C] placed at their pairs' rows [n, C], the zero rows zero."""
        return t.index_select(0, self.row_token).index_fill_(0, self.zero_rows, 0)


def row_layout(expert_of_pair: torch.Tensor, num_experts: int, slots: int, routed_pairs: int) -> RowLayout:
    """RowLayout for pairs whose expert is expert_of_pair [P = T * slots] (num_experts: not routed), routed_pairs
    of them (a host int: the layout's size). No host sync."""
    from .launch import pairs_per_expert  # here: launch.py imports this module

    E, P, device = num_experts, expert_of_pair.numel(), expert_of_pair.device
    order = torch.argsort(expert_of_pair, stable=True)[:routed_pairs]
    counts = pairs_per_expert(expert_of_pair, E + 1)[:E]
    offs = torch.cumsum(counts + 1, 0, dtype=torch.int32)
    n = routed_pairs + E
    expert = expert_of_pair.index_select(0, order)
    dest = torch.arange(routed_pairs, device=device) + expert
    row_token = torch.zeros(n, device=device, dtype=torch.long).index_copy_(0, dest, order // slots)
    row_of_pair = None
    if routed_pairs == P:
        row_of_pair = torch.empty(P, device=device, dtype=torch.int32).scatter_(0, order, dest.to(torch.int32))
    return RowLayout(order, expert, dest, offs, offs.long() - 1, row_token, row_of_pair, n)


def _layout_ok(w: torch.Tensor) -> bool:
    """grouped_mm's second operand is w transposed, [E, K, N]: one of its two inner dims unit-stride, the other
    and the expert stride 16-byte aligned, like the start."""
    if w.dim() != 3:
        return False
    s0, s1, s2 = w.stride()
    elems = 16 // w.element_size()
    # the offset, not data_ptr(): compiled graphs trace this with fake tensors (storages start 16-byte aligned)
    return ((s2 == 1 and s1 % elems == 0 or s1 == 1 and s2 % elems == 0) and s0 % elems == 0
            and w.storage_offset() % elems == 0)


def unsupported_reason(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> str | None:
    """Why this call's routed experts cannot go through grouped_mm (whatever its size), or None."""
    r, e = spec.router, spec.experts
    if getattr(torch, "_grouped_mm", None) is None:
        return "this torch has no _grouped_mm"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] != 9:
        return "grouped_mm's CUTLASS kernel is measured on Hopper only"
    if x.dtype != torch.bfloat16:
        return f"grouped_mm takes bfloat16 only on the GPU, input is {x.dtype}"
    if r.is_variable_k:
        return "ReLU routing (its rows are bounded per round, not by k)"
    if weights.b1 is not None or weights.b2 is not None:
        return "expert biases"
    if weights.w1_scale is not None or weights.w2_scale is not None:
        return "FP8 expert weights (the Triton kernels dequantize them per tile)"
    if e.hidden_size % 8 or e.intermediate_size % 8:
        return "hidden or intermediate size not a multiple of 8 (16-byte rows)"
    if not (_layout_ok(weights.w1) and _layout_ok(weights.w2)):
        return "expert weight strides grouped_mm cannot read"
    return None


def applies(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, tuned: bool | None = None) -> bool:
    """Whether this call's routed experts take grouped_mm: a layout it reads, and enough rows an expert or a tuned
    table's measured choice (`tuned`, configs.MoEConfig.grouped_mm). settings.grouped_mm_min_rows None is never."""
    threshold = settings.grouped_mm_min_rows
    if threshold is None or unsupported_reason(spec, weights, x) is not None:
        return False
    if tuned is not None:
        return tuned
    return configs.rows_per_expert(x.shape[0], spec.router.top_k, spec.num_experts) >= threshold


@triton.jit(do_not_specialize=["T"])
def _combine_kernel(out_ptr, row_of_pair_ptr, weight_ptr, shared_ptr, bias_ptr, y_ptr, T, H, stride_out,
                    S: tl.constexpr, APPLY_WEIGHT: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    """y[t] = sum over t's S slots of weight * out[row of that slot] (+ the shared experts' fp32 sum, + the output
    bias), for a BT x BC tile of tokens and columns: each token's rows are gathered and summed in fp32 in slot
    order, and y is written once in its dtype (no zeroed accumulator, atomics or cast pass)."""
    tokens = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    t_ok = tokens < T
    mask = t_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for s in tl.static_range(S):
        pair = tokens * S + s
        row = tl.load(row_of_pair_ptr + pair, mask=t_ok, other=0).to(tl.int64)
        v = tl.load(out_ptr + row[:, None] * stride_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if APPLY_WEIGHT:
            v = v * tl.load(weight_ptr + pair, mask=t_ok, other=0.0)[:, None]
        acc += v
    if HAS_SHARED:
        acc += tl.load(shared_ptr + tokens[:, None] * H + cols[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["P"])
def _glu_kernel(gu_ptr, h_ptr, P, I, stride_gu, stride_h, alpha, limit,
                GATED: tl.constexpr, ACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """h = glu(gate, up) (or act(up) for a plain MLP) for a BR x BC tile: the gate/up GEMM's output read once."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < P)[:, None] & (cols < I)[None, :]
    g_ptrs = gu_ptr + rows[:, None] * stride_gu + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = g
    if GATED:
        u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    out = mlp_activation(g, u, alpha, limit, GATED, ACT)
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], out.to(h_ptr.dtype.element_ty), mask=mask)


def expert_rows(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, weight: torch.Tensor,
                counts: torch.Tensor, sorted_pair: torch.Tensor, kernel: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (token, slot) pair's expert output, unweighted unless the routing weight goes on the input: (rows [T*k,
    H] in x's dtype, grouped by expert; the row of each pair [T*k] int32). sorted_pair: dispatch's rows with a row
    block of 1 (the first T*k are every pair, grouped by expert); counts: rows per expert [E] int32. `kernel` wraps
    a Triton kernel for the launch (kernels/launch.py's _kernel)."""
    T, S = weight.shape
    P = T * S
    pairs = sorted_pair[:P]
    rows_x = x.index_select(0, (pairs // S).long())
    if spec.router.weight_on_input:
        rows_x = (rows_x.float() * weight.view(-1).index_select(0, pairs.long())[:, None]).to(x.dtype)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = torch._grouped_mm(rows_x, weights.w1.transpose(-2, -1), offs=offs)
    h = _activation(spec, gu, kernel)
    del gu
    out = torch._grouped_mm(h, weights.w2.transpose(-2, -1), offs=offs)
    row_of_pair = torch.empty(P, device=x.device, dtype=torch.int32).scatter_(
        0, pairs.long(), torch.arange(P, device=x.device, dtype=torch.int32))
    return out, row_of_pair


def expert_rows_kept(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                     kernel: Callable) -> tuple[torch.Tensor, torch.Tensor, RowLayout, torch.Tensor]:
    """expert_rows for a forward that records gradients (kernels/op.py's EagerMoE): the rows in RowLayout's order,
    the backward's, so that its up projection gu [n, F] can be kept and the backward skips recomputing it. Returns
    (rows [n, H], row of each pair [P] int32, the layout, gu). Top-k routing with the weight on the output only
    (kernels/keep.py checks)."""
    T, S = weight.shape
    layout = row_layout(ids.reshape(-1).long(), spec.num_experts, S, T * S)
    gu = torch._grouped_mm(layout.gathered(x), weights.w1.transpose(-2, -1), offs=layout.offs)
    h = _activation(spec, gu, kernel)
    rows = torch._grouped_mm(h, weights.w2.transpose(-2, -1), offs=layout.offs)
    return rows, layout.row_of_pair, layout, gu


def _activation(spec: MoESpec, gu: torch.Tensor, kernel: Callable) -> torch.Tensor:
    """h [rows, I] = the activation of the gate/up GEMM's output gu [rows, F] (_glu_kernel)."""
    mlp = spec.experts
    P, I = gu.shape[0], mlp.intermediate_size
    h = torch.empty(P, I, device=gu.device, dtype=gu.dtype)
    BR, BC = 32, 128
    kernel(_glu_kernel)[(triton.cdiv(P, BR), triton.cdiv(I, BC))](
        gu, h, P, I, gu.stride(0), h.stride(0), float(mlp.activation_alpha), float(mlp.activation_limit),
        GATED=mlp.gated, ACT=ACTIVATION_CODES[mlp.activation], BR=BR, BC=BC, num_warps=4,
    )
    return h


def combine(spec: MoESpec, out: torch.Tensor, row_of_pair: torch.Tensor, weight: torch.Tensor,
            shared: torch.Tensor | None, output_bias: torch.Tensor | None, kernel: Callable) -> torch.Tensor:
    """The block's output [T, H] in out's dtype from expert_rows' rows: each token's rows times their routing
    weights, plus the shared experts' fp32 sum [T, H] (None: no shared experts) and the output bias."""
    T, S = weight.shape
    y = torch.empty(T, out.shape[1], device=out.device, dtype=out.dtype)
    launch_combine(out, row_of_pair, weight if not spec.router.weight_on_input else None, shared, output_bias, y, S,
                   kernel)
    return y


def launch_combine(out: torch.Tensor, row_of_pair: torch.Tensor, weight: torch.Tensor | None,
                   shared: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor, S: int,
                   kernel: Callable = lambda k: k) -> None:
    """y [T, H] = for each token, the sum of its S rows of `out` (times `weight` [T*S] unless None) plus `shared`
    [T, H] fp32 and `bias`. y may be `shared` itself: each tile is read, then written, by one program."""
    T, H = y.shape
    BT, BC = 16, 128
    kernel(_combine_kernel)[(triton.cdiv(T, BT), triton.cdiv(H, BC))](
        out, row_of_pair, weight if weight is not None else out, shared if shared is not None else out,
        bias if bias is not None else out, y, T, H, out.stride(0),
        S=S, APPLY_WEIGHT=weight is not None, HAS_SHARED=shared is not None,
        HAS_BIAS=bias is not None, BT=BT, BC=BC, num_warps=4,
    )
