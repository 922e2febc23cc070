"""The routed experts' GEMMs through torch._grouped_mm (CUTLASS's grouped GEMM) for calls with many rows an expert.

Place in the pipeline: kernels/moe.py's _forward takes this path instead of the Triton expert GEMMs (experts.py)
when `applies` says so; gating, dispatch and the shared experts stay on the Triton kernels. Dispatch runs with a row
block of 1, so each expert's rows are contiguous with no padding, which is the layout grouped_mm's offsets describe.
Then: gather the rows' tokens, grouped_mm (gate/up), the activation (the reference's own formula), grouped_mm
(down), and `_combine_kernel` adds each row times its routing weight into its token's fp32 accumulator row.

Why a second path: at hundreds of rows an expert the expert GEMMs are compute-bound, and there CUTLASS's
warp-specialised TMA mainloop keeps the tensor cores busier than Triton's software-pipelined tl.dot with gathered
A rows (benchmarks/NOTES.md: 93-97% against 62-69% of tensor throughput, Mixtral at 16384 tokens). The rounding is
the reference's: each expert's output is rounded to the input dtype before its routing weight is applied.
The row count from which it pays, GROUPED_MM_MIN_ROWS, was measured on the H100 (benchmarks/profile_moe.py paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..spec import MoESpec, MoEWeights
from . import configs

# below this many rows an active expert (configs.rows_per_expert), the Triton GEMMs win or tie; tests and the
# benchmark's forced comparisons set it (0: always, when the layout allows; None: never)
GROUPED_MM_MIN_ROWS: float | None = 384.0


def _layout_ok(w: torch.Tensor) -> bool:
    """grouped_mm's second operand is w transposed, [E, K, N]: one of its two inner dims unit-stride, the other
    and the expert stride 16-byte aligned, like the start."""
    if w.dim() != 3 or w.data_ptr() % 16:
        return False
    s0, s1, s2 = w.stride()
    elems = 16 // w.element_size()
    return (s2 == 1 and s1 % elems == 0 or s1 == 1 and s2 % elems == 0) and s0 % elems == 0


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
    if e.hidden_size % 8 or e.intermediate_size % 8:
        return "hidden or intermediate size not a multiple of 8 (16-byte rows)"
    if not (_layout_ok(weights.w1) and _layout_ok(weights.w2)):
        return "expert weight strides grouped_mm cannot read"
    return None


def applies(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> bool:
    """Whether this call's routed experts take grouped_mm: enough rows an expert, and a layout it reads."""
    if GROUPED_MM_MIN_ROWS is None or unsupported_reason(spec, weights, x) is not None:
        return False
    return configs.rows_per_expert(x.shape[0], spec.router.top_k, spec.num_experts) >= GROUPED_MM_MIN_ROWS


@triton.jit(do_not_specialize=["P"])
def _combine_kernel(out_ptr, pair_ptr, weight_ptr, acc_ptr, P, H, S, stride_out, stride_acc,
                    APPLY_WEIGHT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """acc[token(row)] += out[row] * weight[pair(row)] for a BR x BC tile of rows and columns (fp32 atomics: a
    token's k rows land in any order)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rows < P
    mask = row_ok[:, None] & (cols < H)[None, :]
    pair = tl.load(pair_ptr + rows, mask=row_ok, other=0)
    token = (pair // S).to(tl.int64)
    v = tl.load(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    if APPLY_WEIGHT:
        v = v * tl.load(weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
    tl.atomic_add(acc_ptr + token[:, None] * stride_acc + cols[None, :], v, mask=mask, sem="relaxed")


def run_experts(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, weight: torch.Tensor,
                counts: torch.Tensor, sorted_pair: torch.Tensor, acc: torch.Tensor, kernel) -> None:
    """Adds the routed experts' weighted outputs into acc [T, H] fp32. sorted_pair: dispatch's rows with a row block
    of 1 (the first T*k are every pair, grouped by expert); counts: rows per expert [E] int32. `kernel` wraps a
    Triton kernel for the launch (kernels/moe.py's _kernel)."""
    T, S = weight.shape
    P = T * S
    pairs = sorted_pair[:P]
    rows_x = x.index_select(0, (pairs // S).long())
    if spec.router.weight_on_input:
        rows_x = (rows_x.float() * weight.view(-1).index_select(0, pairs.long())[:, None]).to(x.dtype)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    mlp = spec.experts
    h = torch._grouped_mm(rows_x, weights.w1.transpose(-2, -1), offs=offs)
    if mlp.gated:
        h = reference.glu(mlp, *h.split(mlp.intermediate_size, dim=-1))
    else:
        h = reference.activation(mlp, h)
    out = torch._grouped_mm(h, weights.w2.transpose(-2, -1), offs=offs)
    H = out.shape[1]
    BR, BC = 32, 128
    kernel(_combine_kernel)[(triton.cdiv(P, BR), triton.cdiv(H, BC))](
        out, pairs, weight, acc, P, H, S, out.stride(0), acc.stride(0),
        APPLY_WEIGHT=not spec.router.weight_on_input, BR=BR, BC=BC, num_warps=4,
    )
