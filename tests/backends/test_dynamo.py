"""torch.compile(model, backend="moecompile") (backends/dynamo.py) on the CPU: compiled against eager outputs and
gradients, for HF families (grouped_mm, batched_mm); the blocks it reads from graphs: test_graph_blocks.py and
test_graph_capacity.py.
Tolerances: fp32, max abs error <= 1e-4 of max |output| (the fused path sums in another order)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moecompile
from moecompile import MoECompileError, hf_zoo

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "passes" / "describe"))  # the hand-written form modules
import handwritten  # noqa: E402

FAMILY_CASES = [("mixtral", "grouped_mm"), ("mixtral", "batched_mm"), ("qwen3_moe", "grouped_mm"),
                ("qwen2_moe", "grouped_mm"), ("olmoe", "batched_mm"), ("deepseek_v3", "grouped_mm"),
                ("gpt_oss", "grouped_mm")]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/backends/conftest.py


def close(got, want, rel=1e-4):
    return (got - want).abs().max().item() <= rel * want.abs().max().item()


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
