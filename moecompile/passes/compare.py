"""How two outputs of a block are compared, everywhere moecompile decides that two computations agree.

Place in the pipeline: describe (which hypothesis reproduces the block), confirm (does the replacement), and the
fuzz campaign (benchmarks/fuzz_moe.py) use these. Non-finite values are compared by position: a position that is
finite in one output and not in the other is a mismatch (a NaN where the original is finite is never "error 0"),
and positions non-finite in both are left out of the error. Python's max() and a mean over NaN both hide a NaN,
so every reduction here is a tensor reduction over the finite positions, and NaN errors count as failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..capture import Leaves


@dataclass(frozen=True)
class OutputError:
    """got vs want over the positions finite in both, and the positions finite in only one."""

    max_abs: float
    scale: float  # max |want| over its finite positions
    mean_rel: float  # mean |got - want| / mean |want|
    nonfinite_mismatch: int  # positions finite in one and not the other (shape mismatch: -1)

    @property
    def rel(self) -> float:
        """max_abs over the output's scale; inf when any position's finiteness differs."""
        if self.nonfinite_mismatch:
            return math.inf
        return self.max_abs / max(self.scale, 1e-6)

    def within(self, rtol: float) -> bool:
        return self.rel <= rtol  # False for NaN too

    def describe(self) -> str:
        if self.nonfinite_mismatch < 0:
            return "the outputs have different shapes"
        if self.nonfinite_mismatch:
            return f"{self.nonfinite_mismatch} values are finite in one output and NaN/Inf in the other"
        return f"max abs error {self.max_abs:.3e} (rel {self.rel:.2e})"


SHAPE_MISMATCH = OutputError(math.inf, 1.0, math.inf, -1)


def output_error(got: torch.Tensor | None, want: torch.Tensor) -> OutputError:
    if got is None or got.shape != want.shape:
        return SHAPE_MISMATCH
    if want.numel() == 0:
        return OutputError(0.0, 0.0, 0.0, 0)
    got, want = got.detach().double().to(want.device), want.detach().double()  # a leaf may live on the CPU
    got_ok, want_ok = got.isfinite(), want.isfinite()
    mismatch = int((got_ok != want_ok).sum().item())
    both = got_ok & want_ok
    if not both.any():
        return OutputError(0.0, 0.0, 0.0, mismatch)
    diff = (got - want).abs()[both]
    magnitude = want.abs()[both]
    return OutputError(diff.max().item(), magnitude.max().item(),
                       (diff.mean() / magnitude.mean().clamp(min=1e-12)).item(), mismatch)


def token_errors(got: torch.Tensor, want: torch.Tensor, scale: float) -> torch.Tensor:
    """Per token (rows of [..., X] flattened to [T, X]): max |got - want| / scale over its finite positions, inf
    where a position is finite in one and not the other."""
    got = got.detach().double().reshape(-1, got.shape[-1])
    want = want.detach().double().reshape(-1, want.shape[-1])
    got_ok, want_ok = got.isfinite(), want.isfinite()
    diff = torch.where(got_ok & want_ok, (got - want).abs(), torch.zeros_like(got))
    err = diff.amax(dim=-1) / max(scale, 1e-6) if got.shape[-1] else diff.new_zeros(got.shape[0])
    return torch.where((got_ok != want_ok).any(dim=-1), torch.full_like(err, math.inf), err)


def output_pairs(got_outputs: tuple, want_outputs: tuple, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(got, want) for each output of a block, given as (hidden states, aux or None) pairs; top-k weights (an aux
    output whose last size is not E) are compared as sorted sets, since their order is free."""
    (got, got_aux), (want, want_aux) = got_outputs, want_outputs
    pairs = [(got, want)]
    if isinstance(want_aux, Leaves):  # a structure: leaf by leaf, where the structures agree
        same = isinstance(got_aux, Leaves) and got_aux.tree == want_aux.tree
        return pairs + [_aux_pair(g if same else None, w, num_experts)
                        for g, w in zip(got_aux if same else [None] * len(want_aux), want_aux)]
    if want_aux is not None:
        pairs.append(_aux_pair(None if isinstance(got_aux, Leaves) else got_aux, want_aux, num_experts))
    return pairs


def _aux_pair(got_aux, want_aux, num_experts: int):
    if got_aux is not None and got_aux.shape == want_aux.shape and want_aux.dim() and want_aux.is_floating_point() \
            and want_aux.shape[-1] != num_experts:
        got_aux, want_aux = got_aux.float().sort(-1).values, want_aux.float().sort(-1).values
    return got_aux, want_aux
