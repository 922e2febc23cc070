"""MoE blocks read from torch.compile's FX graphs (backends/graph_blocks.py): hand-written forms fused, blocks with
the same ops sharing one description, and the blocks a graph cannot hold (split by graph breaks, a flat router apart
from its experts, a block dynamo skips) left with what to do. CPU; fp32, max abs error <= 1e-4 of max |output|."""
import sys
from pathlib import Path

import pytest
import torch

import moecompile
from moecompile import hf_zoo

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "passes" / "describe"))  # the hand-written form modules
import handwritten  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/backends/conftest.py


def close(got, want, rel=1e-4):
    return (got - want).abs().max().item() <= rel * want.abs().max().item()


@pytest.mark.parametrize("build, shape", [
    (lambda: handwritten.Block(handwritten.EinsumMoE(), 32), (11, 32)),  # einsum, inside a model
    (lambda: handwritten.Block(handwritten.ReluRouterMoE(), 24), (2, 5, 24)),  # ReLU router, ModuleList experts
    (lambda: handwritten.EinsumMoE(), (7, 32)),  # the compiled module is the block
    (lambda: handwritten.Block(handwritten.HERouterEinsumMoE(), 32), (11, 32)),  # an [H, E] router, x @ W
    (lambda: handwritten.GptOssMLPBlock(), (37, 32)),  # its own norm and residual add, einsum on gathered weights
])
def test_handwritten_forms_without_graph_breaks_are_fused(build, shape, quiet):
    torch.manual_seed(0)
    model, x = build(), torch.randn(*shape)
    want = model(x)
    compiled = torch.compile(model, backend="moecompile", options={"inductor": False})
    assert close(compiled(x), want)
    rep = moecompile.report(compiled)
    assert [b.decision for b in rep.blocks] == ["fused"], rep.table()


def test_blocks_with_the_same_ops_share_a_description_and_others_are_read_alone(quiet):
    """Chained blocks: the second has the first's ops (its description is taken, its own weights confirmed), the
    third differs in k and is read on its own. A recompile for no_grad finds all three confirmed already; one for
    another token count (static shapes: the count is in the graph's views) spot-checks them. Outputs within 1e-4
    of eager each time."""

    class Flattening(handwritten.EinsumMoE):  # a view that holds the token count, as HF blocks' views do
        def forward(self, x):
            return super().forward(x.view(x.shape[0], -1))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Flattening(k=2), Flattening(k=2), Flattening(k=3))
    x = torch.randn(9, 32)
    want = model(x)
    compiled = torch.compile(model, backend="moecompile", options={"inductor": False}, dynamic=False)
    assert close(compiled(x), want)
    with torch.no_grad():
        assert close(compiled(x), want)
    blocks = moecompile.report(compiled).blocks
    assert len(blocks) == 6 and all(b.decision == "fused" for b in blocks), moecompile.report(compiled).table()
    assert [b.spec["router"]["top_k"] for b in blocks] == [2, 2, 3] * 2
    first, second, third = blocks[:3]
    assert "same ops" not in first.method and "same ops as 0" in second.method and "same ops" not in third.method
    assert all(b.max_abs_error is not None for b in blocks)
    assert all("confirmed when an earlier graph compiled" in b.method for b in blocks[3:])
    # another token count: the same blocks recompile (the views hold it); each is spot-checked, not described again
    x5 = torch.randn(5, 32)
    assert close(compiled(x5), model(x5))
    later = moecompile.report(compiled).blocks[6:]
    assert [b.spec["router"]["top_k"] for b in later] == [2, 2, 3]
    assert all("up to the token count" in b.method and "spot-checked at 5" in b.method for b in later), [
        b.method for b in later]


def test_blocks_split_by_graph_breaks_are_left_and_the_log_says_what_to_do(quiet):
    model = hf_zoo.build("mixtral", "eager")  # HF's eager experts loop over data-dependent expert ids
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    compiled = torch.compile(model, backend="moecompile", options={"inductor": False})
    assert close(hf_zoo.model_output(compiled, inputs), want)
    message = moecompile.report(compiled).message
    assert "run moecompile.optimize(model) before torch.compile" in message
    # the log names the router whose experts the break moved to another graph (its path within the frame dynamo
    # traced: the block's forward, resumed after the break)
    assert "router `gate` (MixtralTopKRouter), 8 experts" in message, message
    assert "experts are not in this graph" in message


def test_a_flat_router_split_from_its_experts_is_named(quiet):
    """OLMo-core keeps its router flat, [E*H], viewed [E, H] in forward: still read as the router (the log names
    it), while its experts' loop over torch.where breaks the graph."""
    import test_forms_flat

    compiled = torch.compile(test_forms_flat.OLMoCoreMoE().eval(), backend="moecompile", options={"inductor": False})
    with torch.no_grad():
        compiled(torch.randn(2, 16, test_forms_flat.H))
    message = moecompile.report(compiled).message
    assert "router `router` (MoELinearRouter), 8 experts" in message, message


def test_a_block_dynamo_skips_whole_is_explained(quiet):
    """Experts under torch.utils.checkpoint in a data-dependent loop: dynamo skips the block's frame and hands the
    backend no graph of it; report() says so and what to do instead of 'not optimized'."""
    import test_forms_wrappers

    compiled = torch.compile(test_forms_wrappers.CheckpointedExperts().eval(), backend="moecompile",
                             options={"inductor": False})
    with torch.no_grad():
        compiled(torch.randn(2, 16, test_forms_wrappers.H))
    with pytest.raises(moecompile.MoECompileError, match="no graph holding CheckpointedExperts's parameters.*"
                       "run moecompile.optimize"):
        moecompile.report(compiled)
