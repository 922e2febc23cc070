"""torch.compile(model, backend="moecompile") (backends/dynamo.py, backends/graph_blocks.py) on the CPU: compiled
against eager outputs and gradients, for HF families (grouped_mm, batched_mm) and hand-written forms.
Tolerances: fp32, max abs error <= 1e-4 of max |output| (the fused path sums in another order)."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moecompile
from moecompile import MoECompileError, hf_zoo

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "passes"))  # the hand-written form modules
import handwritten  # noqa: E402

FAMILY_CASES = [("mixtral", "grouped_mm"), ("mixtral", "batched_mm"), ("qwen3_moe", "grouped_mm"),
                ("qwen2_moe", "grouped_mm"), ("olmoe", "batched_mm"), ("deepseek_v3", "grouped_mm"),
                ("gpt_oss", "grouped_mm")]


def close(got, want, rel=1e-4):
    return (got - want).abs().max().item() <= rel * want.abs().max().item()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_registered_through_the_entry_point_without_importing_moecompile():
    script = textwrap.dedent("""
        import sys, torch
        from torch import nn
        assert "moecompile" not in sys.modules
        print("listed", "moecompile" in torch._dynamo.list_backends())

        class MoE(nn.Module):
            def __init__(self, H=16, E=4, I=24):
                super().__init__()
                self.gate = nn.Linear(H, E, bias=False)
                self.w1 = nn.Parameter(torch.randn(E, 2 * I, H) / H ** 0.5)
                self.w2 = nn.Parameter(torch.randn(E, H, I) / I ** 0.5)
            def forward(self, x):
                w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
                dense = torch.zeros(x.shape[0], self.w1.shape[0]).scatter(1, idx, w)
                g, u = torch.einsum("th,efh->etf", x, self.w1).chunk(2, dim=-1)
                y = torch.einsum("eti,ehi->eth", torch.nn.functional.silu(g) * u, self.w2)
                return torch.einsum("eth,te->th", y, dense)

        torch.manual_seed(0)
        model, x = MoE(), torch.randn(9, 16)
        got = torch.compile(model, backend="moecompile", options={"inductor": False})(x)
        print("close", torch.allclose(got, model(x), atol=1e-5))
        import moecompile
        print("fused", [b.decision for b in moecompile.report(model).blocks])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "listed True" in done.stdout and "close True" in done.stdout and "fused ['fused']" in done.stdout


@pytest.mark.parametrize("family, impl", FAMILY_CASES)
def test_family_compiled_matches_eager_with_every_block_fused(family, impl, quiet):
    model = hf_zoo.build(family, impl)
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    compiled = torch.compile(model, backend="moecompile", options={"inductor": False})
    got = hf_zoo.model_output(compiled, inputs)
    rep = moecompile.report(compiled)
    assert len(rep.blocks) == model.config.num_hidden_layers
    assert all(b.decision == "fused" for b in rep.blocks), rep.table()
    assert close(got, want)


def test_inductor_compiles_the_fused_graph(quiet):
    model = hf_zoo.build("qwen3_moe", "grouped_mm")
    inputs = hf_zoo.example_inputs(model)
    want = hf_zoo.model_output(model, inputs)
    compiled = torch.compile(model, backend="moecompile")  # Inductor after the rewrite (the default)
    assert close(hf_zoo.model_output(compiled, inputs), want)
    assert all(b.decision == "fused" for b in moecompile.report(compiled).blocks)


@pytest.mark.parametrize("inductor", [False, True])
def test_training_gradients_match_eager(inductor, quiet):
    """Backward through the fused op reaches the model's own parameters, the expert weights included (their
    canonical layout is rebuilt from the graph's inputs on every call). Gradients within 1e-4 (normwise)."""
    model = hf_zoo.build("deepseek_v3", "grouped_mm").train()
    inputs = hf_zoo.example_inputs(model)
    model(**inputs).logits.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # fullgraph: a backend failure (say, AOTAutograd unable to trace the op's backward) raises instead of
    # falling back to eager pieces
    compiled = torch.compile(model, backend="moecompile", options={"inductor": inductor}, fullgraph=True)
    compiled(**inputs).logits.square().mean().backward()
    assert all(b.decision == "fused" for b in moecompile.report(compiled).blocks)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    experts = [n for n in got if "experts" in n]
    assert experts and all(got[n].abs().sum() > 0 for n in experts)
    for name, grad in want.items():
        assert (got[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-12, name


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


def test_a_graph_without_moe_is_exactly_inductor(quiet):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)), None
    x = torch.randn(5, 16)
    results = {}
    for name in ("inductor", "moecompile"):
        torch._dynamo.reset()
        counters.clear()
        results[name] = torch.compile(model, backend=name)(x), counters["stats"]["unique_graphs"]
    assert torch.equal(results["inductor"][0], results["moecompile"][0])  # the same Inductor code, bit for bit
    assert results["inductor"][1] == results["moecompile"][1] == 1
    assert "no MoE block" in moecompile.report(model).message


def test_configured_backend_and_bad_options(quiet):
    model = handwritten.EinsumMoE()
    x = torch.randn(5, 32)
    compiled = torch.compile(model, backend=moecompile.backend(inductor=False))
    assert close(compiled(x), model(x))
    with pytest.raises(MoECompileError, match="backend option 'inductor' must be bool"):
        moecompile.backend(inductor="no")


def test_sequence_lengths_5_to_500_compile_at_most_twice_and_stay_fused(quiet):
    """dynamic=None: the second length recompiles with symbolic sizes, which the fused blocks take."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = hf_zoo.build("qwen3_moe", "grouped_mm")
    compiled = torch.compile(model, backend=moecompile.backend(inductor=False))
    for length in (5, 6, 37, 128, 500):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert close(compiled(input_ids=ids).logits, model(input_ids=ids).logits), length
    assert counters["stats"]["unique_graphs"] <= 2
    rep = moecompile.report(compiled)
    assert len(rep.blocks) == 4 and all(b.decision == "fused" for b in rep.blocks)  # 2 graphs x 2 layers


def test_generate_with_a_compiled_forward_gives_the_same_tokens(quiet):
    model = hf_zoo.build("mixtral", "grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend=moecompile.backend(inductor=False))
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    rep = moecompile.report(model)
    assert rep.blocks and all(b.decision == "fused" for b in rep.blocks)  # prefill and decode graphs


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
