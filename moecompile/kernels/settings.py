"""Settings of the kernel path that tests and benchmarks change: one object, read at each call.

Place in the pipeline: read by kernels/launch.py (buffer allocation) and kernels/grouped.py (which expert GEMMs run).
Change them with `configured(...)` (restored on exit) rather than by assigning module globals:

    with moecompile.kernels.settings.configured(grouped_mm_min_rows=0.0):   # grouped_mm wherever it applies
        fused(x)

A graph that torch.compile traced, or a CUDA graph captured, keeps the choice it was made with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager


@dataclasses.dataclass
class KernelSettings:
    # every buffer the op allocates starts as NaN (floats) or a huge index (ints): an element a kernel fails to
    # write shows in the output (the kernel tests run with it on)
    poison_buffers: bool = False
    # from this many rows an active expert (configs.rows_per_expert), torch._grouped_mm runs the routed experts
    # (benchmarks/results/expert_paths.json, H100: it wins from 512 rows on Mixtral's and Qwen3-30B's experts; at 256
    # the Triton GEMMs win on Mixtral and tie on Qwen3); 0: wherever the layout allows, None: never
    grouped_mm_min_rows: float | None = 384.0
    # the routed experts' gradients through torch._grouped_mm (kernels/grouped_backward.py): "auto" (bf16 on Hopper),
    # "always" (wherever torch._grouped_mm runs, the CPU included: the tests), "never" (the Triton backward)
    grouped_backward: str = "auto"
    # from this many rows an active expert, an eager forward that records gradients runs the routed experts on
    # grouped_mm and keeps their up projection for the backward (kernels/keep.py), which then skips recomputing it;
    # None: never (the recompute option: a step holds only x and the weights between forward and backward)
    keep_up_projection_min_rows: float | None = 128.0
    # tiles every call uses instead of configs.choose()'s (a configs.MoEConfig; the tuner times candidates this way)
    moe_config: object | None = None


settings = KernelSettings()


@contextmanager
def configured(**changes) -> Iterator[KernelSettings]:
    """The settings with `changes` applied inside the block, as they were after it."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(KernelSettings)}
    if unknown:
        raise TypeError(f"unknown kernel settings {sorted(unknown)}; they are "
                        f"{[f.name for f in dataclasses.fields(KernelSettings)]}")
    before = dataclasses.replace(settings)
    for name, value in changes.items():
        setattr(settings, name, value)
    try:
        yield settings
    finally:
        for field in dataclasses.fields(KernelSettings):
            setattr(settings, field.name, getattr(before, field.name))
