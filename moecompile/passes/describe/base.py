"""What describe produces and how it judges a match: Description, DescribeError, and the tolerance MATCH_RTOL.

Place in the pipeline: shared by describe's parts (search.py, router.py, experts.py, outputs.py) and read by confirm
and the compile backend (Description).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...spec import MoESpec, MoEWeights
from ..compare import output_error

MATCH_RTOL = 1e-4  # fp32 max-abs error over max-abs output that counts as "computes the same thing"


class DescribeError(Exception):
    """The candidate could not be read into an MoESpec; the message says why (it goes to the pass log)."""


Extract = Callable[[nn.Module], dict[str, torch.Tensor | None]]


@dataclass
class Description:
    """What describe found: the spec, how to pull canonical weights out of a module shaped like the candidate, the
    input rank the block accepts, and how the spec was read (for the pass log)."""

    spec: MoESpec
    extract: Callable[[nn.Module], MoEWeights]
    input_rank: int
    method: str
    train_note: str | None = None  # why the block can be fused for eval mode only (passes/train_mode.py), or None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over the largest |want|; inf for other shapes or where NaN/Inf positions differ."""
    return output_error(got, want).rel
