"""Expert capacity baked into a compiled graph (backends/graph_capacity.py): read at the graph's token count and
fused, or left saying why (a capacity from a dynamic token count, a region too large to lift). CPU; fp32, max abs
error <= 1e-4 of max |output|."""
import math
import sys
from pathlib import Path

import pytest
import torch

import moecompile

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "passes" / "describe"))  # the hand-written form modules


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/backends/conftest.py


def close(got, want, rel=1e-4):
    return (got - want).abs().max().item() <= rel * want.abs().max().item()


@pytest.mark.parametrize("k, factor, capacity", [(1, 0.75, 12), (2, 0.5, 16)], ids=["top1gating", "top2gating"])
def test_a_capacity_baked_into_the_graph_is_read_at_its_token_count(k, factor, capacity, quiet):
    """GShard/DeepSpeed gating under torch.compile: dynamo leaves only the capacity (ceil(128 / 8 * factor * k))
    in the graph. The region is read without it, then capped at that number; fused, it drops what the original
    drops: within 1e-5 normwise (fp32) on fresh inputs of the compiled shape, skewed ones included (most choices
    of the hot expert over capacity), and a second token count compiles and is read on its own."""
    import test_forms_capacity

    torch.manual_seed(0)
    block = test_forms_capacity.MOELayer(k=k, eval_capacity_factor=factor, min_capacity=2).eval()
    compiled = torch.compile(block, backend="moecompile", options={"inductor": False}, dynamic=False)
    H = test_forms_capacity.H
    hot = torch.zeros(H)
    hot[:4] = 3.0  # pushes most tokens toward the same experts: over capacity
    inputs = [torch.randn(2, 64, H), torch.randn(2, 64, H) + hot, torch.randn(2, 64, H)]
    with torch.no_grad():
        for x in inputs:
            got, want = compiled(x), block(x)
            assert (got - want).norm() <= 1e-5 * want.norm(), ((got - want).norm() / want.norm()).item()
        x = torch.randn(3, 40, H)  # another token count: its own graph, its own capacity
        got, want = compiled(x), block(x)
        assert (got - want).norm() <= 1e-5 * want.norm()
    records = moecompile.report(compiled).blocks
    assert [r.decision for r in records] == ["fused", "fused"], [r.reason for r in records]
    assert f"capacity {capacity} at 128 tokens read from the graph" in records[0].method
    assert records[0].spec["router"]["expert_capacity"] == capacity
    assert records[0].spec["router"]["capacity_scope"] == "batch"
    assert records[1].spec["router"]["expert_capacity"] == math.ceil(120 / 8 * factor * k)


def _top2gating_compiled_and_left_as_it_was(tokens: int, dynamic: bool):
    """DeepSpeed's top2gating block (factor 0.5) compiled on 2 x `tokens` tokens; its output as the original's
    (fp32, the same ops: within 1e-6); the compiled model's report."""
    import test_forms_capacity

    torch.manual_seed(0)
    block = test_forms_capacity.MOELayer(k=2, eval_capacity_factor=0.5, min_capacity=2).eval()
    compiled = torch.compile(block, backend="moecompile", options={"inductor": False}, dynamic=dynamic)
    x = torch.randn(2, tokens, test_forms_capacity.H)
    with torch.no_grad():
        assert torch.allclose(compiled(x), block(x), atol=1e-6)
    return moecompile.report(compiled)


def test_a_capacity_computed_from_a_dynamic_token_count_is_left_with_the_fix(quiet):
    """Compiled with dynamic shapes, the graph computes the capacity from a symbolic token count and the block's
    region is not a hidden-states -> one-tensor map: left (as the original computes), the log naming the block and
    both fixes."""
    message = _top2gating_compiled_and_left_as_it_was(tokens=64, dynamic=True).message
    assert "8 experts: in this graph the block maps" in message and "dynamic=False" in message, message
    assert "run moecompile.optimize(model) before torch.compile" in message


def test_a_capacity_region_too_large_to_lift_is_left_saying_so(quiet, monkeypatch):
    """Reading a baked capacity lifts it, which takes a [T, E, 2T] dispatch tensor; past the bound (lowered here
    to 1 MB; 256 tokens x 8 experts x 512 x 4 B = 4 MB) the block is left, computing as before, and the log says
    why and what to do."""
    from moecompile.backends import graph_capacity

    monkeypatch.setattr(graph_capacity, "LIFT_BYTES", 1 << 20)
    record = _top2gating_compiled_and_left_as_it_was(tokens=128, dynamic=False).blocks[0]
    assert record.decision == "left"
    assert "capacity is a constant in this graph (32 at 256 tokens)" in record.reason
    assert "would take 4 MB (over 1 MB)" in record.reason and "optimize(model) before torch.compile" in record.reason
