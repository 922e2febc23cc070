"""optimize leaves no reference cycles: what describe and confirm allocate is freed when optimize returns, without
waiting for the garbage collector (on a GPU holding a large model, copies kept by cycles run it out of memory).
The full-size check (a Qwen3-30B-A3B-shaped model on the GPU with gc disabled) is benchmarks/memory_optimize.py."""
import gc

import pytest
import torch

import moecompile
from moecompile import hf_zoo


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_optimize_leaves_no_cyclic_garbage(family, quiet):
    model = hf_zoo.build(family)
    moecompile.optimize(model)  # first use: imports and caches that live on anyway
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        optimized = moecompile.optimize(model)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert moecompile.report(optimized).fused
    tensors = [tuple(o.shape) for o in garbage if isinstance(o, torch.Tensor)]
    assert tensors == [], f"{len(tensors)} tensors kept only by cycles"
    kinds = sorted({type(o).__name__ for o in garbage})
    assert len(garbage) == 0, f"{len(garbage)} objects in cycles: {kinds[:20]}"
