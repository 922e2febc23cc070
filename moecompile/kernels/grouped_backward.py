"""The routed experts' gradients through torch._grouped_mm (CUTLASS's grouped GEMM on Hopper), for training.

Place in the pipeline: kernels/backward.py calls `routed_grads` instead of its Triton expert-gradient kernels when
`unsupported_reason` is None (bf16 on a Hopper GPU, not in deterministic mode; settings.grouped_backward). Routing,
the router's gradients and the shared experts stay where they are. For the routed pairs, grouped by expert with a
stable sort (rows contiguous: the layout grouped_mm's offsets describe), each expert's rows followed by one row of
zeros:

    xs, dys = x and dy gathered by each row's token (x's again for dW1)      [n, H]
    gu      = grouped_mm(xs, W1^T)            the up GEMM recomputed        [n, F]   (or the forward's: keep.py)
    d       = grouped_mm(dys, W2)             dy_t W2_e                     [n, I]
    _glu_backward_kernel, in place:  gu <- dpre = act'(g, u) (w_p d),  d <- w_p act(g, u),  dw_p = sum(act(g, u) d)
    dW2     = grouped_mm(dys^T, w act)        per expert, summed over its rows (offsets along K)
    dW1     = grouped_mm(dpre^T, xs)
    dx     += sum over t's rows of grouped_mm(dpre, W1)   (top-k: grouped._combine_kernel, a gather per token)

Why: the Triton expert-gradient kernels (64 x 64 tiles, gathered rows) ran a training step at 0.4-0.6x of HF's
grouped_mm under torch.compile on the H100 (benchmarks/results/moe_train_triton_backward.md); these GEMMs are the
ones HF's autograd runs. Unless the forward kept its up projection (kernels/keep.py: a forward on grouped_mm
with enough rows an expert), the up GEMM is recomputed here, and the memory a step holds between forward and
backward stays x and the weights. The zero row per expert gives every expert at least one
row, so the weight-gradient GEMMs (offsets along K) write every expert's gradient, 0 for an expert with no pairs:
grouped_mm leaves an empty group's output unwritten, and zeroing those afterwards read and wrote the whole weight
gradient again (2.4 GB a step on a Qwen3-30B-A3B layer).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .. import fp8
from ..spec import MLPSpec, MoESpec, MoEWeights
from .experts import ACTIVATION_CODES, mlp_activation
from .grad_kernels import pair_grads
from .grouped import RowLayout, _layout_ok, launch_combine, row_layout
from .settings import settings


def unsupported_reason(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> str | None:
    """Why this call's routed-expert gradients stay on the Triton kernels, or None. settings.grouped_backward:
    "auto" (bf16 on Hopper), "always" (wherever torch._grouped_mm runs: the CPU tests), "never"."""
    mode = settings.grouped_backward
    if mode == "never":
        return "settings.grouped_backward is 'never'"
    if getattr(torch, "_grouped_mm", None) is None:
        return "this torch has no _grouped_mm"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic mode (the Triton backward sums in a fixed order)"
    if mode == "auto":
        if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
            return "grouped_mm's backward is measured on Hopper GPUs only"
        if x.dtype != torch.bfloat16:
            return f"grouped_mm takes bfloat16 only on the GPU, input is {x.dtype}"
    if spec.experts.activation.startswith("clamped") and x.dtype != torch.float32:
        # grouped_mm rounds the recomputed up projection to x's dtype before the clamp; the forward clamped fp32
        # sums, and a value rounded onto the bound (1.5 and 7.0 are exact in bf16) would take a gradient that the
        # forward's value, just past it, did not (measured: 10x the Triton backward's error at limit 1.5)
        return "clamped activation in 16-bit (the rounded up projection decides the clamp differently)"
    if fp8.has_fp8(weights):
        return "FP8 expert weights (not trained: the reference gives the input's gradient)"
    if spec.router.weight_on_input and weights.b1 is not None:
        return "routing weight on the input with an up-projection bias"
    e = spec.experts
    if e.hidden_size % 8 or e.intermediate_size % 8:
        return "hidden or intermediate size not a multiple of 8 (16-byte rows)"
    if not (_layout_ok(weights.w1) and _layout_ok(weights.w2)):
        return "expert weight strides grouped_mm cannot read"
    if weights.b1 is not None and (weights.b1.dim() != 2 or weights.b1.stride(1) != 1):
        return "an up-projection bias that is not [E, F] with unit column stride"
    return None


@triton.jit(do_not_specialize=["P"])
def _glu_backward_kernel(gu_ptr, d_ptr, pw_ptr, dw_ptr, b1_ptr, expert_ptr, live_ptr, P, I, stride_gu, stride_d,
                         stride_b1, alpha, limit, GATED: tl.constexpr, ACT: tl.constexpr, HAS_B1: tl.constexpr,
                         WEIGHT_ON_INPUT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """For BR rows, over all I columns: h = act(g, u) from the up GEMM's output gu, and with d = dy W2_e and the
    pair weight w: dw = sum(h * d) (one store per row, no atomics), gu <- (dg, du) = act'(g, u) (w d), d <- w h.
    With HAS_B1 the row's expert's up bias is added to (g, u) first. With the weight on the input (the expert saw
    w x, so g = w g0): dw = sum(dg g0 + du u0), gu <- w (dg, du) with (dg, du) = act'(g, u) d, and d <- h.
    Rows whose live flag is 0 (each expert's row of zeros) get exact zeros in both outputs, whatever the weights
    hold (a NaN in an expert without pairs must not reach its gradient through 0 * NaN).
    Each element is read and then written by the same program, so both updates are in place."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    r_ok = rows < P
    live = tl.load(live_ptr + rows, mask=r_ok, other=0) != 0
    w = tl.load(pw_ptr + rows, mask=r_ok, other=0.0)
    b_rows = b1_ptr
    if HAS_B1:
        b_rows = b1_ptr + tl.load(expert_ptr + rows, mask=r_ok, other=0).to(tl.int64) * stride_b1
    acc = tl.zeros((BR,), dtype=tl.float32)
    for c0 in range(0, I, BC):
        cols = c0 + tl.arange(0, BC)
        mask = r_ok[:, None] & (cols < I)[None, :]
        g_ptrs = gu_ptr + rows[:, None] * stride_gu + cols[None, :]
        d_ptrs = d_ptr + rows[:, None] * stride_d + cols[None, :]
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = g
        if GATED:
            u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
        if HAS_B1:
            g += tl.load(b_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if GATED:
                u += tl.load(b_rows[:, None] + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        g0 = g
        u0 = u
        if WEIGHT_ON_INPUT:
            g = g * w[:, None]
            u = u * w[:, None]
        # h as the forward rounds it before the down GEMM
        h = mlp_activation(g, u, alpha, limit, GATED, ACT).to(d_ptr.dtype.element_ty).to(tl.float32)
        dg, du, dw = pair_grads(g, u, g0, u0, h, d, w, alpha, limit, GATED, ACT, WEIGHT_ON_INPUT)
        acc += dw  # masked elements were loaded as 0 and add nothing
        if WEIGHT_ON_INPUT:  # the expert saw w x: its input gradient and dW1 take w
            dg = dg * w[:, None]
            du = du * w[:, None]
            hw = h
        else:
            hw = h * w[:, None]
        dg = tl.where(live[:, None], dg, 0.0)
        du = tl.where(live[:, None], du, 0.0)
        hw = tl.where(live[:, None], hw, 0.0)
        tl.store(g_ptrs, dg.to(gu_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(g_ptrs + I, du.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptrs, hw.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + rows, tl.where(live, acc, 0.0), mask=r_ok)


def add_rows(gx: torch.Tensor, rows: torch.Tensor, token: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """gx[token[r]] += rows[r] (times scale[r]) in fp32, a bounded slice of rows at a time (an fp32 copy of every
    row would cost twice the rows' memory)."""
    step = max(1, (1 << 24) // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step].float()  # the rows themselves when they are fp32: never changed in place
        if scale is not None:
            part = part * scale[start:start + step, None]
        gx.index_add_(0, token[start:start + step], part)


def routed_grads(mlp: MLPSpec, x: torch.Tensor, gy: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 b1: torch.Tensor | None, b2: torch.Tensor | None, pair_weight: torch.Tensor,
                 expert_of_pair: torch.Tensor, num_experts: int, slots: int, routed_pairs: int,
                 want_weights: bool, gx: torch.Tensor | None, weight_on_input: bool = False,
                 kept: tuple[RowLayout, torch.Tensor] | None = None) -> tuple:
    """The routed experts' gradients (module docstring) as (dw, dW1, dW2, db1, db2), and the input's gradient
    added into gx:
    - dw [P] fp32: each pair's combine-weight gradient, 0 for pairs not routed (b2's share, dy . b2_e, is the
      caller's);
    - dW1, dW2, db1, db2: None unless want_weights (a bias's also when the bias is None);
    - gx: [T + 1, H] fp32, or None for no input gradient. Row T is a spare that takes the zero rows' products (0 W1
      is NaN where W1 is); the caller reads rows :T.
    expert_of_pair [P = T * slots]: each pair's expert, or num_experts for a pair not routed; routed_pairs: how many
    are routed (a host int: grouped_mm's output sizes); weight_on_input: the combine weight scaled the expert's
    input (Llama 4) rather than its output; kept: the forward's (layout, up projection) when it kept them
    (kernels/keep.py), whose up projection is then overwritten here with its gradient.
    Nothing outside is changed until every grouped_mm has run, so a caller that catches a refusal can run another
    path."""
    E, P, T = num_experts, expert_of_pair.numel(), x.shape[0]
    device = x.device
    dw = torch.zeros(P, device=device, dtype=torch.float32)
    if routed_pairs == 0:  # ReLU routing with every gate shut: nothing reached an expert
        zeros = [torch.zeros_like(t) if want_weights and t is not None else None for t in (w1, w2, b1, b2)]
        return (dw, *zeros)
    if kept is None:
        layout = row_layout(expert_of_pair, E, slots, routed_pairs)
        # x's rows are gathered again for dW1 rather than held beside dy's rows and both GEMM outputs: the step's
        # peak memory is then three [n, *] buffers, not four, for one more gather (about 2% of the step at 16384
        # tokens on Qwen3-30B-A3B)
        gu = torch._grouped_mm(layout.gathered(x), w1.transpose(-2, -1), offs=layout.offs)
    else:  # the forward's up projection, in this layout (kernels/keep.py); overwritten below
        layout, gu = kept
    offs, n, dest, zero_rows = layout.offs, layout.rows, layout.dest, layout.zero_rows
    dys = layout.gathered(gy)
    d = torch._grouped_mm(dys, w2, offs=offs)
    pw = torch.zeros(n, device=device, dtype=torch.float32).index_copy_(
        0, dest, pair_weight.index_select(0, layout.order).float())
    live = torch.ones(n, device=device, dtype=torch.int8).index_fill_(0, zero_rows, 0)
    dw_rows = torch.empty(n, device=device, dtype=torch.float32)
    I = mlp.intermediate_size
    BR, BC = (32, 128) if device.type == "cuda" else (16, 32)
    # a zero row's expert is left at 0: its outputs are zeroed whatever its bias
    row_expert = (torch.zeros(n, device=device, dtype=torch.long).index_copy_(0, dest, layout.expert)
                  if b1 is not None or b2 is not None else None)
    _glu_backward_kernel[(triton.cdiv(n, BR),)](
        gu, d, pw, dw_rows, b1 if b1 is not None else gu, row_expert if row_expert is not None else layout.row_token,
        live, n, I, gu.stride(0), d.stride(0), 0 if b1 is None else b1.stride(0), float(mlp.activation_alpha),
        float(mlp.activation_limit), GATED=mlp.gated, ACT=ACTIVATION_CODES[mlp.activation], HAS_B1=b1 is not None,
        WEIGHT_ON_INPUT=weight_on_input, BR=BR, BC=BC, num_warps=4)
    dpre, h_weighted = gu, d
    dw.index_copy_(0, layout.order, dw_rows.index_select(0, dest))
    gw1 = gw2 = db1 = db2 = None
    if want_weights:
        if b2 is not None:  # per expert, the sum of its rows' w dy (the zero rows add 0)
            db2 = torch.zeros(E, b2.shape[-1], device=device, dtype=torch.float32)
            add_rows(db2, dys, row_expert, None if weight_on_input else pw)
            db2 = db2.to(b2.dtype)
        if b1 is not None:  # ... and of its rows' dpre
            db1 = torch.zeros(E, b1.shape[-1], device=device, dtype=torch.float32)
            add_rows(db1, dpre, row_expert)
            db1 = db1.to(b1.dtype)
        # every expert has a row (its zero row at least), so grouped_mm writes every expert's gradient
        gw2 = torch._grouped_mm(dys.t(), h_weighted, offs=offs).to(w2.dtype)
    del dys, h_weighted, d
    if want_weights:
        gw1 = torch._grouped_mm(dpre.t(), layout.gathered(x), offs=offs).to(w1.dtype)
    if gx is not None:
        rows = torch._grouped_mm(dpre, w1, offs=offs)
        if layout.row_of_pair is not None:  # every pair has a row (top-k): each token sums its rows, as the
            # forward's combine does, into gx in place (rows :T): no fp32 copy of the rows, no atomics
            launch_combine(rows, layout.row_of_pair, None, gx[:T], None, gx[:T], slots)
        else:  # ReLU routing: a token's rows vary in number
            add_rows(gx, rows, layout.row_token.index_fill(0, zero_rows, T))  # zero rows into the spare row T
    return dw, gw1, gw2, db1, db2


def refused(exc: RuntimeError) -> None:
    """Says that torch._grouped_mm refused a call the checks let through (a layout or size this torch's kernel
    does not take), after which backward.py runs the Triton backward for it."""
    warnings.warn(f"moecompile: torch._grouped_mm refused the experts' backward ({str(exc).splitlines()[0][:200]}); "
                  "this call ran the Triton backward instead (settings.grouped_backward='never' skips the attempt)",
                  RuntimeWarning, stacklevel=3)
