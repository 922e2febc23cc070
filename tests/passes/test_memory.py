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
    # objects alive before the window: what earlier tests in this process left (dynamo's graph-break records and
    # fake-tensor modes of compiled models) can be released into cycles while optimize runs; only cycles of objects
    # optimize created count against it
    before = {id(o) for o in gc.get_objects()}
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        optimized = moecompile.optimize(model)
        gc.collect()
        garbage = [o for o in gc.garbage if id(o) not in before]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert moecompile.report(optimized).fused
    tensors = [tuple(o.shape) for o in garbage if isinstance(o, torch.Tensor)]
    assert tensors == [], f"{len(tensors)} tensors kept only by cycles"
    kinds = sorted({type(o).__name__ for o in garbage})
    assert len(garbage) == 0, f"{len(garbage)} objects in cycles: {kinds[:20]}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 75e9,
                    reason="needs a GPU of 80 GB (run on the device: benchmarks/device_verification.sh memory)")
def test_full_size_model_on_gpu_with_gc_disabled(tmp_path, quiet):
    """Qwen3-30B-A3B shape (48 layers, bf16) on the GPU, gc off while optimize runs: the peak extra memory stays
    under one layer's expert weights and what is left after it returns under 1% of the model (the benchmark's bars,
    benchmarks/memory_optimize.py, which also writes its results where MOECOMPILE_RESULTS points)."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import memory_optimize

    assert memory_optimize.main(["--out", os.environ.get("MOECOMPILE_RESULTS", str(tmp_path))]) == 0
