"""Detection of hand-written MoE forms (at any depth) and leaving look-alikes alone. fp32 tolerance 1e-5 abs."""
import handwritten as hw
import pytest
import torch

import moecompile
from moecompile.passes.detect import propose

FORMS = {
    "module_list_where_index_add": (hw.ListMoE, (3, 7, 32), "softmax>top2 renorm | gated silu E=6"),
    "einsum_dense_mask_topk_softmax": (hw.EinsumMoE, (21, 32), "gated silu E=4 H=32 I=40"),
    "relu_router": (hw.ReluRouterMoE, (3, 7, 24), "relu>all_positive | plain gelu E=8"),
    "top1_sigmoid_shared_gated": (hw.Top1SharedMoE, (3, 7, 32),
                                  "sigmoid>top1 bias | gated silu E=5 H=32 I=24 | shared I=48 gated"),
}


@pytest.mark.parametrize("name", FORMS)
def test_handwritten_forms_fused_and_match(name, quiet):
    cls, shape, summary = FORMS[name]
    torch.manual_seed(0)
    model = cls().eval()
    optimized = moecompile.optimize(model, strict=True)
    record = moecompile.report(optimized).blocks[0]
    assert record.decision == "fused" and summary in record.spec_summary
    assert isinstance(optimized, moecompile.FusedMoE)  # the whole model was the block
    for _ in range(3):  # fresh inputs each time
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)


def test_blocks_found_at_depth(quiet):
    torch.manual_seed(0)
    model = hw.DeepModel().eval()
    optimized = moecompile.optimize(model)
    paths = [b.path for b in moecompile.report(optimized).fused]
    assert paths == ["layers.0.ffn.0", "layers.2.ffn.0"]
    assert isinstance(optimized.layers[0].ffn[0], moecompile.FusedMoE)
    assert not isinstance(optimized.layers[1].ffn[0], moecompile.FusedMoE)  # a dense SwiGLU is not an MoE
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [hw.TopKPooling, hw.Retrieval])
def test_lookalikes_not_proposed(cls):
    assert propose(cls()) == []


def test_lookalike_layer_stack_left_alone(quiet):
    model = hw.LayerStack().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = model(x)
    optimized = moecompile.optimize(model)
    rep = moecompile.report(optimized)
    assert all(b.decision == "left" and b.reason for b in rep.blocks)
    assert not any(isinstance(m, moecompile.FusedMoE) for m in optimized.modules())
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), before)


def test_optimizing_an_optimized_model_keeps_its_fused_blocks(quiet):
    """A model optimize()d again (e.g. to add a routing rewrite): its FusedMoE blocks are kept as they are, not read
    again (reading a fused block by execution took seconds and could leave it), and the module around one is not
    proposed as a block."""
    from moecompile import hf_zoo

    model = hf_zoo.build("mixtral")
    once = moecompile.optimize(model)
    fused_paths = [b.path for b in moecompile.report(once).blocks if b.decision == "fused"]
    assert fused_paths and not propose(once)
    twice = moecompile.optimize(once, strict=True)
    records = moecompile.report(twice).blocks
    assert [b.path for b in records] == fused_paths
    assert all(b.decision == "fused" and "already fused" in b.reason for b in records)
    inputs = hf_zoo.example_inputs(model)
    torch.testing.assert_close(hf_zoo.model_output(twice, inputs), hf_zoo.model_output(once, inputs), atol=0, rtol=0)
